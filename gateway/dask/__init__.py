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

__all__ = ["start_cluster", "connect", "cluster_registry"]
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
    ``python`` (the compute nodes' interpreter), or this very interpreter."""
    if image:
        return "python3"
    profile = getattr(gw.backends.get(target), "profile", None)
    return str(getattr(profile, "python", None) or sys.executable)


def start_cluster(gw: Gateway, *, target: str | None = None, workers: int = 0,
                  worker_resources: Mapping[str, Any] | None = None, image: str | None = None,
                  runtime: str | None = None, name: str | None = None, scheduler: str = "local",
                  python: str | None = None, env: Mapping[str, str] | None = None,
                  lifetime_margin: Any = None, renew_lead: Any = None, stagger: Any = None,
                  reconcile_interval: float = 5.0, **cluster_kwargs: Any) -> GatewayCluster:
    """Start a Dask scheduler here and ``workers`` worker jobs on ``target``."""
    _need_dask()
    from gateway.dask.cluster import GatewayCluster
    from gateway.dask.control import Control
    from gateway.dask.workers import make_plan

    if scheduler != "local":
        raise SpecError(f"scheduler={scheduler!r} is not supported yet; use 'local' (the "
                        "scheduler runs in this process, beside the notebook)")
    target = target or gw.config.default_target
    name = name or f"dask-{secrets.token_hex(3)}"
    reg = cluster_registry(gw)
    if reg.get(name) is not None:
        raise SpecError(f"a dask cluster named {name!r} is already registered; pick another "
                        f"name, reattach with connect_dask({name!r}) or run `hpcgw dask reap`")
    plan = make_plan(name, target, python=python or _python_for(gw, target, image),
                     resources=worker_resources, image=image, runtime=runtime, env=env,
                     lifetime_margin=lifetime_margin, renew_lead=renew_lead, stagger=stagger)
    gw.validate({**_probe_spec(plan)})   # capabilities checked before anything starts
    return GatewayCluster(plan, Control(gw.config), reg, n_workers=workers,
                          reconcile_interval=reconcile_interval, **cluster_kwargs)


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
    if record.owner.alive_here() is False:
        raise NotFoundError(f"dask cluster {name!r} is gone: its owner (pid {record.owner.pid} "
                            f"on {record.owner.host}) has exited; run `hpcgw dask reap`")
    return Client(record.address, timeout=timeout)
