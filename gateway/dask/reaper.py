"""Finding Dask clusters whose owner is gone, and cancelling their worker jobs.

A cluster's owner is the process that runs its scheduler (the notebook's kernel), or the
scheduler's gateway job (``scheduler="job"``). When it ends without closing the cluster, its workers lose the scheduler and exit after their
``--death-timeout``, but worker jobs still waiting in a queue would start later for
nothing: the reaper cancels every unfinished job labelled ``hpcgw.dask=<name>`` of such a
cluster, and of clusters that have jobs but no registry file at all. No dask import here:
``hpcgw dask ls`` stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.dask.control import ACTIVE_STATES, cancel_cluster_jobs
from gateway.dask.registry import Registry
from gateway.dask.workers import LABEL

if TYPE_CHECKING:
    from gateway.api import Gateway


def registry_of(gw: Gateway) -> Registry:
    return Registry(gw.config.data_path / "dask")


def active_workers(gw: Gateway) -> dict[str, list[str]]:
    """Cluster name -> ids of its unfinished worker jobs (from the store's labels)."""
    out: dict[str, list[str]] = {}
    for job in gw.store.jobs(states=ACTIVE_STATES):
        name = job.spec.labels.get(LABEL)
        if name is not None:
            out.setdefault(name, []).append(job.id)
    return out


def status(gw: Gateway) -> list[dict[str, Any]]:
    """One row per registered cluster (and per orphaned label): owner alive?, workers."""
    jobs = active_workers(gw)
    rows = []
    for rec in registry_of(gw).all():
        alive = rec.owner.alive_in(gw.store)
        rows.append({"name": rec.name, "address": rec.address, "target": rec.target,
                     "owner": rec.owner.describe(), "scheduler": rec.scheduler,
                     "owner_alive": alive, "dashboard": rec.dashboard,
                     "created_at": rec.created_at, "active_jobs": jobs.pop(rec.name, [])})
    for name, ids in sorted(jobs.items()):
        rows.append({"name": name, "address": None, "target": None, "owner": None,
                     "scheduler": None,
                     "owner_alive": False, "dashboard": None, "created_at": None,
                     "active_jobs": ids})
    return rows


def reap(gw: Gateway, *, dry_run: bool = False, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Cancel the worker jobs of clusters whose owner is gone (on this host) and forget them.
    Clusters owned on another host are left alone (their owner cannot be checked here)."""
    reg = registry_of(gw)
    reaped = []
    for row in status(gw):
        if row["owner_alive"] is not False:
            continue
        left: list[str] = []
        if not dry_run:
            left = cancel_cluster_jobs(gw, row["name"], timeout=timeout)
            if not left:
                reg.remove(row["name"])
        reaped.append({**row, "still_active": left})
    return reaped
