"""What the node left in an attempt folder, found from what Slurm tells about a job.

A plain job's WorkDir (``--chdir``) is its attempt folder. An array's WorkDir is its first
task's folder, which holds ``array.json`` (task index -> attempt folder), written before
sbatch so the mapping survives a gateway restart. ``status.json`` is the node's final word
(``gateway.node finish``); its outputs are passed on in ``Observation.extra["outputs"]``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from gateway.backends.base import Observation, SubmitRequest
from gateway.node import write_json_atomic

MANIFEST = "array.json"


def write_manifest(chunk: Sequence[SubmitRequest]) -> None:
    write_json_atomic(Path(chunk[0].attempt_dir) / MANIFEST,
                      {"tasks": [{"key": r.key, "attempt_dir": str(r.attempt_dir)} for r in chunk]})


class Results:
    """Reads status.json for finished attempts; caches array manifests by folder."""

    def __init__(self) -> None:
        self._manifests: dict[str, list[str]] = {}

    def attempt_dir(self, obs: Observation) -> Path | None:
        workdir = obs.extra.get("workdir")
        if not workdir:
            return None
        if "_" not in obs.ref:
            return Path(workdir)
        if workdir not in self._manifests:
            try:
                tasks = json.loads((Path(workdir) / MANIFEST).read_text())["tasks"]
            except (OSError, ValueError, KeyError, TypeError):
                return None
            self._manifests[workdir] = [t["attempt_dir"] for t in tasks]
        index = int(obs.ref.rsplit("_", 1)[1])
        dirs = self._manifests[workdir]
        return Path(dirs[index]) if 0 <= index < len(dirs) else None

    def add_outputs(self, obs: Observation) -> Observation:
        """The observation with ``extra["outputs"]`` (JSON list) when the node recorded them."""
        if not obs.state.terminal:
            return obs
        adir = self.attempt_dir(obs)
        if adir is None:
            return obs
        try:
            status = json.loads((adir / "status.json").read_text())
        except (OSError, ValueError):
            return obs
        extra = {**obs.extra, "attempt_dir": str(adir),
                 "outputs": json.dumps(status.get("outputs") or [])}
        return replace(obs, extra=extra)
