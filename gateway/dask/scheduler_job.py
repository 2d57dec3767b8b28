"""``scheduler="job"``: the Dask scheduler runs as a gateway job on the cluster's target.

The notebook then holds nothing the cluster needs: it submits
``python -m distributed.cli.dask_scheduler --scheduler-file FILE`` as a gateway job
(labelled ``hpcgw.dask=<name>`` and ``hpcgw.dask-role=scheduler``), waits (bounded) until
the scheduler has written FILE, and starts the worker jobs against the address found there.
The registry's owner of such a cluster is that job: the cluster lives while the job is
active, whoever created it, and ``connect_dask`` reattaches from any process.

FILE is ``DATA_DIR/dask/scheduler/<name>.json``: the scheduler job must see DATA_DIR at the
same path (the gateway's data folder is shared with the compute nodes anyway).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from distributed.deploy.spec import ProcessInterface

from gateway.dask.workers import LABEL, WorkerPlan, _resources, resources_mapping
from gateway.errors import BackendError
from gateway.node import read_json

if TYPE_CHECKING:
    from gateway.api import Gateway

log = logging.getLogger("hpcgw.dask")
ROLE_LABEL = "hpcgw.dask-role"
SCHEDULER_MODULE = "distributed.cli.dask_scheduler"
DEFAULT_RESOURCES = {"cpus_per_task": 1, "walltime": "4h"}


def scheduler_spec(plan: WorkerPlan, file: Path,
                   resources: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The gateway job spec of the scheduler (pure; an argv list, no shell)."""
    res = _resources({**DEFAULT_RESOURCES, **dict(resources or {})})
    spec: dict[str, Any] = {
        "name": f"{plan.cluster}-scheduler", "target": plan.target,
        "command": [plan.python, "-m", SCHEDULER_MODULE, "--scheduler-file", str(file),
                    "--port", "0", "--dashboard-address", ":0"],
        "resources": resources_mapping(res),
        "env": dict(plan.env),
        "labels": {LABEL: plan.cluster, ROLE_LABEL: "scheduler"},
    }
    if plan.image:
        spec["image"] = plan.image
    if plan.runtime:
        spec["runtime"] = plan.runtime
    return spec


def start_scheduler_job(gw: Gateway, spec: Mapping[str, Any], file: Path, *,
                        timeout: float = 300.0) -> tuple[str, dict[str, Any]]:
    """Submit the scheduler job and wait until it has written ``file``: returns the job id
    and the file's content (``address``, ``services``...). If the job ends first or the
    file does not appear within ``timeout`` (a long queue), the job is cancelled and
    BackendError says why."""
    file.parent.mkdir(parents=True, exist_ok=True)
    file.unlink(missing_ok=True)
    job_id = gw.submit(dict(spec)).id
    deadline = time.monotonic() + timeout
    while True:
        info = read_json(file)
        if isinstance(info, dict) and str(info.get("address", "")).startswith(("tcp://", "tls://")):
            log.info("dask scheduler job %s listens at %s", job_id, info["address"])
            return job_id, info
        record = gw.store.get(job_id)
        if record.state.terminal:
            tail = gw.logs(job_id, "stderr")[-2000:] if _has_log(gw, job_id) else ""
            raise BackendError(f"the dask scheduler job {job_id} ended ({record.state.value}: "
                               f"{record.reason or 'no reason'}) before writing {file}\n{tail}")
        if time.monotonic() > deadline:
            gw.cancel([job_id])
            raise BackendError(f"the dask scheduler job {job_id} did not write {file} within "
                               f"{timeout:g} s (state {record.state.value}); it was cancelled")
        gw.reconcile()
        time.sleep(0.5)


def _has_log(gw: Gateway, job_id: str) -> bool:
    try:
        return gw.log_path(job_id, "stderr").is_file()
    except Exception:
        return False


def dashboard_of(info: Mapping[str, Any]) -> str | None:
    """The dashboard's URL from a scheduler file (host of the address, its port)."""
    port = (info.get("services") or {}).get("dashboard")
    host = str(info.get("address", "")).split("://")[-1].rsplit(":", 1)[0]
    return f"http://{host}:{port}/status" if port and host else None


class RemoteScheduler(ProcessInterface):
    """The scheduler, as ``SpecCluster`` sees it, when it runs elsewhere (in a job): just
    an address. ``SpecCluster`` terminates it through its rpc on close; the cluster's sweep
    then cancels the job."""

    def __init__(self, address: str, **_ignored: Any) -> None:
        super().__init__()
        self.address = address
