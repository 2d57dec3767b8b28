"""EC2 instances as the gateway sees them: tags, states, and what an ended one means.

Pure functions of describe_instances answers (and status objects), so they are unit-tested
without AWS. Every instance the gateway launches carries the tags below; ``owner`` and
``profile`` scope ``poll``, ``adopt``, the reaper and ``hpcgw cloud ls`` to this gateway's own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.attempts import observation_from_status
from gateway.backends.base import Observation
from gateway.states import State

log = logging.getLogger(__name__)

TAG_KEY, TAG_JOB, TAG_ATTEMPT = "hpcgw:key", "hpcgw:job", "hpcgw:attempt"
TAG_OWNER, TAG_PROFILE, TAG_EXPIRY = "hpcgw:owner", "hpcgw:profile", "hpcgw:expiry"
TAG_PRICE, TAG_MARKET, TAG_PROJECT = "hpcgw:price", "hpcgw:market", "hpcgw:project"
TAG_CANCELLED, TAG_REAPED = "hpcgw:cancelled", "hpcgw:reaped"
TAG_NODE, TAG_NODES, TAG_DISCARDED = "hpcgw:node", "hpcgw:nodes", "hpcgw:discarded"

# EC2 instance state -> gateway state while the instance lives; None: it has ended
STATES: dict[str, State | None] = {
    "pending": State.QUEUED, "running": State.RUNNING,
    "stopping": None, "stopped": None, "shutting-down": None, "terminated": None,
}
GONE = frozenset({"shutting-down", "terminated"})
SPOT_REASONS = ("Server.SpotInstanceTermination", "Server.SpotInstanceShutdown")


@dataclass(frozen=True)
class InstanceView:
    id: str
    state: str
    key: str
    type: str
    zone: str
    market: str
    price: float
    launched: float
    expiry: float
    project: str | None = None
    cancelled: bool = False
    reaped: bool = False
    reason_code: str = ""
    node: int = 0            # multi-node attempts: this instance's node index
    nodes: int = 1           # and how many nodes the attempt has
    discarded: bool = False  # terminated by the launcher after a capacity error on a sibling

    @property
    def alive(self) -> bool:
        return self.state not in GONE

    def cost_so_far(self, now: float) -> float:
        from gateway.backends.aws.ledger import instance_cost

        return instance_cost(self.price, max(0.0, now - self.launched))


def _epoch(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def view(inst: dict[str, Any]) -> InstanceView:
    tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
    return InstanceView(
        id=inst["InstanceId"], state=inst.get("State", {}).get("Name", "unknown"),
        key=tags.get(TAG_KEY, ""), type=inst.get("InstanceType", ""),
        zone=inst.get("Placement", {}).get("AvailabilityZone", ""),
        market=tags.get(TAG_MARKET) or ("spot" if inst.get("InstanceLifecycle") == "spot" else "on-demand"),
        price=_epoch(tags.get(TAG_PRICE)), launched=_epoch(inst.get("LaunchTime")),
        expiry=_epoch(tags.get(TAG_EXPIRY)), project=tags.get(TAG_PROJECT) or None,
        cancelled=TAG_CANCELLED in tags, reaped=TAG_REAPED in tags,
        reason_code=str(inst.get("StateReason", {}).get("Code", "")),
        node=int(_epoch(tags.get(TAG_NODE))), nodes=max(1, int(_epoch(tags.get(TAG_NODES)) or 1)),
        discarded=TAG_DISCARDED in tags)


def views(pages: list[dict[str, Any]]) -> list[InstanceView]:
    return [view(i) for page in pages for r in page.get("Reservations", []) for i in r["Instances"]]


def newest_by_key(found: list[InstanceView]) -> dict[str, InstanceView]:
    """One instance per attempt key: a live one before an ended one, then the newest."""
    best: dict[str, InstanceView] = {}
    for inst in sorted(found, key=lambda v: (v.alive, v.launched)):
        if inst.key and inst.node == 0 and not inst.discarded:
            best[inst.key] = inst
    return best


def nodes_by_key(found: list[InstanceView]) -> dict[str, dict[int, InstanceView]]:
    """key -> node index -> instance (a live one before an ended one, then the newest);
    instances the launcher discarded are left out."""
    best: dict[str, dict[int, InstanceView]] = {}
    for inst in sorted(found, key=lambda v: (v.alive, v.launched)):
        if inst.key and not inst.discarded:
            best.setdefault(inst.key, {})[inst.node] = inst
    return best


def complete(nodes: dict[int, InstanceView]) -> bool:
    """Every node of the attempt was launched."""
    want = max((v.nodes for v in nodes.values()), default=1)
    return set(nodes) >= set(range(want))


def live_observation(inst: InstanceView) -> Observation:
    state = STATES.get(inst.state)
    if state is None:
        raise ValueError(f"{inst.id} has ended")
    return Observation(inst.id, state, native=inst.state, node=f"{inst.id} ({inst.type})",
                       started_at=inst.launched if state == State.RUNNING else None,
                       reason=None if state == State.RUNNING else f"instance {inst.state}",
                       extra={"instance_type": inst.type, "market": inst.market})


def finished_observation(inst: InstanceView, status: dict[str, Any], cost: float) -> Observation:
    """An attempt whose instance sent its status object."""
    obs = observation_from_status(inst.id, status)
    kind, state = obs.kind, obs.state
    if status.get("outcome") == "preempted":
        state, kind = State.FAILED, "preempted"
    extra = {**obs.extra, "cost": f"{cost:.6f}", "instance_type": inst.type, "market": inst.market}
    return Observation(inst.id, state, native=str(status.get("outcome")), kind=kind,
                       exit_code=obs.exit_code, reason=obs.reason, node=f"{inst.id} ({inst.type})",
                       started_at=obs.started_at or inst.launched, ended_at=obs.ended_at, extra=extra)


def silent_end(inst: InstanceView, now: float, cost: float) -> Observation:
    """An instance that ended without a status object: why, as a state and failure kind."""
    extra = {"cost": f"{cost:.6f}", "instance_type": inst.type, "market": inst.market}
    node = f"{inst.id} ({inst.type})"
    if inst.cancelled:
        return Observation(inst.id, State.CANCELLED, native=inst.state, kind="cancelled",
                           reason="cancelled: instance terminated", node=node, ended_at=now, extra=extra)
    if inst.reason_code in SPOT_REASONS:
        return Observation(inst.id, State.FAILED, native=inst.reason_code, kind="preempted",
                           reason="spot instance reclaimed before it reported", node=node,
                           ended_at=now, extra=extra)
    if inst.reaped or (inst.expiry and now >= inst.expiry):
        return Observation(inst.id, State.FAILED, native=inst.state, kind="lost",
                           reason="the instance never reported; reaped at its expiry", node=node,
                           ended_at=now, extra=extra)
    return Observation(inst.id, State.FAILED, native=inst.state, kind="node_fail",
                       reason=f"instance {inst.state} ({inst.reason_code or 'no reason given'}) "
                              "without reporting", node=node, ended_at=now, extra=extra)
