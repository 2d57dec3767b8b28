"""Turning a recorded job into one attempt a backend can run: its folder and request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gateway.backends.base import Observation, SubmitRequest
from gateway.node import write_json_atomic
from gateway.errors import RuntimeConfigError
from gateway.runtimes import RunContext, get_runtime
from gateway.states import State
from gateway.spec import THREAD_VARS, JobSpec
from gateway.store.records import JobRecord

if TYPE_CHECKING:
    from gateway.config import Config


def attempt_dir(jobs_root: Path, job_id: str, attempt: int) -> Path:
    return jobs_root / job_id / str(attempt)


def job_env(job: JobRecord, attempt: int) -> dict[str, str]:
    """The environment every attempt of ``job`` gets: the thread-pool sizes from
    ``resources.cpus_per_task`` (unless the spec's ``env`` sets them), the spec's ``env``
    and the ``HPCGW_*`` variables."""
    spec = job.spec
    threads = str(spec.resources.cpus_per_task)
    env = {**{k: threads for k in THREAD_VARS}, **spec.env,
           "HPCGW_JOB_ID": job.id, "HPCGW_JOB_NAME": spec.name,
           "HPCGW_ATTEMPT": str(attempt), "HPCGW_SPEC_DIGEST": job.spec_digest}
    if "hpcgw.array-index" in spec.labels:
        env["HPCGW_ARRAY_INDEX"] = spec.labels["hpcgw.array-index"]
    return env


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
    """Where a job's outputs are; a cached job's are those of the job it reuses."""
    if job.cached_from:
        root = attempt_dir(jobs_root, job.cached_from, job.provenance.get("cached_attempt", 1))
    else:
        root = attempt_dir(jobs_root, job.id, job.attempt)
    root = root / "outputs"
    return [root / rel for rel in job.outputs]


def remove_job_dirs(jobs_root: Path, job_id: str) -> None:
    shutil.rmtree(jobs_root / job_id, ignore_errors=True)


OUTCOMES = {"timeout": (State.TIMEOUT, "timeout"), "cancelled": (State.CANCELLED, "cancelled"),
            "error": (State.FAILED, "failed")}


def observation_from_status(ref: str, status: dict[str, object]) -> Observation:
    """Translate the node runner's status.json into an Observation (any backend)."""
    outcome = str(status.get("outcome"))
    code = status.get("exit_code")
    exit_code = int(code) if isinstance(code, int) else None
    if outcome == "exited":
        state, kind = (State.SUCCEEDED, None) if exit_code == 0 else (State.FAILED, "failed")
    else:
        state, kind = OUTCOMES.get(outcome, (State.FAILED, "failed"))
    reason = status.get("reason") or (f"exit code {exit_code}" if state == State.FAILED else None)
    return Observation(ref, state, native=outcome, kind=kind, exit_code=exit_code,
                       reason=str(reason) if reason else None, node=_s(status.get("node")),
                       started_at=_f(status.get("started_at")), ended_at=_f(status.get("ended_at")),
                       extra={"outputs": json.dumps(status.get("outputs") or []),
                              **({"image_digest": str(status["image_digest"])}
                                 if status.get("image_digest") else {})})


def _s(value: object) -> str | None:
    return str(value) if value is not None else None


def _f(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None
