"""Multi-node attempts: one instance per node, one cluster placement group per attempt.

A multi-node attempt's ref is its instances' ids in node order, joined by commas
(``i-0aaa,i-0bbb``); a single-node attempt's ref stays one id. Every instance carries the
attempt key plus ``hpcgw:node``/``hpcgw:nodes`` tags, so the launcher and ``adopt`` find an
attempt's nodes by key and index (a gateway killed halfway through launching the nodes
launches only the missing ones on the next pass).

Placement groups are named after the attempt key and recorded in ``STATE/groups/`` BEFORE
they are created (so a crash cannot leak one unseen); the reaper deletes a recorded group
once its attempt is no longer active and no instance of it is left in the group.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.backends.aws import instances as inst_mod
from gateway.backends.aws.instances import InstanceView
from gateway.backends.aws.ledger import instance_cost
from gateway.backends.base import Observation
from gateway.states import State

if TYPE_CHECKING:
    from gateway.backends.aws.backend import AwsBackend

log = logging.getLogger(__name__)
SEP = ","


def split_ref(ref: str) -> list[str]:
    return [r for r in ref.split(SEP) if r]


def join_ref(ids: list[str]) -> str:
    return SEP.join(ids)


def group_name(key: str) -> str:
    """The attempt's cluster placement group (255 ASCII characters at most)."""
    return f"hpcgw-{key}"[:255]


def cost_of(nodes: list[InstanceView], end: float) -> float:
    """Sum over the nodes of price x (end - launch), each billed one minute at least."""
    return round(sum(instance_cost(v.price, end - v.launched) for v in nodes if v.launched), 6)


def live(nodes: list[InstanceView]) -> Observation:
    """All nodes live: RUNNING when every node runs, QUEUED while one is still pending."""
    states = [inst_mod.STATES.get(v.state) for v in nodes]
    head = nodes[0]
    state = State.RUNNING if all(s == State.RUNNING for s in states) else State.QUEUED
    where = ", ".join(f"{v.id} ({v.type})" for v in nodes)
    pending = [f"node {v.node} {v.state}" for v, s in zip(nodes, states) if s != State.RUNNING]
    return Observation(join_ref([v.id for v in nodes]), state, native=head.state, node=where,
                       started_at=max(v.launched for v in nodes) if state == State.RUNNING else None,
                       reason=None if state == State.RUNNING else "; ".join(pending),
                       extra={"instance_type": head.type, "market": head.market,
                              "nodes": str(len(nodes))})


def lost_node(ref: str, dead: InstanceView, nodes: list[InstanceView], now: float) -> Observation:
    """A worker ended (spot reclaimed, failed) while node 0 still runs: the attempt is lost."""
    obs = inst_mod.silent_end(dead, now, 0.0)
    cost = cost_of(nodes, now)
    return Observation(ref, obs.state, native=obs.native, kind=obs.kind,
                       reason=f"node {dead.node} ({dead.id}): {obs.reason}",
                       node=", ".join(f"{v.id} ({v.type})" for v in nodes), ended_at=now,
                       extra={**obs.extra, "cost": f"{cost:.6f}", "nodes": str(len(nodes))})


class Groups:
    """The placement groups this profile created, recorded in ``folder`` (one file each)."""

    def __init__(self, backend: "AwsBackend", folder: Path) -> None:
        self.b, self.folder = backend, folder

    def ensure(self, key: str) -> str:
        """Create (or reuse) the attempt's cluster placement group; returns its name."""
        from gateway.backends.aws.backend import AwsApiError

        name = group_name(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / name).write_text(key)          # the intent first: never leaked
        p = self.b.profile
        tags = {inst_mod.TAG_KEY: key, inst_mod.TAG_OWNER: p.owner, inst_mod.TAG_PROFILE: p.name}
        try:
            self.b.call("ec2", "create_placement_group", GroupName=name, Strategy="cluster",
                        TagSpecifications=[{"ResourceType": "placement-group",
                                            "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
        except AwsApiError as exc:
            if exc.code != "InvalidPlacementGroup.Duplicate":
                raise
        return name

    def recorded(self) -> dict[str, str]:
        try:
            return {f.name: f.read_text().strip() for f in self.folder.iterdir() if f.is_file()}
        except OSError:
            return {}

    def sweep(self, active_keys: set[str], snapshot: list[InstanceView], dry_run: bool = False) -> list[str]:
        """Delete recorded groups whose attempt is over and whose instances are all terminated."""
        from gateway.backends.aws.backend import AwsApiError

        in_use = {v.key for v in snapshot if v.state != "terminated"}
        deleted = []
        for name, key in self.recorded().items():
            if key in active_keys or key in in_use:
                continue
            if not dry_run:
                try:
                    self.b.call("ec2", "delete_placement_group", GroupName=name)
                except AwsApiError as exc:
                    if exc.code != "InvalidPlacementGroup.Unknown":
                        log.warning("%s: placement group %s not deleted yet: %s", self.b.name, name, exc)
                        continue
                (self.folder / name).unlink(missing_ok=True)
            deleted.append(name)
        return deleted
