"""``GatewayJob``: a dask-jobqueue Job whose worker runs as a gateway job on any backend.

dask-jobqueue's ``Job`` classes submit a batch script with ``sbatch``/``qsub`` and cancel it
with ``scancel``/``qdel``. This one hands a job spec to the gateway instead (so the worker is
placed on the local machine, a Slurm profile or the cloud, in the pinned image, recorded in
the store and shown by ``hpcgw ls``) and cancels it through the gateway.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import dask
from dask_jobqueue.core import Job
from distributed.deploy.spec import ProcessInterface

from gateway.dask.workers import WorkerPlan, worker_spec

if TYPE_CHECKING:
    from gateway.dask.control import Control

log = logging.getLogger("hpcgw.dask")

# dask-jobqueue reads defaults for every keyword from ``jobqueue.<config_name>``; ours are
# the neutral ones (the gateway's profile and the job spec decide the rest).
dask.config.update_defaults({"jobqueue": {"hpcgw": {
    "name": "dask-worker", "cores": 1, "memory": "0", "processes": 1, "python": None,
    "interface": None, "death-timeout": 60, "local-directory": None,
    "shared-temp-directory": None, "extra": None, "worker-command": "distributed.cli.dask_worker",
    "worker-extra-args": [], "shebang": "#!/usr/bin/env bash", "env-extra": None,
    "job-script-prologue": [], "job-extra": None, "job-extra-directives": [],
    "header-skip": None, "job-directives-skip": [], "log-directory": None,
    "scheduler-options": {}}}})


class GatewayJob(Job):
    """One Dask worker = one gateway job (labelled ``hpcgw.dask=<cluster>``)."""

    config_name = "hpcgw"
    submit_command = None
    cancel_command = None

    def __init__(self, scheduler: str | None = None, name: str | None = None, *,
                 plan: WorkerPlan, control: Control | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("cores", plan.nthreads)
        kwargs.setdefault("memory", str(plan.resources.memory or 0))
        kwargs["processes"] = 1
        super().__init__(scheduler=scheduler, name=name, **kwargs)
        self.plan = plan
        self.control = control
        self.job_id: str | None = None

    def spec(self) -> dict[str, Any]:
        """The gateway job spec this worker is submitted as."""
        return worker_spec(self.plan, str(self.scheduler), str(self.name))

    def job_script(self) -> str:
        """The job spec as JSON (``cluster.job_script()`` shows what each worker runs)."""
        return json.dumps(self.spec(), indent=2, sort_keys=True) + "\n"

    async def start(self) -> None:
        if self.control is None:
            raise RuntimeError("GatewayJob needs the cluster's control to submit")
        self.job_id = await self.control.submit(self.spec())
        log.info("worker %s submitted as gateway job %s", self.name, self.job_id)
        await ProcessInterface.start(self)

    async def close(self) -> None:
        if self.job_id is not None and self.control is not None:
            try:
                await self.control.cancel([self.job_id])
            except Exception:  # the cluster's final sweep cancels what is left
                log.exception("cancelling worker job %s failed", self.job_id)
        await ProcessInterface.close(self)
