"""The cluster's hands on the gateway: submit, cancel and reconcile, off the event loop.

Every gateway call blocks (SQLite, sbatch, squeue), while Dask's cluster runs on an asyncio
loop. ``Control`` owns one Gateway and ONE worker thread, so the store connection is only
ever used from that thread and calls never overlap. Worker submissions that arrive within
``BATCH_DELAY`` seconds go in as one ``submit_many``: one reconciler pass, and on Slurm one
job array for a whole ``scale(n)``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

from gateway.dask.workers import LABEL
from gateway.states import State

if TYPE_CHECKING:
    from gateway.api import Gateway
    from gateway.config import Config

log = logging.getLogger("hpcgw.dask")
BATCH_DELAY = 0.05
T = TypeVar("T")
ACTIVE_STATES = [s for s in State if not s.terminal]


class Control:
    """One Gateway used from one thread; async wrappers for the cluster's event loop."""

    def __init__(self, config: Config):
        self.config = config
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpcgw-dask")
        self._gw: Gateway | None = None
        self._pending: list[tuple[Mapping[str, Any], asyncio.Future[str]]] = []
        self._flush: asyncio.TimerHandle | None = None

    # -- running on the gateway thread ----------------------------------------------------
    def _gateway(self) -> Gateway:
        if self._gw is None:
            from gateway.api import Gateway

            self._gw = Gateway(self.config)
        return self._gw

    def call(self, fn: Callable[[Gateway], T]) -> T:
        """Run ``fn(gateway)`` on the gateway thread and wait for it (from any thread)."""
        return self._pool.submit(lambda: fn(self._gateway())).result()

    async def acall(self, fn: Callable[[Gateway], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(self._gateway()))

    # -- submitting in batches ------------------------------------------------------------
    async def submit(self, spec: Mapping[str, Any]) -> str:
        """Submit one worker job; returns its gateway job id."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._pending.append((spec, future))
        if self._flush is None:
            self._flush = loop.call_later(BATCH_DELAY, lambda: asyncio.ensure_future(self._send()))
        return await future

    async def _send(self) -> None:
        batch, self._pending, self._flush = self._pending, [], None
        try:
            ids = await self.acall(lambda gw: [j.id for j in gw.submit_many([s for s, _ in batch])])
        except Exception as exc:  # every waiter learns why; the cluster logs it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), job_id in zip(batch, ids):
            if not future.done():
                future.set_result(job_id)

    # -- cancelling -----------------------------------------------------------------------
    async def cancel(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            await self.acall(lambda gw: gw.cancel(list(job_ids)))

    async def reconcile(self) -> None:
        await self.acall(lambda gw: gw.reconcile())

    def close(self) -> None:
        if self._gw is not None:
            gw, self._gw = self._gw, None
            self._pool.submit(gw.close).result()
        self._pool.shutdown(wait=True)


def cancel_cluster_jobs(gw: Gateway, cluster: str, *, timeout: float = 60.0) -> list[str]:
    """Cancel every unfinished job labelled ``hpcgw.dask=<cluster>`` and run passes until the
    backend confirms they ended (or ``timeout``). Returns the ids still not terminal."""
    active = [j.id for j in gw.jobs(state=[s.value for s in ACTIVE_STATES],
                                    labels={LABEL: cluster})]
    if active:
        gw.cancel(active)
    deadline = time.monotonic() + timeout
    while active:
        gw.reconcile(block=True)
        active = [i for i in active if not gw.store.get(i).state.terminal]
        if not active or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if active:
        log.warning("dask cluster %s: jobs %s did not end within %g s of cancelling",
                    cluster, ", ".join(active), timeout)
    return active
