"""Turning a recorded job into one attempt a backend can run: its folder and request."""

from __future__ import annotations

import shutil
from pathlib import Path

from gateway.backends.base import SubmitRequest
from gateway.node import write_json_atomic
from gateway.runtimes import RunContext, get_runtime
from gateway.store.records import JobRecord


def attempt_dir(jobs_root: Path, job_id: str, attempt: int) -> Path:
    return jobs_root / job_id / str(attempt)


def job_env(job: JobRecord, attempt: int) -> dict[str, str]:
    spec = job.spec
    return {**spec.env, "HPCGW_JOB_ID": job.id, "HPCGW_JOB_NAME": spec.name,
            "HPCGW_ATTEMPT": str(attempt), "HPCGW_SPEC_DIGEST": job.spec_digest}


def prepare_attempt(jobs_root: Path, job: JobRecord, attempt: int, runtime: str,
                    kill_grace: float) -> SubmitRequest:
    """Write the attempt folder's ``launch.json`` and return the request for the backend.

    A folder left by an earlier try of the same attempt that never started (no claim) is
    rewritten; one that did start is left alone, and its claim stops a second run.
    """
    spec = job.spec
    adir = attempt_dir(jobs_root, job.id, attempt)
    adir.mkdir(parents=True, exist_ok=True)
    work = spec.workdir or str(adir / "work")
    env = job_env(job, attempt)
    env["HPCGW_WORK_DIR"] = work
    ctx = RunContext(work_dir=work, attempt_dir=str(adir), env=env)
    argv = get_runtime(runtime).argv(spec, ctx)
    if not (adir / "claim").exists():
        write_json_atomic(adir / "launch.json", {
            "job_id": job.id, "attempt": attempt, "argv": argv, "env": env,
            "cwd": spec.workdir, "walltime": spec.resources.walltime, "kill_grace": kill_grace,
            "inputs": [{"source": i.source, "name": i.name} for i in spec.inputs
                       if not i.is_remote],
            "outputs": list(spec.outputs), "runtime": runtime,
            "spec_digest": job.spec_digest})
    return SubmitRequest(job.id, attempt, spec, adir, argv, env)


def output_paths(jobs_root: Path, job: JobRecord) -> list[Path]:
    root = attempt_dir(jobs_root, job.id, job.attempt) / "outputs"
    return [root / rel for rel in job.outputs]


def remove_job_dirs(jobs_root: Path, job_id: str) -> None:
    shutil.rmtree(jobs_root / job_id, ignore_errors=True)
