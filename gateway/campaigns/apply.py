"""Plan and apply a campaign: converge the store to the file, like a controller.

``plan`` compares the members the file asks for with the jobs the store holds for the
campaign and decides, per member: submit (new), cached (an identical result exists),
keep (running or queued), done (succeeded), failed (ended, retries used), replace (the file
changed this member: new spec digest; the old job is cancelled if still active), refused
(budget or deadline). Members the file no longer lists are removed (cancelled if active).
``apply`` carries a plan out in ONE store transaction for all new jobs, under a per-campaign
lock, so overlapping cron runs and killed applies neither duplicate nor lose a member.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from gateway.campaigns.spec import CampaignSpec, expand, member_key, render_member
from gateway.errors import GatewayError
from gateway.states import TERMINAL, State
from gateway.store import JobRecord

if TYPE_CHECKING:
    from gateway.api import Gateway


class CampaignLocked(GatewayError):
    """Another apply of the same campaign holds its lock."""

    exit_code = 0


@dataclass
class Action:
    kind: str
    member: str
    params: dict[str, Any]
    spec: Any = None
    job: JobRecord | None = None
    reason: str = ""
    hashes: dict[str, str] | None = None   # input content hashes, computed once per apply


@dataclass
class Plan:
    campaign: CampaignSpec
    actions: list[Action] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for action in self.actions:
            out[action.kind] = out.get(action.kind, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"campaign": self.campaign.campaign, "counts": self.counts(),
                "actions": [{"kind": a.kind, "member": a.member, "params": a.params,
                             "job": a.job.id if a.job else None, "reason": a.reason}
                            for a in self.actions]}


def core_hours(job: JobRecord, *, worst_case: bool) -> float:
    res = job.spec.resources
    if job.cached_from:
        return 0.0
    if worst_case or not (job.started_at and job.ended_at):
        seconds = res.walltime if worst_case or not job.state.terminal else 0
    else:
        seconds = job.ended_at - job.started_at
    return seconds * res.total_cpus / 3600.0


def _spent(jobs: list[JobRecord]) -> float:
    return sum(core_hours(j, worst_case=not j.state.terminal) for j in jobs)


def _member_money(gw: "Gateway", job_spec: Any) -> float:
    """The most one member can cost where it would run (cloud: the catalog price for its
    walltime plus boot and grace; Slurm and local: nothing)."""
    where = gw.plan(job_spec)
    return float(where.get("max_cost") or 0.0)


def _spent_money(gw: "Gateway", jobs: list[JobRecord]) -> float:
    """Money spent by finished members, plus the most the unfinished ones can still cost."""
    spent = sum(j.cost or 0.0 for j in jobs if j.state.terminal)
    return spent + sum(_member_money(gw, j.spec) for j in jobs if not j.state.terminal)


def plan(gw: "Gateway", spec: CampaignSpec, base_dir: Path, *, cache: bool = True) -> Plan:
    result = Plan(spec)
    existing: dict[str, list[JobRecord]] = {}
    for job in gw.store.campaign_jobs(spec.campaign):
        existing.setdefault(job.member or "", []).append(job)
    jobs = [j for js in existing.values() for j in js]
    budget_left = None
    if spec.budget.core_hours is not None:
        budget_left = spec.budget.core_hours - _spent(jobs)
    money_left = None
    if spec.budget.money is not None:
        money_left = spec.budget.money - _spent_money(gw, jobs)
    past_deadline = spec.deadline is not None and datetime.now(timezone.utc) > _aware(spec.deadline)
    wanted = set()
    for params in expand(spec, base_dir):
        key = member_key(params)
        wanted.add(key)
        job_spec = _with_retries(spec, render_member(spec, params, base_dir))
        action = _decide(key, params, job_spec, existing.get(key, []))
        if action.kind in ("submit", "replace"):
            why = "deadline passed" if past_deadline else None
            hours = job_spec.resources.walltime * job_spec.resources.total_cpus / 3600.0
            money = _member_money(gw, job_spec) if money_left is not None else 0.0
            if why is None and budget_left is not None and hours > budget_left + 1e-9:
                why = f"budget: {hours:.2f} core-hours needed, {max(budget_left, 0):.2f} left"
            if why is None and money_left is not None and money > money_left + 1e-9:
                why = f"budget: ${money:.4f} needed at most, ${max(money_left, 0):.4f} left"
            if why:
                action = Action("refused", key, params, job_spec, action.job, why)
            else:
                budget_left = None if budget_left is None else budget_left - hours
                money_left = None if money_left is None else money_left - money
        result.actions.append(action)
    for key, jobs in existing.items():
        if key not in wanted and not jobs[-1].state.terminal:
            result.actions.append(Action("remove", key, json.loads("{}"), None, jobs[-1],
                                         "no longer in the campaign file"))
    if cache:
        _mark_cached(gw, result)
    return result


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _with_retries(spec: CampaignSpec, job_spec: Any) -> Any:
    if "retries" in spec.template:
        return job_spec
    return job_spec.model_copy(update={"retries": spec.retries})


def _decide(key: str, params: dict[str, Any], job_spec: Any, jobs: list[JobRecord]) -> Action:
    if not jobs:
        return Action("submit", key, params, job_spec)
    latest = jobs[-1]
    if latest.spec_digest != job_spec.spec_digest:
        return Action("replace", key, params, job_spec, latest, "the member's spec changed")
    if latest.state == State.SUCCEEDED:
        return Action("done", key, params, job_spec, latest)
    if latest.state not in TERMINAL:
        return Action("keep", key, params, job_spec, latest)
    return Action("failed", key, params, job_spec, latest, latest.reason or latest.state.value)


def _mark_cached(gw: "Gateway", result: Plan) -> None:
    from gateway.cache import result_key
    from gateway.hashing import path_sha256

    for action in result.actions:
        if action.kind in ("submit", "replace") and action.spec is not None:
            hashes = {i.name: path_sha256(i.source) for i in action.spec.inputs if not i.is_remote}
            action.hashes = hashes
            key = result_key(action.spec, hashes)
            if key and gw.store.find_result(key):
                action.reason = (action.reason + "; " if action.reason else "") + "cached result"
                action.kind = "cached" if action.kind == "submit" else action.kind


@contextmanager
def campaign_lock(gw: "Gateway", name: str) -> Iterator[None]:
    folder = gw.config.data_path / "campaigns"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CampaignLocked(f"another apply of campaign {name!r} is running; skipped") from None
        yield
    finally:
        os.close(fd)


def apply(gw: "Gateway", spec: CampaignSpec, base_dir: Path, *, cache: bool = True,
          start: bool = True) -> Plan:
    """Converge the store to the campaign file; returns the plan that was carried out."""
    with campaign_lock(gw, spec.campaign):
        result = plan(gw, spec, base_dir, cache=cache)
        gw.store.save_campaign(spec.campaign, spec.model_dump_json(), spec.concurrency,
                               spec.budget.core_hours, spec.budget.money)
        stale = [a.job.id for a in result.actions
                 if a.kind in ("replace", "remove") and a.job and not a.job.state.terminal]
        if stale:
            gw.store.request_cancel(stale)
        fresh = [a for a in result.actions if a.kind in ("submit", "replace", "cached")]
        new = [a.spec for a in fresh]
        if new:
            known = [a.hashes for a in fresh]
            gw.record(new, cache=cache, hashes=known if all(h is not None for h in known) else None)
            if os.environ.get("HPCGW_TEST_CRASH_AT") == "campaign-after-record":
                os._exit(99)
    if start and (new or stale):
        gw.reconcile()
    return result


def status(gw: "Gateway", name: str) -> dict[str, Any]:
    jobs = gw.store.campaign_jobs(name)
    latest: dict[str, JobRecord] = {}
    for job in jobs:
        latest[job.member or job.id] = job
    counts: dict[str, int] = {}
    for job in latest.values():
        label = "CACHED" if job.cached_from else job.state.value
        counts[label] = counts.get(label, 0) + 1
    done = [j for j in latest.values() if j.state.terminal and j.started_at and j.ended_at]
    remaining = sum(1 for j in latest.values() if not j.state.terminal)
    spans = [float(j.ended_at or 0) - float(j.started_at or 0) for j in done]
    mean = sum(spans) / len(spans) if spans else None
    info = gw.store.campaign(name) or {}
    lanes = max(1, info.get("concurrency") or gw.config.local_cpus)
    return {"campaign": name, "members": len(latest), "jobs": len(jobs), "counts": counts,
            "core_hours": round(sum(core_hours(j, worst_case=False) for j in jobs), 4),
            "budget_core_hours": info.get("core_hours"),
            "eta_s": None if mean is None else round(mean * remaining / lanes, 1),
            "remaining": remaining, "updated": time.time()}
