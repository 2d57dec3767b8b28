"""What one Dask worker job is: pure functions from the cluster's options to a job spec.

A worker is an ordinary gateway job whose command is ``python -m distributed.cli.dask_worker``
pointed at the scheduler, with ``--lifetime`` set below the job's walltime so the worker
retires gracefully (hands its data to the others) before the backend would kill it.
No I/O here: the spec is tested as data.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from gateway.errors import FieldIssue, SpecError
from gateway.spec import NAME_RE, THREAD_VARS, Resources

CLUSTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
LABEL = "hpcgw.dask"              # every worker job carries hpcgw.dask=<cluster name>
WORKER_LABEL = "hpcgw.dask-worker"  # and its Dask worker name
WORKER_MODULE = "distributed.cli.dask_worker"


def check_cluster_name(name: str) -> str:
    """A cluster name is part of job names and file names: short and plain."""
    if not isinstance(name, str) or not CLUSTER_NAME_RE.match(name):
        raise SpecError([FieldIssue("name", f"cluster name {name!r} must be 1-40 letters, "
                                    "digits, '_' or '-', starting with a letter or digit")])
    return name


def default_margin(walltime: int) -> int:
    """Seconds before the walltime at which a worker retires itself: 10 % of the walltime,
    at least 60 s, at most half of it."""
    return int(min(max(60, walltime // 10), walltime // 2))


@dataclass(frozen=True)
class WorkerPlan:
    """Everything that is the same for every worker job of one cluster."""

    cluster: str
    target: str
    resources: Resources
    python: str
    image: str | None = None
    runtime: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    lifetime_margin: int = 60      # retire this long before the walltime ends
    stagger: int = 0               # --lifetime-stagger: spread retirements of same-age workers
    renew_lead: int = 60           # ask for the replacement this long before retiring
    death_timeout: int = 60        # a worker without its scheduler exits after this long
    nanny: bool = True
    extra_args: tuple[str, ...] = ()

    @property
    def walltime(self) -> int:
        return self.resources.walltime

    @property
    def lifetime(self) -> int:
        """Seconds after start at which a worker retires (gracefully) by itself."""
        return self.walltime - self.lifetime_margin

    @property
    def renew_after(self) -> int:
        """Seconds after a worker connected at which its replacement is submitted."""
        return max(0, self.lifetime - self.stagger - self.renew_lead)

    @property
    def nthreads(self) -> int:
        return self.resources.cpus_per_task


def make_plan(cluster: str, target: str, *, python: str | None = None,
              resources: Mapping[str, Any] | Resources | None = None,
              image: str | None = None, runtime: str | None = None,
              env: Mapping[str, str] | None = None, lifetime_margin: Any = None,
              stagger: Any = None, renew_lead: Any = None, death_timeout: Any = 60,
              nanny: bool = True, extra_args: tuple[str, ...] = ()) -> WorkerPlan:
    """Validate the user's worker options into a WorkerPlan (SpecError naming the field)."""
    from gateway import units

    check_cluster_name(cluster)
    res = resources if isinstance(resources, Resources) else _resources(resources or {})
    if res.nodes != 1 or res.tasks_per_node != 1:
        raise SpecError([FieldIssue("worker_resources", "a Dask worker is one process on one "
                                    "node: nodes and tasks_per_node must be 1 (use "
                                    "cpus_per_task for threads, more workers for more nodes)")])
    issues = []
    seconds: dict[str, int | None] = {}
    for key, value, default in (("lifetime_margin", lifetime_margin, default_margin(res.walltime)),
                                ("stagger", stagger, None), ("renew_lead", renew_lead, None),
                                ("death_timeout", death_timeout, 60)):
        try:
            seconds[key] = default if value is None else units.parse_walltime(value)
        except ValueError as exc:
            issues.append(FieldIssue(key, str(exc)))
    if issues:
        raise SpecError(issues)
    margin = int(seconds["lifetime_margin"] or 0)
    if not 0 < margin < res.walltime:
        raise SpecError([FieldIssue("lifetime_margin", f"{margin} s must be above 0 and below "
                                    f"the worker walltime ({res.walltime} s)")])
    lifetime = res.walltime - margin
    stag = seconds["stagger"] if seconds["stagger"] is not None else min(60, lifetime // 10)
    lead = seconds["renew_lead"] if seconds["renew_lead"] is not None else min(300, lifetime // 2)
    return WorkerPlan(cluster=cluster, target=target, resources=res,
                      python=python or ("python3" if image else sys.executable),
                      image=image, runtime=runtime, env=dict(env or {}), lifetime_margin=margin,
                      stagger=stag, renew_lead=lead, death_timeout=int(seconds["death_timeout"] or 60),
                      nanny=nanny, extra_args=tuple(extra_args))


def _resources(data: Mapping[str, Any]) -> Resources:
    from pydantic import ValidationError

    try:
        return Resources.model_validate({"walltime": "1h", **dict(data)})
    except ValidationError as exc:
        issues = [FieldIssue("worker_resources." + ".".join(str(p) for p in e["loc"]),
                             str(e["msg"]).removeprefix("Value error, ")) for e in exc.errors()]
        raise SpecError(issues) from None


def worker_command(plan: WorkerPlan, scheduler: str, name: str) -> list[str]:
    """argv of one Dask worker (a list: never a shell string)."""
    argv = [plan.python, "-m", WORKER_MODULE, scheduler, "--name", name,
            "--nthreads", str(plan.nthreads),
            "--memory-limit", str(plan.resources.memory) if plan.resources.memory else "auto",
            "--nanny" if plan.nanny else "--no-nanny",
            "--death-timeout", f"{plan.death_timeout}s",
            "--lifetime", f"{plan.lifetime}s", "--lifetime-stagger", f"{plan.stagger}s",
            "--no-dashboard"]
    return argv + list(plan.extra_args)


def resources_mapping(res: Resources) -> dict[str, Any]:
    """Resources as a spec mapping again (walltime and memory written with units)."""
    from gateway import units

    data = res.model_dump(mode="json")
    data["walltime"] = units.format_walltime(res.walltime)
    if res.memory is not None:
        data["memory"] = units.format_memory(res.memory)
    else:
        data.pop("memory")
    return data


def worker_spec(plan: WorkerPlan, scheduler: str, name: str) -> dict[str, Any]:
    """The gateway job spec (a mapping for ``Gateway.submit``) of worker ``name``."""
    if not NAME_RE.match(name):
        raise SpecError([FieldIssue("name", f"worker name {name!r} is not a valid job name")])
    spec: dict[str, Any] = {
        "name": name, "target": plan.target,
        "command": worker_command(plan, scheduler, name),
        "resources": resources_mapping(plan.resources),
        # one thread per library per task thread, Dask's own policy (its nanny sets the
        # OpenMP/BLAS ones to 1 unless the environment has them; the gateway's job default
        # would give each of the worker's cpus_per_task threads cpus_per_task more)
        "env": {**{k: "1" for k in THREAD_VARS}, **plan.env},
        "labels": {LABEL: plan.cluster, WORKER_LABEL: name},
    }
    if plan.image:
        spec["image"] = plan.image
    if plan.runtime:
        spec["runtime"] = plan.runtime
    return spec
