"""What the gateway and the node left in attempt folders, found from what Slurm reports.

A plain job's WorkDir (``--chdir``) is its attempt folder. An array's WorkDir is its first
task's folder, which holds ``array.json`` (task index -> key and attempt folder), written
before sbatch: it maps array tasks back to attempts for ``poll`` (outputs) and ``adopt``
(keys), also after a gateway restart. ``status.json`` is the node's final word
(``gateway.node run``); its outputs are passed on in ``Observation.extra["outputs"]``.
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
    """Reads array manifests (cached by folder) and status.json of finished attempts."""

    def __init__(self) -> None:
        self._manifests: dict[str, list[dict[str, str]]] = {}

    def task(self, workdir: str | None, index: int) -> dict[str, str] | None:
        """``{"key", "attempt_dir"}`` of array task ``index`` whose array runs in ``workdir``."""
        if not workdir:
            return None
        if workdir not in self._manifests:
            try:
                tasks = json.loads((Path(workdir) / MANIFEST).read_text())["tasks"]
            except (OSError, ValueError, KeyError, TypeError):
                return None
            self._manifests[workdir] = list(tasks)
        tasks = self._manifests[workdir]
        return tasks[index] if 0 <= index < len(tasks) else None

    def attempt_dir(self, obs: Observation) -> Path | None:
        workdir = obs.extra.get("workdir")
        if "_" not in obs.ref:
            return Path(workdir) if workdir else None
        task = self.task(workdir, int(obs.ref.rsplit("_", 1)[1]))
        return Path(task["attempt_dir"]) if task else None

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
        if status.get("image_digest"):
            extra["image_digest"] = str(status["image_digest"])
        # the node refused before running (image check, staging): its reason beats Slurm's
        reason = status.get("reason") if status.get("outcome") == "error" else None
        return replace(obs, extra=extra, reason=str(reason) if reason else obs.reason)
