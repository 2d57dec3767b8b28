"""Dask clusters whose workers are gateway jobs: ``Gateway.dask_cluster`` / ``connect_dask``.

Nothing here imports dask until a cluster is asked for, so ``import gateway`` stays cheap.
See docs/dask.md.
"""

from __future__ import annotations

import secrets
import sys
from typing import TYPE_CHECKING, Any, Mapping

from gateway.errors import ConfigError, NotFoundError, SpecError

if TYPE_CHECKING:
    from distributed import Client

    from gateway.api import Gateway
    from gateway.dask.cluster import GatewayCluster
    from gateway.dask.registry import Registry

__all__ = ["start_cluster", "connect", "close", "cluster_registry"]
INSTALL_HINT = 'pip install "dask[distributed]" dask-jobqueue  (or the hpcgw[dask] extra)'


def _need_dask() -> None:
    try:
        import dask_jobqueue  # noqa: F401
        import distributed  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"Dask clusters need dask, distributed and dask-jobqueue: "
                          f"{INSTALL_HINT} ({exc})") from None


def cluster_registry(gw: Gateway) -> Registry:
    from gateway.dask.reaper import registry_of

    return registry_of(gw)


def _python_for(gw: Gateway, target: str, image: str | None) -> str:
    """The interpreter that starts a worker: the image's python3, the Slurm profile's
    ``python`` (the compute nodes' interpreter), the instance's ``python3`` on a cloud
    target (this machine's path means nothing there), or this very interpreter."""
    if image:
        return "python3"
    profile = getattr(gw.backends.get(target), "profile", None)
    if getattr(profile, "python", None):
        return str(getattr(profile, "python"))
    return "python3" if gw.backends.backend_name(target).startswith("aws") else sys.executable


def start_cluster(gw: Gateway, *, target: str | None = None, workers: int = 0,
                  worker_resources: Mapping[str, Any] | None = None, image: str | None = None,
                  runtime: str | None = None, name: str | None = None, scheduler: str = "local",
                  python: str | None = None, env: Mapping[str, str] | None = None,
                  lifetime_margin: Any = None, renew_lead: Any = None, stagger: Any = None,
                  reconcile_interval: float = 5.0,
                  scheduler_resources: Mapping[str, Any] | None = None,
                  scheduler_timeout: float = 300.0, **cluster_kwargs: Any) -> GatewayCluster:
    """Start a Dask scheduler (here, or as a job with ``scheduler="job"``) and ``workers``
    worker jobs on ``target``."""
    _need_dask()
    from gateway.dask.cluster import GatewayCluster
    from gateway.dask.control import Control
    from gateway.dask.workers import make_plan

    if scheduler not in ("local", "job"):
        raise SpecError(f"scheduler={scheduler!r}: use 'local' (the scheduler runs in this "
                        "process) or 'job' (it runs as a gateway job on the target)")
    target = target or gw.config.default_target
    if scheduler == "job" and gw.backends.backend_name(target).startswith("aws"):
        raise SpecError("scheduler='job' needs a file system shared with the target (local, "
                        "slurm): a cloud instance cannot hand its scheduler file back while it "
                        "runs; use scheduler='local' for aws workers")
    name = name or f"dask-{secrets.token_hex(3)}"
    reg = cluster_registry(gw)
    if reg.get(name) is not None:
        raise SpecError(f"a dask cluster named {name!r} is already registered; pick another "
                        f"name, reattach with connect_dask({name!r}) or run `hpcgw dask reap`")
    plan = make_plan(name, target, python=python or _python_for(gw, target, image),
                     resources=worker_resources, image=image, runtime=runtime, env=env,
                     lifetime_margin=lifetime_margin, renew_lead=renew_lead, stagger=stagger)
    gw.validate({**_probe_spec(plan)})   # capabilities checked before anything starts
    remote = None
    if scheduler == "job":
        remote = _scheduler_job(gw, plan, reg, scheduler_resources, scheduler_timeout)
    try:
        return GatewayCluster(plan, Control(gw.config), reg, n_workers=workers,
                              reconcile_interval=reconcile_interval, remote=remote,
                              **cluster_kwargs)
    except BaseException:
        if remote is not None:    # no cluster object to close it: cancel the scheduler job
            from gateway.dask.control import cancel_cluster_jobs

            cancel_cluster_jobs(gw, plan.cluster)
            reg.remove(plan.cluster)
        raise


def _scheduler_job(gw: Gateway, plan: Any, reg: Registry, resources: Mapping[str, Any] | None,
                   timeout: float) -> tuple[Any, dict[str, Any]]:
    """Start the scheduler as a gateway job; (its Owner, its scheduler file's content)."""
    from dataclasses import replace

    from gateway.dask.registry import Owner
    from gateway.dask.scheduler_job import scheduler_spec, start_scheduler_job

    spec = scheduler_spec(plan, reg.scheduler_file(plan.cluster), resources)
    gw.validate(spec)
    job_id, info = start_scheduler_job(gw, spec, reg.scheduler_file(plan.cluster),
                                       timeout=timeout)
    return replace(Owner.me(), job_id=job_id), info


def _probe_spec(plan: Any) -> dict[str, Any]:
    from gateway.dask.workers import worker_spec

    return worker_spec(plan, "tcp://127.0.0.1:8786", f"{plan.cluster}-0")


def connect(gw: Gateway, name: str, *, timeout: float = 30) -> Client:
    """A ``distributed.Client`` on the running cluster ``name`` (from any process)."""
    _need_dask()
    from distributed import Client

    reg = cluster_registry(gw)
    record = reg.get(name)
    if record is None:
        known = ", ".join(r.name for r in reg.all()) or "none"
        raise NotFoundError(f"no dask cluster {name!r} (running: {known})")
    if record.owner.alive_in(gw.store) is False:
        raise NotFoundError(f"dask cluster {name!r} is gone: its owner "
                            f"({record.owner.describe()}) has ended; run `hpcgw dask reap`")
    return Client(record.address, timeout=timeout)


def close(gw: Gateway, name: str, *, timeout: float = 60.0) -> list[str]:
    """Close cluster ``name`` from any process: shut its scheduler down (workers retire),
    cancel every job labelled ``hpcgw.dask=<name>`` (the scheduler job too), wait until the
    backend confirms, forget it. Returns the ids still not ended. A cluster whose scheduler
    runs inside a live process is closed there (``cluster.close()``), not from outside."""
    from gateway.dask.control import cancel_cluster_jobs
    from gateway.dask.reaper import active_workers

    reg = cluster_registry(gw)
    record = reg.get(name)
    if record is None and name not in active_workers(gw):
        raise NotFoundError(f"no dask cluster {name!r}")
    if record is not None and record.owner.job_id is None \
            and record.owner.alive_here() is not False:
        raise SpecError(f"dask cluster {name!r} runs its scheduler in process "
                        f"{record.owner.describe()}: call cluster.close() there")
    if record is not None and record.owner.alive_in(gw.store):
        _shutdown_scheduler(record.address)
    left = cancel_cluster_jobs(gw, name, timeout=timeout)
    if not left:
        reg.remove(name)
    return left


def _shutdown_scheduler(address: str) -> None:
    """Ask the scheduler to close its workers and itself (best effort: cancelling follows)."""
    _need_dask()
    from distributed import Client

    try:
        with Client(address, timeout=10) as client:
            client.shutdown()
    except Exception as exc:  # unreachable scheduler: its job is cancelled anyway
        import logging

        logging.getLogger("hpcgw.dask").warning("shutting down %s failed: %s", address, exc)
