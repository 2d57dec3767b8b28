"""The Slurm backend: sbatch, squeue, sacct, scancel and sinfo, each called as rarely as it can.

How it spares slurmctld: ONE ``squeue`` per poll for all refs (plus ONE ``sacct`` for refs that
left the queue, only where accounting works), ONE ``scancel`` for many refs, ONE ``squeue``
per ``adopt``, ``sinfo`` at most once per ``capabilities_ttl``, and many same-shape requests
go in as ONE job array. No call is retried here: an unreachable controller is reported as
BackendUnavailable (or transient outcomes) and the reconciler backs off.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import replace
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from pathlib import Path

from gateway import proc
from gateway.backends.base import Capabilities, Capacity, Observation, SubmitOutcome, SubmitRequest
from gateway.backends.slurm import query, site
from gateway.backends.slurm.profile import SlurmProfile
from gateway.backends.slurm.results import Results, write_manifest
from gateway.backends.slurm.script import (
    ARRAY_COMMENT,
    render_array,
    render_sbatch,
    resource_directives,
)
from gateway.errors import BackendUnavailable, CapabilityError
from gateway.states import State

log = logging.getLogger(__name__)

ARRAY_CHUNK = 500        # tasks per array: below Slurm's default MaxArraySize (1001)
TIMEOUT = 60.0           # seconds a client command may take before we call it unreachable
TRANSIENT = ("unable to contact slurm controller", "socket timed out", "connection refused",
             "zero bytes were transmitted", "communication connection failure",
             "temporarily unable", "resource temporarily unavailable", "not responding",
             "slurm_load_", "munge", "protocol authentication error", "try again")
UNKNOWN_JOB = ("invalid job id", "does not exist", "already completing or completed")
NO_ACCOUNTING = ("accounting storage is disabled", "accounting_storage/none")
# squeue's reason for a job whose launch failed (a node's prolog failed, slurmd could not
# start it): Slurm requeues it with priority 0, and it waits for `scontrol release`
LAUNCH_HELD = "launch failed requeued held"


def is_transient(stderr: str) -> bool:
    """The controller could not be reached (not: it answered that a job is unknown)."""
    low = stderr.lower()
    return not _unknown_job(low) and any(word in low for word in TRANSIENT)


Runner = Callable[..., proc.Result]


class SlurmBackend:
    """Runs attempts as Slurm batch jobs named by their key (``hpcgw.<job_id>.<attempt>``).

    ``run`` replaces ``gateway.proc.run`` (same signature) for tests that script Slurm's answers.
    """

    def __init__(self, profile: SlurmProfile, *, env: Mapping[str, str] | None = None,
                 run: Runner | None = None) -> None:
        self.profile = profile
        self.name = f"slurm:{profile.name}"
        self.env = {**profile.env, **dict(env or {})}
        self._runner: Runner = run or proc.run
        self.calls: Counter[str] = Counter()   # client calls by command, for tests/benchmarks
        self._site: dict[str, site.Partition] | None = None
        self._site_at = 0.0
        self._accounting: bool | None = None   # None: not known yet
        self._results = Results()

    @property
    def default_runtime(self) -> str:
        """The runtime for jobs with an image and no runtime of their own."""
        return self.profile.runtime

    # -- running client commands --------------------------------------------------------
    def _run(self, argv: list[str], *, timeout: float = TIMEOUT) -> proc.Result:
        """Run one Slurm client command; unreachable controller -> BackendUnavailable."""
        self.calls[argv[0]] += 1
        res = self._runner(argv, env=self.env, timeout=timeout, check=False)
        if res.returncode != 0 and is_transient(res.stderr):
            raise BackendUnavailable(f"{argv[0]}: {res.stderr.strip() or 'no answer'}")
        return res

    # -- capabilities -------------------------------------------------------------------
    def _partitions(self) -> dict[str, site.Partition]:
        now = time.monotonic()
        if self._site is None or now - self._site_at > self.profile.capabilities_ttl:
            res = self._run(list(site.SINFO_ARGV))
            if res.returncode != 0:
                raise BackendUnavailable(f"sinfo failed: {res.stderr.strip()}")
            self._site, self._site_at = site.parse_sinfo(res.stdout), now
        return self._site

    def _profile_partitions(self, names: Sequence[str | None]) -> list[site.Partition]:
        parts = self._partitions()
        chosen = []
        for name in names:
            if name is None:
                chosen += [p for p in parts.values() if p.default]
            elif name in parts:
                chosen.append(parts[name])
        return chosen

    def _caps(self, names: Sequence[str | None]) -> Capabilities:
        runtimes = frozenset({"host", self.profile.runtime})
        return site.capabilities_of(self._profile_partitions(names),
                                    max_walltime=self.profile.max_walltime, runtimes=runtimes)

    def capabilities(self) -> Capabilities:
        """Union over the partitions this profile submits to (one cached ``sinfo``)."""
        names = [self.profile.partition, *self.profile.gpu_partitions.values()]
        return self._caps(list(dict.fromkeys(names)))

    def capacity(self) -> Capacity | None:
        return None  # Slurm queues by itself

    def estimate_wait(self, spec: Any) -> tuple[float, str]:
        """Seconds until a job like ``spec`` would start, and how that was reckoned.

        ONE ``squeue`` of the whole queue. If free CPUs suffice and nothing is pending,
        zero; otherwise a fluid model of the partition: the CPU-seconds still owed to running
        jobs (time left) and pending ones (time limit), drained by all the partition's CPUs.
        """
        part = self._profile_partitions([self.profile.partition_for(spec.resources.gpus.count,
                                                                    spec.resources.gpus.type)])
        total = sum(p.cpus for p in part) or 1
        res = self._run(["squeue", "-h", "-o", "%T|%C|%L|%l"])
        if res.returncode != 0:
            raise BackendUnavailable(f"squeue failed: {res.stderr.strip()}")
        busy = owed = 0.0
        pending = 0
        for line in res.stdout.splitlines():
            state, cpus, left, limit = (line.split("|") + ["", "", "", ""])[:4]
            n = int(cpus) if cpus.isdigit() else 1
            if state == "RUNNING":
                busy += n
                owed += n * _seconds(left)
            elif state == "PENDING":
                pending += 1
                owed += n * _seconds(limit)
        need = spec.resources.total_cpus
        if pending == 0 and total - busy >= need:
            return 0.0, f"{int(total - busy)} of {total} CPUs free, nothing pending"
        return owed / total, (f"{pending} pending, {int(busy)}/{total} CPUs busy: "
                              f"{owed / 3600:.1f} CPU-hours owed")

    def _check(self, request: SubmitRequest) -> None:
        """CapabilityError when the request's own partition cannot run it."""
        gpus = request.spec.resources.gpus
        partition = self.profile.partition_for(gpus.count, gpus.type)
        if partition is not None and partition not in self._partitions():
            raise CapabilityError(f"{self.name}: partition {partition!r} does not exist "
                                  f"(known: {', '.join(sorted(self._partitions()))})")
        self._caps([partition]).check(request.spec, self.name)

    # -- submit -------------------------------------------------------------------------
    def submit(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]:
        """sbatch each shape group once (an array when it holds more than one request)."""
        try:
            self._partitions()   # one cached sinfo for every check below
        except BackendUnavailable as exc:
            return [SubmitOutcome(r.key, error=str(exc), transient=True) for r in requests]
        outcomes: dict[str, SubmitOutcome] = {}
        groups: dict[tuple[str, ...], list[SubmitRequest]] = {}
        for req in requests:
            try:
                self._check(req)
                shape = (*resource_directives(req, self.profile), f"throttle={req.throttle}")
            except CapabilityError as exc:
                outcomes[req.key] = SubmitOutcome(req.key, error=str(exc))
                continue
            groups.setdefault(shape, []).append(req)
        down: str | None = None
        for group in groups.values():
            for start in range(0, len(group), ARRAY_CHUNK):
                chunk = group[start:start + ARRAY_CHUNK]
                if down is not None:  # the controller just failed: do not knock again
                    outcomes.update({r.key: SubmitOutcome(r.key, error=down, transient=True)
                                     for r in chunk})
                    continue
                result = self._submit_chunk(chunk)
                outcomes.update({o.key: o for o in result})
                down = next((o.error for o in result if o.transient), None)
        return [outcomes[r.key] for r in requests]

    def _submit_chunk(self, chunk: list[SubmitRequest]) -> list[SubmitOutcome]:
        try:
            if len(chunk) == 1:
                text = render_sbatch(chunk[0], self.profile)
            else:
                limits = [t for t in (self.profile.array_throttle, chunk[0].throttle) if t]
                text = render_array(chunk, self.profile, throttle=min(limits) if limits else None)
        except CapabilityError as exc:
            if len(chunk) == 1:
                return [SubmitOutcome(chunk[0].key, error=str(exc))]
            return [o for r in chunk for o in self._submit_chunk([r])]
        try:
            for req in chunk:
                Path(req.attempt_dir).mkdir(parents=True, exist_ok=True)
                (Path(req.attempt_dir) / "job.sbatch").write_text(text)
            if len(chunk) > 1:
                write_manifest(chunk)
        except OSError as exc:
            why = f"cannot write the batch script: {exc}"
            return [SubmitOutcome(r.key, error=why) for r in chunk]
        script = Path(chunk[0].attempt_dir) / "job.sbatch"
        try:
            res = self._run(["sbatch", "--parsable", str(script)])
        except BackendUnavailable as exc:
            return [SubmitOutcome(r.key, error=str(exc), transient=True) for r in chunk]
        if res.returncode != 0:
            why = " ".join(res.stderr.split()) or f"sbatch exited {res.returncode}"
            return [SubmitOutcome(r.key, error=f"sbatch refused the job: {why}") for r in chunk]
        job_id = res.stdout.strip().split(";")[0]
        if len(chunk) == 1:
            return [SubmitOutcome(chunk[0].key, ref=job_id)]
        return [SubmitOutcome(r.key, ref=f"{job_id}_{i}") for i, r in enumerate(chunk)]

    # -- poll ---------------------------------------------------------------------------
    def poll(self, refs: Sequence[str]) -> dict[str, Observation]:
        """ONE squeue for every ref; ONE sacct for those that left the queue (if accounting)."""
        refs = list(dict.fromkeys(r for r in refs if r))
        if not refs:
            return {}
        res = self._run(query.squeue_poll_argv(refs))
        if res.returncode != 0 and not _unknown_job(res.stderr):
            raise BackendUnavailable(f"squeue failed: {res.stderr.strip()}")
        rows = query.parse_rows(res.stdout, query.POLL_FIELDS)
        found = query.observations(rows, refs, exit_field="exit_code")
        held = {ref: obs for ref, obs in found.items()
                if obs.state is State.QUEUED and (obs.reason or "").lower() == LAUNCH_HELD}
        if held:
            found.update(self._launch_failed(held))
        missing = [r for r in refs if r not in found]
        if missing and self._accounting is not False:
            found.update(self._sacct(missing))
        return {ref: self._results.add_outputs(obs) for ref, obs in found.items()}

    def _launch_failed(self, held: dict[str, Observation]) -> dict[str, Observation]:
        """Jobs Slurm held after a failed launch: ONE ``scontrol release`` for those
        requeued at most ``profile.launch_releases`` times (the node that failed is
        drained, so the job can start elsewhere), ONE ``scancel`` for the others, whose
        attempts fail as ``node_fail`` (a retry policy may then start a new one). Before
        either, a held job waited until someone released it by hand."""
        limit = self.profile.launch_releases
        times = {ref: int(obs.extra.get("restarts", "1")) for ref, obs in held.items()}
        release = [ref for ref in held if times[ref] <= limit]
        give_up = [ref for ref in held if times[ref] > limit]
        out: dict[str, Observation] = {}
        if release:
            res = self._run(["scontrol", "release", ",".join(release)])
            if res.returncode != 0:  # left held, with Slurm's reason; asked again next poll
                log.warning("%s: scontrol release %s refused: %s", self.name,
                            ",".join(release), res.stderr.strip())
            else:
                log.info("%s: released %s (held after a failed launch)", self.name, release)
                out.update({ref: replace(held[ref], reason=(
                    f"{LAUNCH_HELD}; released by hpcgw ({times[ref]} of {limit})"),
                    extra={**held[ref].extra, "event": "released"}) for ref in release})
        if give_up:
            self.cancel(give_up)
            now = time.time()
            out.update({ref: replace(held[ref], state=State.FAILED, kind="node_fail",
                                     native="LAUNCH_FAILED", ended_at=now, reason=(
                                         f"launch failed {times[ref]} times (Slurm held the "
                                         f"job each time, released {limit}); cancelled"))
                        for ref in give_up})
        return out

    def _sacct(self, refs: list[str]) -> dict[str, Observation]:
        res = self._run(query.sacct_argv(refs))
        if res.returncode != 0:
            if any(w in res.stderr.lower() for w in NO_ACCOUNTING):
                self._accounting = False
                log.info("%s: no Slurm accounting; finished jobs are seen only while in "
                         "slurmctld's memory (MinJobAge)", self.name)
                return {}
            raise BackendUnavailable(f"sacct failed: {res.stderr.strip()}")
        self._accounting = True
        rows = query.parse_rows(res.stdout, query.SACCT_FIELDS)
        return query.observations(rows, refs, exit_field="ExitCode")

    # -- cancel / adopt / logs ----------------------------------------------------------
    def cancel(self, refs: Sequence[str]) -> None:
        """ONE scancel for all refs; refs Slurm no longer knows are not an error.

        An unreachable controller raises BackendUnavailable. Any other refusal (e.g. a job of
        another user) is logged, not raised: scancel has cancelled the others, and the
        reconciler asks again later for jobs that keep running.
        """
        refs = list(dict.fromkeys(r for r in refs if r))
        if not refs:
            return
        res = self._run(["scancel", *refs])
        if res.returncode != 0 and not _unknown_job(res.stderr):
            log.warning("%s: scancel refused some of %s: %s", self.name, refs,
                        " | ".join(res.stderr.strip().splitlines()[-3:]))

    def adopt(self, keys: Sequence[str]) -> dict[str, str]:
        """key -> ref for attempts Slurm already has: ONE squeue of this user's jobs.

        Plain jobs are found by name (= key); array tasks through their array's manifest.
        """
        wanted = set(keys)
        if not wanted:
            return {}
        res = self._run(query.squeue_adopt_argv())
        if res.returncode != 0:
            raise BackendUnavailable(f"squeue failed: {res.stderr.strip()}")
        found: dict[str, str] = {}
        for row in query.parse_rows(res.stdout, query.ADOPT_FIELDS):
            key = row.get("Name")
            index = row.get("ArrayTaskID")
            if (row.get("Comment") or "").startswith(ARRAY_COMMENT) and index is not None:
                task = self._results.task(row.get("WorkDir"), int(index))
                key = task["key"] if task else None
            if key in wanted and key not in found:
                found[key] = row.ref
        return found

    def log_paths(self, ref: str, attempt_dir: Path) -> dict[str, Path]:
        return {"stdout": Path(attempt_dir) / "stdout", "stderr": Path(attempt_dir) / "stderr"}


def _seconds(text: str) -> float:
    """squeue's time left / limit; unlimited or unreadable counts as a day."""
    try:
        value = site.slurm_limit(text)
    except ValueError:
        value = None
    return float(value if value is not None else 86400)


def _unknown_job(stderr: str) -> bool:
    low = stderr.lower()
    return bool(low) and all(any(w in line for w in UNKNOWN_JOB)
                             for line in low.splitlines() if line.strip())
