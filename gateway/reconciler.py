"""The reconciler: one idempotent pass that moves every non-terminal job forward.

A pass, under an exclusive file lock so two processes never interleave their passes:

1. cancel   send cancellations the user asked for (one call per backend)
2. resolve  jobs left in SUBMITTING by a crash: adopt what the backend already has by the
            attempt key; resubmit the same attempt otherwise (the node's claim file makes a
            duplicate start impossible)
3. observe  ONE poll per backend for all its active jobs; apply transitions; retry per spec
4. submit   place PENDING jobs (FIFO, within slot limits), write the intent (SUBMITTING)
            in one transaction, then hand them to the backend in one batch

The process may die between any two steps: every step reads what the previous one wrote.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from gateway.attempts import attempt_dir, observation_from_status, prepare_attempt
from gateway.backends import BackendRegistry
from gateway.broker import Broker, Decision
from gateway.backends.base import Backend, Observation, SubmitRequest, attempt_key, check_capabilities
from gateway.config import Config
from gateway.errors import BackendUnavailable, GatewayError
from gateway.node import read_json
from gateway.states import ACTIVE, State
from gateway.store import Change, JobRecord, Store

log = logging.getLogger("hpcgw.reconciler")
CRASH_POINTS = ("after-intent", "after-submit", "after-poll")


def _crash_point(name: str) -> None:
    """Fault injection for the crash tests: die here, as kill -9 would, when asked to."""
    if os.environ.get("HPCGW_TEST_CRASH_AT") == name:
        os._exit(99)
RETRYABLE = {State.FAILED, State.TIMEOUT, State.LOST}


@dataclass
class PassReport:
    submitted: int = 0
    adopted: int = 0
    transitions: int = 0
    retried: int = 0
    cancelled: int = 0
    polls: dict[str, int] = field(default_factory=dict)
    unavailable: list[str] = field(default_factory=list)


def _default_runtime(backend: Backend) -> str:
    """For a job with an image and no ``runtime``: the backend's choice (``default_runtime``,
    e.g. the local backend's first configured container runtime), else the first container
    runtime its capabilities offer (a Slurm profile's ``runtime``), else host."""
    explicit = getattr(backend, "default_runtime", None)
    if explicit:
        return str(explicit)
    offered = backend.capabilities().runtimes
    return next((r for r in ("podman", "charliecloud", "apptainer") if r in offered), "host")


class Reconciler:
    def __init__(self, store: Store, backends: BackendRegistry, config: Config):
        self.store, self.backends, self.config = store, backends, config
        self.lock_path = config.data_path / "reconcile.lock"
        self._throttles: dict[str, int] = {}  # campaign -> array throttle, this pass
        self.broker = Broker(store, backends, config)

    @contextmanager
    def locked(self, block: bool) -> Iterator[bool]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def run_pass(self, *, block: bool = False) -> PassReport | None:
        """One pass; None when another process holds the lock and ``block`` is False."""
        with self.locked(block) as held:
            if not held:
                return None
            report = PassReport()
            self._reap_dask()
            self._cancel(report)
            resubmit = self._resolve(report)
            self._observe(report)
            self._reap(report)
            self._submit(report, resubmit)
            return report

    # -- helpers --------------------------------------------------------------------------
    def _backend(self, job: JobRecord) -> Backend:
        return self.backends.get(job.backend or job.target)

    def _group(self, jobs: Sequence[JobRecord]) -> dict[str, list[JobRecord]]:
        groups: dict[str, list[JobRecord]] = defaultdict(list)
        for job in jobs:
            groups[job.backend or self.backends.backend_name(job.target)].append(job)
        return groups

    # -- 1. cancel ------------------------------------------------------------------------
    def _cancel(self, report: PassReport) -> None:
        now = time.time()
        wanted = [j for j in self.store.jobs(states=[State.QUEUED, State.RUNNING, State.UNKNOWN])
                  if j.cancel_requested and j.ref and (j.cancel_sent_at or 0) < now - 60]
        for name, jobs in self._group(wanted).items():
            try:
                self.backends.get(name).cancel([j.ref for j in jobs if j.ref])
            except BackendUnavailable as exc:
                report.unavailable.append(f"{name}: {exc}")
                continue
            self.store.apply([Change(j.id, None, {"cancel_sent_at": now}, "cancel-sent")
                              for j in jobs])

    def _reap_dask(self) -> None:
        """Dask clusters whose owner died (the notebook's kernel on this host, or the scheduler
        job): cancel their worker jobs, then forget the cluster. One folder listing if none."""
        root = self.config.data_path / "dask"
        if not root.is_dir() or not any(root.glob("*.json")):
            return
        from gateway.dask.registry import Registry

        registry = Registry(root)
        for record in registry.all():
            if record.owner.alive_in(self.store) is not False:
                continue
            jobs = [j.id for j in self.store.jobs(labels={"hpcgw.dask": record.name})
                    if not j.state.terminal]
            if jobs:
                self.store.request_cancel(jobs)
            else:
                registry.remove(record.name)

    # -- 2. resolve -----------------------------------------------------------------------
    def _resolve(self, report: PassReport) -> list[JobRecord]:
        """Adopt or resubmit jobs whose submission was interrupted; returns the resubmits."""
        now, resubmit = time.time(), []
        stuck = [j for j in self.store.jobs(states=[State.SUBMITTING], newest_first=False)
                 if j.not_before <= now]
        for name, jobs in self._group(stuck).items():
            backend = self.backends.get(name)
            keys = {attempt_key(j.id, j.attempt): j for j in jobs}
            try:
                found = backend.adopt(list(keys))
            except BackendUnavailable as exc:
                report.unavailable.append(f"{name}: {exc}")
                continue
            changes = []
            for key, job in keys.items():
                if key in found:
                    changes.append(Change(job.id, State.QUEUED, {"ref": found[key]}, "adopted",
                                          f"found at {name} as {found[key]}", expect=State.SUBMITTING))
                elif job.cancel_requested:
                    changes.append(Change(job.id, State.CANCELLED, {"kind": "cancelled", "ended_at": now,
                                          "reason": "cancelled before submission"}, expect=State.SUBMITTING))
                else:
                    resubmit.append(job)
            self.store.apply(changes)
            report.adopted += sum(1 for c in changes if c.event == "adopted")
        return resubmit

    # -- 3. observe -----------------------------------------------------------------------
    def _observe(self, report: PassReport) -> None:
        active = [j for j in self.store.jobs(states=[State.QUEUED, State.RUNNING, State.UNKNOWN])
                  if j.ref]
        for name, jobs in self._group(active).items():
            try:
                seen = self.backends.get(name).poll([j.ref for j in jobs if j.ref])
            except BackendUnavailable as exc:
                report.unavailable.append(f"{name}: {exc}")
                continue
            report.polls[name] = report.polls.get(name, 0) + 1
            _crash_point("after-poll")
            changes, ended = [], []
            for job in jobs:
                obs = seen.get(job.ref or "")
                change = self._observed(job, obs)
                if change is not None:
                    changes.append(change)
                    if change.state is not None and (change.state.terminal or change.event == "retry"):
                        ended.append((job, obs))
            skipped = set(self.store.apply(changes))
            report.transitions += sum(1 for c in changes if c.state is not None)
            report.retried += sum(1 for c in changes if c.event == "retry")
            for job, obs in ended:
                if job.id not in skipped:
                    self._record_attempt(job, obs, name)

    def _observed(self, job: JobRecord, obs: Observation | None) -> Change | None:
        if obs is None:
            misses = job.misses + 1
            if misses < self.config.agent.lost_after_misses:
                return Change(job.id, None, {"misses": misses}, "", expect=job.state)
            obs = self._left_a_result(job) or self._vanished(job)
        if obs.state.terminal:
            return self._finished(job, obs)
        fields: dict[str, object] = {"misses": 0}
        if obs.reason != job.reason:
            fields["reason"] = obs.reason
        if obs.node and obs.node != job.node:
            fields["node"] = obs.node
        if obs.started_at and not job.started_at:
            fields["started_at"] = obs.started_at
        if obs.state == job.state:
            if obs.extra.get("event"):  # something the backend did (e.g. released a hold)
                return Change(job.id, None, fields, obs.extra["event"], obs.reason,
                              expect=job.state)
            quiet = fields == {"misses": 0} and job.misses == 0
            return None if quiet else Change(job.id, None, fields, "", expect=job.state)
        if obs.state == State.UNKNOWN:
            log.warning("job %s: unknown native state %r from %s", job.id, obs.native, job.backend)
        return Change(job.id, obs.state, fields, "state", obs.reason or obs.native, expect=job.state)

    def _reap(self, report: PassReport) -> None:
        """Backends that can reap (aws) terminate what no active attempt owns or what is past
        its expiry. Only backends this config defines are asked; their reap reuses the
        pass's describe when it is fresh, so a pass costs no extra call."""
        profiles = list(self.config.backends.aws.profiles)
        if not profiles:
            return
        active = {attempt_key(j.id, j.attempt) for j in self.store.jobs(states=list(ACTIVE))}
        for profile in profiles:
            backend = self.backends.get(f"aws:{profile}")
            reap = getattr(backend, "reap", None)
            if reap is None:
                continue
            try:
                reap(active)
            except GatewayError as exc:
                report.unavailable.append(f"{backend.name}: reaper: {exc}")

    def _left_a_result(self, job: JobRecord) -> Observation | None:
        """A job its backend forgot (Slurm's MinJobAge, no accounting) may still have left
        the node runner's status.json: that is its result, not LOST."""
        status = read_json(attempt_dir(self.config.jobs_path, job.id, job.attempt) / "status.json")
        return observation_from_status(job.ref or "", status) if status else None

    @staticmethod
    def _vanished(job: JobRecord) -> Observation:
        """A job its backend forgot without a result: LOST, unless it was cancelled. Slurm
        drops a pending array task at once when it is cancelled (no record is left for
        squeue), so a job whose cancel was sent and that then vanished ended CANCELLED."""
        if job.cancel_requested and job.cancel_sent_at:
            return Observation(job.ref or "", State.CANCELLED, kind="cancelled",
                               reason=f"cancelled; {job.backend} kept no record of it")
        return Observation(job.ref or "", State.LOST, kind="lost",
                           reason=f"{job.backend} no longer knows this job and left no result")

    def _finished(self, job: JobRecord, obs: Observation) -> Change:
        spec = job.spec
        outputs = json.loads(obs.extra.get("outputs", "[]"))
        fields: dict[str, object] = {
            "exit_code": obs.exit_code, "kind": obs.kind, "reason": obs.reason, "misses": 0,
            "node": obs.node or job.node, "started_at": obs.started_at or job.started_at,
            "ended_at": obs.ended_at or time.time(), "outputs_json": json.dumps(outputs),
            "provenance_json": json.dumps(self._provenance(job, obs), sort_keys=True)}
        if obs.extra.get("cost"):   # cloud backends: this attempt's cost, added to earlier ones
            fields["cost"] = round((job.cost or 0.0) + float(obs.extra["cost"]), 6)
        data = {"attempt": job.attempt, "exit_code": obs.exit_code, "kind": obs.kind}
        retry = (obs.state in RETRYABLE and obs.kind in spec.retries.on
                 and job.attempt <= spec.retries.max and not job.cancel_requested)
        if retry:
            fields.update(ref=None, not_before=0)
            return Change(job.id, State.PENDING, fields, "retry",
                          f"attempt {job.attempt} ended {obs.state.value} ({obs.reason}); "
                          f"retry {job.attempt} of {spec.retries.max}", data, expect=job.state)
        return Change(job.id, obs.state, fields, "state", obs.reason, data, expect=job.state)

    def _provenance(self, job: JobRecord, obs: Observation) -> dict[str, object]:
        base = job.provenance
        adir = attempt_dir(self.config.jobs_path, job.id, job.attempt)
        ran: dict[str, Any] = {}
        status: dict[str, Any] = {}
        for name, into in (("launch.json", ran), ("status.json", status)):
            try:
                into.update(json.loads((adir / name).read_text()))
            except (OSError, ValueError):
                pass
        base.update(spec_digest=job.spec_digest, backend=job.backend, ref=job.ref,
                    attempt=job.attempt, node=obs.node, runtime=ran.get("runtime"),
                    argv=ran.get("argv"), image=job.spec.image, exit_code=obs.exit_code,
                    started_at=obs.started_at, ended_at=obs.ended_at,
                    # read back on the node (podman's storage / the re-hashed folder)
                    image_digest=obs.extra.get("image_digest") or status.get("image_digest"))
        return base

    def _record_attempt(self, job: JobRecord, obs: Observation | None, backend: str) -> None:
        state = obs.state.value if obs else State.LOST.value
        self.store.record_attempt(
            job.id, job.attempt, backend, state=state, ref=job.ref,
            exit_code=obs.exit_code if obs else None, kind=obs.kind if obs else "lost",
            reason=obs.reason if obs else None, node=(obs.node if obs else None) or job.node,
            submitted_at=job.submitted_at, started_at=(obs.started_at if obs else None) or job.started_at,
            ended_at=(obs.ended_at if obs else None) or time.time())

    # -- 4. submit ------------------------------------------------------------------------
    def _submit(self, report: PassReport, resubmit: list[JobRecord]) -> None:
        now = time.time()
        pending = [j for j in self.store.jobs(states=[State.PENDING], newest_first=False)
                   if j.not_before <= now and not j.cancel_requested]
        intents, admitted = self._admit(pending)
        if intents:
            skipped = set(self.store.apply(intents))
            admitted = [(j, n) for j, n in admitted if j.id not in skipped]
            _crash_point("after-intent")
        fresh = [(self.store.get(j.id), n) for j, n in admitted]
        batch = [(j, self._backend_name(j)) for j in resubmit] + fresh
        by_backend: dict[str, list[JobRecord]] = defaultdict(list)
        for job, name in batch:
            by_backend[name].append(job)
        for name, jobs in by_backend.items():
            report.submitted += self._submit_to(name, jobs, report)

    def _backend_name(self, job: JobRecord) -> str:
        return job.backend or self.backends.backend_name(job.target)

    def _admit(self, pending: list[JobRecord]) -> tuple[list[Change], list[tuple[JobRecord, str]]]:
        """Decide which PENDING jobs go now (FIFO within slot limits) and write their intent."""
        usage, running = self._usage()
        limits = self.store.campaign_limits()
        changes: list[Change] = []
        admitted: list[tuple[JobRecord, str]] = []
        blocked: set[str] = set()
        self._throttles = {}
        self.broker.new_pass()
        for job in pending:
            target, decision = self._place(job, changes)
            if target is None:
                continue
            name = self.backends.backend_name(target)
            if name in blocked:
                continue
            wait = self._campaign_wait(job, target, limits, running)
            if wait is None:
                wait = self._slots(job, target, name, usage, changes)
                if wait == "refused":
                    continue
                if wait:
                    blocked.add(name)
            if wait:
                if job.reason != wait:
                    changes.append(Change(job.id, None, {"reason": wait}, "", expect=State.PENDING))
                continue
            if job.campaign and job.campaign not in self._throttles:
                running[job.campaign] = running.get(job.campaign, 0) + 1
            changes.append(self._intent(job, name, decision))
            admitted.append((job, name))
        return changes, admitted

    def _place(self, job: JobRecord, changes: list[Change]) -> tuple[str | None, Decision | None]:
        """The job's target; for ``auto`` the broker's choice (None: refused, job FAILED)."""
        if job.target != "auto":
            return job.target, None
        decision = self.broker.place(job)
        if decision.target is None:
            changes.append(Change(job.id, State.FAILED, {"kind": "refused", "reason": decision.reason,
                                  "ended_at": time.time()}, "placed", decision.reason,
                                  decision.data(), expect=State.PENDING))
        return decision.target, decision

    def _slots(self, job: JobRecord, target: str, name: str, usage: dict[str, list[int]],
               changes: list[Change]) -> str | None:
        """None when the job fits now; why it waits; or "refused" (a FAILED change added)."""
        try:
            backend = self.backends.get(target)
            check_capabilities(backend, job.spec)
        except GatewayError as exc:
            changes.append(Change(job.id, State.FAILED, {"kind": "refused", "reason": str(exc),
                           "ended_at": time.time()}, "refused", str(exc), expect=State.PENDING))
            return "refused"
        capacity = backend.capacity()
        need = (job.spec.resources.total_cpus, job.spec.resources.total_gpus)
        used = usage.setdefault(name, [0, 0])
        if capacity and (used[0] + need[0] > capacity.cpus or used[1] + need[1] > capacity.gpus):
            return f"waiting for free slots ({used[0]}/{capacity.cpus} CPUs in use)"
        used[0] += need[0]
        used[1] += need[1]
        return None

    def _intent(self, job: JobRecord, name: str, decision: Decision | None) -> Change:
        fields: dict[str, object] = {
            "attempt": job.attempt + 1, "backend": name, "ref": None, "misses": 0,
            "submitted_at": time.time(), "reason": None, "exit_code": None, "kind": None}
        message, data = f"attempt {job.attempt + 1} to {name}", None
        if decision is not None:
            provenance = {**job.provenance, "placement": decision.data()}
            fields["provenance_json"] = json.dumps(provenance, sort_keys=True)
            message, data = f"{message}: auto -> {name}: {decision.reason}", decision.data()
        return Change(job.id, State.SUBMITTING, fields, "state", message, data,
                      expect=State.PENDING)

    def _campaign_wait(self, job: JobRecord, target: str, limits: dict[str, int],
                       running: dict[str, int]) -> str | None:
        """Why a campaign member must wait for its concurrency limit, or None to go now.

        On a backend that queues jobs itself and has arrays (Slurm), the members go together
        as one array throttled to the limit (``%N``); a later batch waits until that array
        is done, so the limit holds across applies.
        """
        limit = limits.get(job.campaign or "")
        if not limit or not job.campaign:
            return None
        backend = self.backends.get(target)
        if backend.capacity() is None and backend.capabilities().arrays:
            if job.campaign in self._throttles:
                return None
            if running.get(job.campaign, 0):
                return f"campaign concurrency: waiting for its current array (limit {limit})"
            self._throttles[job.campaign] = limit
            return None
        if running.get(job.campaign, 0) >= limit:
            return f"campaign concurrency limit of {limit} reached"
        return None

    def _usage(self) -> tuple[dict[str, list[int]], dict[str, int]]:
        """CPUs and GPUs in use per backend, and active jobs per campaign."""
        usage: dict[str, list[int]] = {}
        campaigns: dict[str, int] = {}
        for job in self.store.jobs(states=list(ACTIVE)):
            res = job.spec.resources
            used = usage.setdefault(self._backend_name(job), [0, 0])
            used[0] += res.total_cpus
            used[1] += res.total_gpus
            if job.campaign:
                campaigns[job.campaign] = campaigns.get(job.campaign, 0) + 1
        return usage, campaigns

    def _submit_to(self, name: str, jobs: list[JobRecord], report: PassReport) -> int:
        backend = self.backends.get(name)
        default = _default_runtime(backend)
        requests: list[SubmitRequest] = []
        refused: list[Change] = []
        for job in list(jobs):
            try:
                request = prepare_attempt(self.config.jobs_path, job, job.attempt,
                                          job.spec.effective_runtime or default,
                                          self.config.local.kill_grace_s,
                                          getattr(backend, "launcher", None), self.config)
                throttle = self._throttles.get(job.campaign or "")
                requests.append(dataclasses.replace(request, throttle=throttle) if throttle
                                else request)
            except GatewayError as exc:  # e.g. a runtime that cannot express this job
                jobs.remove(job)
                refused.append(Change(job.id, State.FAILED, {"kind": "refused", "reason": str(exc),
                                      "ended_at": time.time()}, "refused", str(exc),
                                      expect=State.SUBMITTING))
        if refused:
            self.store.apply(refused)
        if not requests:
            return 0
        try:
            outcomes = backend.submit(requests)
        except BackendUnavailable as exc:
            report.unavailable.append(f"{name}: {exc}")
            self._back_off(jobs, str(exc))
            return 0
        _crash_point("after-submit")
        by_key = {r.key: r for r in requests}
        changes, now = [], time.time()
        for outcome in outcomes:
            job_id = by_key[outcome.key].job_id
            if outcome.ref is not None:
                changes.append(Change(job_id, State.QUEUED, {"ref": outcome.ref}, "state",
                                      f"submitted to {name} as {outcome.ref}", expect=State.SUBMITTING))
            elif outcome.transient:
                changes.append(self._backoff_change(job_id, outcome.error or "unavailable", now))
            else:
                changes.append(Change(job_id, State.FAILED, {"kind": "refused", "ended_at": now,
                                      "reason": outcome.error}, "refused", outcome.error,
                                      expect=State.SUBMITTING))
        self.store.apply(changes)
        return sum(1 for c in changes if c.state == State.QUEUED)

    def _backoff_change(self, job_id: str, why: str, now: float) -> Change:
        delays = self.config.agent.backoff_s or (5.0,)
        tries = sum(1 for e in self.store.events(job_id) if e.kind == "backoff")
        delay = delays[min(tries, len(delays) - 1)]
        return Change(job_id, None, {"not_before": now + delay, "reason": f"backend unavailable: {why}"},
                      "backoff", f"retrying submission in {delay:g} s: {why}")

    def _back_off(self, jobs: list[JobRecord], why: str) -> None:
        now = time.time()
        self.store.apply([self._backoff_change(j.id, why, now) for j in jobs])

