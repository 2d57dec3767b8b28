"""Turning a recorded job into one attempt a backend can run: its folder and request."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gateway.backends.base import SubmitRequest
from gateway.node import write_json_atomic
from gateway.errors import RuntimeConfigError
from gateway.runtimes import RunContext, get_runtime
from gateway.spec import JobSpec
from gateway.store.records import JobRecord

if TYPE_CHECKING:
    from gateway.config import Config


def attempt_dir(jobs_root: Path, job_id: str, attempt: int) -> Path:
    return jobs_root / job_id / str(attempt)


def job_env(job: JobRecord, attempt: int) -> dict[str, str]:
    spec = job.spec
    return {**spec.env, "HPCGW_JOB_ID": job.id, "HPCGW_JOB_NAME": spec.name,
            "HPCGW_ATTEMPT": str(attempt), "HPCGW_SPEC_DIGEST": job.spec_digest}


def prepare_attempt(jobs_root: Path, job: JobRecord, attempt: int, runtime: str,
                    kill_grace: float,
                    launcher: Callable[[JobSpec, list[str]], list[str]] | None = None,
                    config: "Config | None" = None) -> SubmitRequest:
    """Write the attempt folder's ``launch.json`` and return the request for the backend.

    A folder left by an earlier try of the same attempt that never started (no claim) is
    rewritten; one that did start is left alone, and its claim stops a second run.
    """
    spec = job.spec
    adir = attempt_dir(jobs_root, job.id, attempt)
    adir.mkdir(parents=True, exist_ok=True)
    env = job_env(job, attempt)
    image: dict[str, Any] | None = None
    cwd = spec.workdir
    if runtime == "host":
        if spec.image is not None:
            raise RuntimeConfigError(f"job {job.id} has an image; the host runtime would not use it")
        work = spec.workdir or str(adir / "work")
        env["HPCGW_WORK_DIR"] = work
        ctx = RunContext(work_dir=work, attempt_dir=str(adir), env=env)
    else:
        ctx, image = _container_context(spec, runtime, config, adir, env)
        cwd = None  # the host side of the work folder is the attempt's work/
    argv = get_runtime(runtime).argv(spec, ctx)
    if launcher is not None:
        argv = launcher(spec, argv)
    if not (adir / "claim").exists():
        write_json_atomic(adir / "launch.json", {
            "job_id": job.id, "attempt": attempt, "argv": argv, "env": env,
            "cwd": cwd, "image": image, "walltime": spec.resources.walltime, "kill_grace": kill_grace,
            "inputs": [{"source": i.source, "name": i.name} for i in spec.inputs
                       if not i.is_remote],
            "outputs": list(spec.outputs), "runtime": runtime,
            "spec_digest": job.spec_digest})
    return SubmitRequest(job.id, attempt, spec, adir, argv, env)


def _container_context(spec: JobSpec, runtime: str, config: "Config | None", adir: Path,
                       env: dict[str, str]) -> tuple[RunContext, dict[str, Any]]:
    from gateway.images.context import container_context

    if config is None:
        from gateway.config import load_config

        config = load_config()
    gpu = None
    if spec.resources.gpus.count > 0 and config.images.node_profile:
        from gateway.runtimes.profiles import load_node_profile

        gpu = load_node_profile(config.images.node_profile).gpu_layer()
    env["HPCGW_WORK_DIR"] = spec.workdir or "/work"
    return container_context(spec, runtime, config, adir, env, gpu)


def output_paths(jobs_root: Path, job: JobRecord) -> list[Path]:
    root = attempt_dir(jobs_root, job.id, job.attempt) / "outputs"
    return [root / rel for rel in job.outputs]


def remove_job_dirs(jobs_root: Path, job_id: str) -> None:
    shutil.rmtree(jobs_root / job_id, ignore_errors=True)
