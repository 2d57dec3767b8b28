"""The Python API: the same verbs as the CLI, returning ``Job`` objects.

    from gateway import Gateway
    gw = Gateway()
    job = gw.run(["python", "-c", "print(6 * 7)"], name="answer")
    job.wait(); print(job.state, job.logs())

Embedded mode needs no daemon: verbs that read state run one reconciler pass first (unless
another process, such as ``hpcgw agent``, is running one).
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from gateway.attempts import attempt_dir, output_paths
from gateway.backends import BackendRegistry
from gateway.config import Config, load_config
from gateway.errors import SpecError
from gateway.cache import result_key
from gateway.hashing import path_sha256
from gateway.reconciler import PassReport, Reconciler
from gateway.spec import JobSpec, load_spec, parse_spec
from gateway.states import State
from gateway.store import Event, JobRecord, Store


class Job:
    """A handle on one job; ``state`` and friends read the store (refreshed on access)."""

    def __init__(self, gateway: "Gateway", record: JobRecord):
        self._gw = gateway
        self.record = record

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def state(self) -> State:
        return self.refresh().record.state

    @property
    def exit_code(self) -> int | None:
        return self.record.exit_code

    @property
    def spec(self) -> JobSpec:
        return self.record.spec  # type: ignore[no-any-return]

    def refresh(self) -> "Job":
        self.record = self._gw.store.get(self.id)
        return self

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> "Job":
        self._gw.wait([self.id], timeout=timeout, poll=poll)
        return self.refresh()

    def logs(self, stream: str = "stdout") -> str:
        return self._gw.logs(self.id, stream)

    def outputs(self) -> list[Path]:
        return self._gw.outputs(self.id)

    def cancel(self) -> "Job":
        self._gw.cancel([self.id])
        return self.refresh()

    def events(self) -> list[Event]:
        return self._gw.store.events(self.id)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.record.name!r} {self.record.state.value}>"

    def _repr_html_(self) -> str:
        rec = self.record
        rows = [("id", rec.id), ("name", rec.name), ("state", rec.state.value),
                ("target", rec.backend or rec.target), ("attempt", str(rec.attempt)),
                ("exit code", "" if rec.exit_code is None else str(rec.exit_code)),
                ("reason", rec.reason or ""), ("spec", rec.spec_digest[:19])]
        cells = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                        f"<td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<table class='hpcgw-job'>{cells}</table>"


class Gateway:
    """Entry point of the Python API. ``config`` may be a Config or a mapping of overrides."""

    def __init__(self, config: Config | Mapping[str, Any] | None = None, *,
                 backends: Mapping[str, Any] | None = None):
        self.config = config if isinstance(config, Config) else load_config(config)
        self.store = Store(self.config.store_path, busy_timeout_s=self.config.store.busy_timeout_s)
        self.backends = BackendRegistry(self.config, dict(backends or {}))
        self.reconciler = Reconciler(self.store, self.backends, self.config)

    # -- submitting -----------------------------------------------------------------------
    def validate(self, spec: JobSpec | Mapping[str, Any] | str | Path) -> JobSpec:
        """Parse and check a spec against its backend's capabilities; raises, writes nothing."""
        if isinstance(spec, (str, Path)):
            spec = load_spec(spec)
        spec = parse_spec(spec)
        from gateway.backends.base import check_capabilities

        if spec.target != "auto":
            check_capabilities(self.backends.get(spec.target), spec)
        return spec

    def submit(self, spec: JobSpec | Mapping[str, Any] | str | Path, *, start: bool = True,
               cache: bool = False) -> Job:
        return self.submit_many([spec], start=start, cache=cache)[0]

    def submit_many(self, specs: Iterable[JobSpec | Mapping[str, Any] | str | Path], *,
                    start: bool = True, cache: bool = False) -> list[Job]:
        """Validate every spec first, record them all in one transaction, then start them.

        With ``cache``, a spec whose result key matches a job that already SUCCEEDED is
        recorded as SUCCEEDED at once and reuses that job's outputs (shown as cached).
        """
        checked = [self.validate(s) for s in specs]
        ids = self.record(checked, cache=cache)
        if start:
            self.reconcile()
        return [Job(self, self.store.get(i)) for i in ids]

    def plan(self, spec: JobSpec | Mapping[str, Any] | str | Path) -> dict[str, Any]:
        """Where a job would go and what it would cost, without recording anything."""
        from types import SimpleNamespace

        spec = self.validate(spec)
        target = spec.target
        out: dict[str, Any] = {"name": spec.name, "target": target, "spec_digest": spec.spec_digest}
        if target == "auto":
            hashes = {i.name: path_sha256(i.source) for i in spec.inputs if not i.is_remote}
            probe = SimpleNamespace(spec=spec, name=spec.name, campaign=None,
                                    result_key=result_key(spec, hashes))
            self.reconciler.broker.new_pass()
            decision = self.reconciler.broker.place(probe)  # type: ignore[arg-type]
            out["placement"] = decision.data()
            if decision.target is None:
                out["backend"] = "(none)"
                return out
            target = decision.target
        out["backend"] = self.backends.backend_name(target)
        where = getattr(self.backends.get(target), "plan", None)
        if where is not None:
            out.update(where(spec))
        return out

    def submit_array(self, spec: JobSpec | Mapping[str, Any] | str | Path, indices: Sequence[int],
                     *, start: bool = True) -> list[Job]:
        """One job per index, each seeing ``HPCGW_ARRAY_INDEX``; backends that have arrays
        (Slurm) submit jobs of one shape together as one array."""
        base = self.validate(spec)
        if not indices:
            raise SpecError("an array needs at least one index")
        group = f"{base.name}-{int(time.time())}"
        members = [base.model_copy(update={
            "name": f"{base.name[:52]}-{i}",
            "labels": {**base.labels, "hpcgw.array": group, "hpcgw.array-index": str(i)}})
            for i in indices]
        return self.submit_many(members, start=start)

    def record(self, specs: Sequence[JobSpec], *, cache: bool = False,
               hashes: Sequence[Mapping[str, str] | None] | None = None) -> list[str]:
        """Hash inputs (unless the caller already did), compute result keys, look up the
        cache, insert in one transaction."""
        given = list(hashes) if hashes is not None else [None] * len(specs)
        content = [dict(h) if h is not None else
                   {i.name: path_sha256(i.source) for i in s.inputs if not i.is_remote}
                   for s, h in zip(specs, given)]
        keys = [result_key(s, h) for s, h in zip(specs, content)]
        hits = [self.store.find_result(k) if cache and k else None for k in keys]
        return self.store.insert_jobs(specs, provenance=[{"inputs": h} for h in content],
                                      result_keys=keys, cached=hits)

    def run(self, command: Sequence[str] | str, *, name: str | None = None, **fields: Any) -> Job:
        """Submit a command with spec fields as keywords (``resources={...}``, ``env={...}``)."""
        if isinstance(command, (list, tuple)) and not command:
            raise SpecError("command is empty; give the program to run")
        default = (command if isinstance(command, str) else Path(command[0]).name) or "job"
        guess = "".join(c if c.isalnum() or c in "._-" else "-" for c in default.split()[0])
        spec = {"name": name or guess.strip("-._")[:63] or "job", "command": command,
                "target": fields.pop("target", self.config.default_target), **fields}
        return self.submit(spec)

    # -- reading --------------------------------------------------------------------------
    def reconcile(self, *, block: bool = False) -> PassReport | None:
        return self.reconciler.run_pass(block=block)

    def job(self, job_id: str) -> Job:
        return Job(self, self.store.get(self.store.resolve(job_id)))

    def jobs(self, *, state: str | Sequence[str] | None = None, target: str | None = None,
             labels: Mapping[str, str] | None = None, limit: int | None = None) -> list[Job]:
        states = [State(s.upper()) for s in ([state] if isinstance(state, str) else state or [])]
        records = self.store.jobs(states=states or None, target=target, labels=labels, limit=limit)
        return [Job(self, r) for r in records]

    def cancel(self, job_ids: Sequence[str]) -> list[str]:
        ids = [self.store.resolve(i) for i in job_ids]
        changed = self.store.request_cancel(ids)
        self.reconcile()
        return changed

    def wait(self, job_ids: Sequence[str], *, timeout: float | None = None,
             poll: float = 0.2) -> list[Job]:
        """Block until every job is terminal (running passes in embedded mode)."""
        ids = [self.store.resolve(i) for i in job_ids]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.reconcile()
            records = [self.store.get(i) for i in ids]
            if all(r.state.terminal for r in records):
                return [Job(self, r) for r in records]
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"jobs still running after {timeout} s: "
                                   + ", ".join(r.id for r in records if not r.state.terminal))
            time.sleep(poll)

    def log_path(self, job_id: str, stream: str = "stdout") -> Path:
        if stream not in ("stdout", "stderr"):
            raise SpecError(f"stream must be stdout or stderr, not {stream!r}")
        job = self.store.get(self.store.resolve(job_id))
        return attempt_dir(self.config.jobs_path, job.id, max(job.attempt, 1)) / stream

    def logs(self, job_id: str, stream: str = "stdout") -> str:
        self.refresh_log(job_id, stream)
        path = self.log_path(job_id, stream)
        return path.read_text(errors="replace") if path.exists() else ""

    def refresh_log(self, job_id: str, stream: str = "stdout") -> bool:
        """For a running job whose backend keeps its logs elsewhere (aws: S3, uploaded by the
        instance every ``log_interval_s``), fetch the current log into the attempt folder:
        one request, for this job only. False when nothing was fetched."""
        path = self.log_path(job_id, stream)
        job = self.store.get(self.store.resolve(job_id))
        if job.state != State.RUNNING or not job.backend:
            return False
        fetch = getattr(self.backends.get(job.backend), "fetch_log", None)
        if fetch is None:
            return False
        from gateway.backends.base import attempt_key
        from gateway.errors import GatewayError

        try:
            return bool(fetch(attempt_key(job.id, job.attempt), stream, path))
        except GatewayError:
            return False   # a transient error: the next tick tries again

    def outputs(self, job_id: str) -> list[Path]:
        job = self.store.get(self.store.resolve(job_id))
        return [p for p in output_paths(self.config.jobs_path, job) if p.exists()]

    def rerun(self, job_id: str) -> Job:
        """Submit exactly the spec that a job ran (same spec digest)."""
        job = self.store.get(self.store.resolve(job_id))
        return self.submit(job.spec)

    def agent(self, *, interval: float | None = None, stop_after: float | None = None,
              until_idle: bool = False) -> None:
        """Run passes forever, for ``stop_after`` seconds, or until no job is left to move."""
        pause = interval or self.config.agent.interval_s
        end = None if stop_after is None else time.monotonic() + stop_after
        while end is None or time.monotonic() < end:
            self.reconciler.run_pass(block=True)
            if until_idle and not self.store.jobs(states=[s for s in State if not s.terminal],
                                                  limit=1):
                return
            time.sleep(pause)

    # -- Dask ---------------------------------------------------------------------------
    def dask_cluster(self, target: str | None = None, workers: int = 0, *,
                     worker_resources: Mapping[str, Any] | None = None,
                     image: str | None = None, **options: Any) -> Any:
        """A Dask cluster whose workers are jobs of this gateway on ``target``
        (``cluster.scale(n)``, ``cluster.adapt(minimum, maximum)``); see docs/dask.md."""
        from gateway.dask import start_cluster

        return start_cluster(self, target=target, workers=workers,
                             worker_resources=worker_resources, image=image, **options)

    def connect_dask(self, name: str, *, timeout: float = 30) -> Any:
        """A ``distributed.Client`` on the running Dask cluster ``name`` (any process)."""
        from gateway.dask import connect

        return connect(self, name, timeout=timeout)

    def close_dask(self, name: str, *, timeout: float = 60) -> list[str]:
        """Close the Dask cluster ``name`` from any process (its scheduler job and workers);
        returns the job ids the backend has not confirmed ended."""
        from gateway.dask import close

        return close(self, name, timeout=timeout)

    def close(self) -> None:
        self.store.close()
