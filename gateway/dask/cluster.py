"""``GatewayCluster``: a Dask cluster whose workers are gateway jobs, on any backend.

Built on dask-jobqueue's ``JobQueueCluster`` (scale, adapt, worker naming, the scheduler
beside the notebook) with ``GatewayJob`` as its job class. On top of that it

- renews walltime-limited workers ahead of time (see ``renewal.py``),
- runs a reconciler pass every ``reconcile_interval`` seconds, so its jobs move on even
  without ``hpcgw agent`` (one squeue per pass on Slurm, whatever the number of workers),
- records itself in ``DATA_DIR/dask/<name>.json`` (scheduler address, owner) so another
  process can reattach and ``hpcgw dask reap`` can clean up after a dead notebook,
- on close, cancels every job labelled with its name and waits until the backend confirms.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from dask.utils import parse_bytes
from dask_jobqueue.core import JobQueueCluster
from distributed.core import Status
from distributed.deploy.spec import SpecCluster
from tornado.ioloop import PeriodicCallback

from gateway.dask.control import Control, cancel_cluster_jobs
from gateway.dask.job import GatewayJob
from gateway.dask.registry import ClusterRecord, Owner, Registry
from gateway.dask.renewal import Renewal
from gateway.dask.scheduler_job import RemoteScheduler, dashboard_of
from gateway.dask.workers import WorkerPlan

log = logging.getLogger("hpcgw.dask")
TICK_S = 1.0


class GatewayCluster(JobQueueCluster):
    """Workers are gateway jobs (``hpcgw ls -l hpcgw.dask=NAME``); see ``Gateway.dask_cluster``."""

    job_cls = GatewayJob

    def __init__(self, plan: WorkerPlan, control: Control, registry: Registry, *,
                 n_workers: int = 0, reconcile_interval: float = 5.0,
                 scheduler_options: dict[str, Any] | None = None,
                 remote: tuple[Owner, dict[str, Any]] | None = None, **kwargs: Any) -> None:
        """``remote``: (the scheduler job as owner, its scheduler file) when the scheduler
        runs as a gateway job (``scheduler="job"``) instead of in this process."""
        self.worker_plan, self.control, self.registry = plan, control, registry
        self.remote = remote
        self.reconcile_interval = reconcile_interval
        self.renewal = Renewal(renew_after=plan.renew_after)
        self._ticker: PeriodicCallback | None = None
        self._next_pass = 0.0
        self._swept = False
        options = {"dashboard_address": ":0", **(scheduler_options or {})}
        if remote is not None:
            kwargs["scheduler_cls"] = RemoteScheduler
            options = {"address": remote[1]["address"]}
        super().__init__(n_workers=n_workers, name=plan.cluster, plan=plan, control=control,
                         scheduler_options=options, **kwargs)
        if remote is not None:   # outlives this process: not closed at interpreter exit
            self.shutdown_on_close = False

    # -- names and counts -----------------------------------------------------------------
    def _new_worker_name(self, worker_number: int) -> str:
        return f"{self.worker_plan.cluster}-{worker_number}"

    def new_worker_spec(self) -> dict[str, Any]:
        """Never reuse a name: a worker's name is its job's name and its renewal key."""
        name = self._new_worker_name(self._i)
        self._i += 1
        return {name: self.new_spec}

    @property
    def plan_names(self) -> set[str]:
        return set(super().plan)

    @property
    def plan(self) -> set[str]:  # type: ignore[override]
        """What ``adapt`` counts: a worker being renewed and its replacement count once."""
        return set(super().plan) - set(self.renewal.renewing)

    def scale(self, n: int | None = None, jobs: int = 0, memory: str | None = None,  # type: ignore[override]
              cores: int | None = None) -> Any:
        """Ask for ``n`` workers (one per job; workers being renewed are not counted twice)."""
        n = jobs if n is None else n
        if memory is not None:
            n = max(n, math.ceil(parse_bytes(memory) / self._memory_per_worker()))
        if cores is not None:
            n = max(n, math.ceil(cores / self._threads_per_worker()))
        extra = 0
        if n > 0 and self.status == Status.running:
            extra = sum(1 for old in self.renewal.renewing if old in self.worker_spec)
        else:
            self.renewal.clear()
        return SpecCluster.scale(self, n + extra)

    async def _correct_state_internal(self) -> None:
        """Retire workers leaving the plan gracefully first (their data moves to the others).

        SpecCluster asks the scheduler to retire them by *address* while passing worker
        names, which matches nothing: the job would then be cancelled with its data still
        on it. We retire them by name, then let SpecCluster close their jobs.
        """
        leaving = sorted(set(self.workers) - set(self.worker_spec))
        scheduler = self.scheduler
        if leaving and self.scheduler_comm is not None and scheduler is not None \
                and scheduler.status == Status.running:
            try:
                await self.scheduler_comm.retire_workers(names=leaving, remove=True,
                                                         close_workers=True)
            except Exception:
                log.exception("dask cluster %s: retiring %s failed", self.worker_plan.cluster,
                              leaving)
        await super()._correct_state_internal()

    # -- life cycle -----------------------------------------------------------------------
    async def _start(self) -> None:
        await super()._start()
        plan = self.worker_plan
        address = str(getattr(self.scheduler, "address", ""))
        owner, dashboard = Owner.me(), self._dashboard()
        if self.remote is not None:
            owner, dashboard = self.remote[0], dashboard_of(self.remote[1])
        self.registry.write(ClusterRecord(
            name=plan.cluster, address=address, target=plan.target, owner=owner,
            dashboard=dashboard, scheduler="local" if self.remote is None else "job",
            options={"walltime": plan.walltime, "lifetime": plan.lifetime,
                     "nthreads": plan.nthreads, "image": plan.image}))
        self._ticker = PeriodicCallback(self._tick, TICK_S * 1000)
        self._ticker.start()

    def _dashboard(self) -> str | None:
        try:
            return str(self.dashboard_link) or None
        except Exception:  # no dashboard (bokeh missing): nothing to record
            return None

    async def _close(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        try:
            await self._forget_ended_scheduler()
            await super()._close()
        finally:
            await self._sweep()

    async def _forget_ended_scheduler(self) -> None:
        """A scheduler job that already ended (closed from another process, walltime): do
        not talk to it on close (each call would wait for a connect timeout)."""
        if self.remote is None or self.status != Status.running or self.scheduler is None:
            return
        owner = self.remote[0]
        await self.control.reconcile()
        if await self.control.acall(lambda gw: owner.alive_in(gw.store)) is not False:
            return
        log.info("dask cluster %s: its scheduler job %s has ended", self.worker_plan.cluster,
                 owner.job_id)
        self.scheduler.status = Status.closed
        if self.scheduler_comm is not None:
            await self.scheduler_comm.close_rpc()
            self.scheduler_comm = None

    async def _sweep(self) -> None:
        """Cancel whatever job of this cluster is left; forget the cluster."""
        if self._swept:
            return
        self._swept = True
        try:
            name = self.worker_plan.cluster
            left = await self.control.acall(lambda gw: cancel_cluster_jobs(gw, name))
            if not left:
                self.registry.remove(self.worker_plan.cluster)
        except Exception:
            log.exception("dask cluster %s: final cancel failed; run `hpcgw dask reap`",
                          self.worker_plan.cluster)
        finally:
            self.control.close()

    # -- the periodic tick ----------------------------------------------------------------
    async def _tick(self) -> None:
        if self.status != Status.running:
            return
        try:
            self._renew(time.time())
            if time.monotonic() >= self._next_pass:
                self._next_pass = time.monotonic() + self.reconcile_interval
                await self.control.reconcile()
        except Exception:
            log.exception("dask cluster %s: tick failed", self.worker_plan.cluster)

    def _renew(self, now: float) -> None:
        """Submit replacements for workers near their lifetime; retire the ones replaced."""
        workers = self.scheduler_info.get("workers", {}).values()
        seen = {str(w.get("name")) for w in workers}
        self.renewal.observe(seen, now)
        drop = self.renewal.settle(self.worker_spec, seen)
        for old in drop:
            self.worker_spec.pop(old, None)
        due = self.renewal.due(set(self.worker_spec) & seen, now)
        for old in due:
            new = self.new_worker_spec()
            self.worker_spec.update(new)
            self.renewal.start(old, next(iter(new)))
            log.info("dask cluster %s: worker %s retires in about %d s; replacement %s asked",
                     self.worker_plan.cluster, old, self.worker_plan.renew_lead, next(iter(new)))
        if drop or due or set(self.worker_spec) - set(self.workers):
            self._correct_state()
