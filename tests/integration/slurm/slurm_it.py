"""Helpers for the Slurm integration tests: attempts on disk, and waiting by polling."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.backends.base import Observation, SubmitRequest, attempt_key
from gateway.backends.slurm import SlurmBackend, SlurmProfile
from gateway.node import write_json_atomic
from gateway.spec import JobSpec
from gateway.testing.slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[3]
WAIT = 120.0   # safety net only: a stuck test fails instead of hanging


def backend_for(cluster: SlurmCluster, **profile: Any) -> SlurmBackend:
    """A backend on the test cluster; jobs import this checkout's `gateway` (PYTHONPATH)."""
    fields = {"name": "test", "gpu_partitions": {"fake": "gpu"}, "max_walltime": "1d", **profile}
    return SlurmBackend(SlurmProfile.model_validate(fields),
                        env={**cluster.env, "PYTHONPATH": str(REPO)})


def attempt(root: Path, job_id: str, *, env: dict[str, str] | None = None, **spec: Any
            ) -> SubmitRequest:
    """An attempt folder with launch.json (as gateway.attempts writes it) and its request."""
    parsed = JobSpec.model_validate({"name": "it", "command": ["true"], **spec},
                                    context={"check_inputs": False})
    adir = root / job_id / "0"
    adir.mkdir(parents=True, exist_ok=True)
    full_env = {**(env or {}), "HPCGW_JOB_ID": job_id, "HPCGW_ATTEMPT": "0"}
    write_json_atomic(adir / "launch.json", {
        "job_id": job_id, "attempt": 0, "argv": parsed.argv, "env": full_env,
        "cwd": parsed.workdir, "walltime": parsed.resources.walltime, "kill_grace": 5,
        "inputs": [], "outputs": list(parsed.outputs), "runtime": "host",
        "spec_digest": parsed.spec_digest})
    assert attempt_key(job_id, 0) == f"hpcgw.{job_id}.0"
    return SubmitRequest(job_id, 0, parsed, adir, parsed.argv, full_env)


def wait_for(backend: SlurmBackend, refs: Sequence[str],
             done: Callable[[Observation], bool] = lambda o: o.state.terminal,
             timeout: float = WAIT) -> dict[str, Observation]:
    """Poll (0.2 s apart) until every ref satisfies ``done``; return the last observations."""
    deadline = time.monotonic() + timeout
    seen: dict[str, Observation] = {}
    while time.monotonic() < deadline:
        seen = backend.poll(refs)
        if len(seen) == len(refs) and all(done(o) for o in seen.values()):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"not done after {timeout} s: {seen}")


def submit_ok(backend: SlurmBackend, requests: Sequence[SubmitRequest]) -> list[str]:
    outcomes = backend.submit(requests)
    assert all(o.ref and not o.error for o in outcomes), outcomes
    return [o.ref for o in outcomes if o.ref]
