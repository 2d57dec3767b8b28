"""Dask worker jobs as data: the plan, the worker's argv and job spec, renewal bookkeeping,
the cluster registry. No scheduler, no backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.dask.registry import ClusterRecord, Owner, Registry
from gateway.dask.renewal import Renewal
from gateway.dask.workers import default_margin, make_plan, worker_command, worker_spec
from gateway.errors import SpecError
from gateway.spec import parse_spec


def test_plan_defaults_leave_a_margin_before_the_walltime() -> None:
    plan = make_plan("c1", "slurm:test", python="/usr/bin/python3",
                     resources={"cpus_per_task": 4, "memory": "8G", "walltime": "1h"})
    assert (plan.walltime, plan.lifetime_margin, plan.lifetime) == (3600, 360, 3240)
    assert plan.stagger == 60 and plan.renew_lead == 300
    assert plan.renew_after == 3240 - 60 - 300
    assert default_margin(120) == 60 and default_margin(100_000) == 10_000


def test_worker_argv_and_spec() -> None:
    plan = make_plan("c1", "slurm:test", python="/opt/py", lifetime_margin="75s",
                     resources={"cpus_per_task": 2, "memory": "1G", "walltime": "2m"})
    argv = worker_command(plan, "tcp://10.0.0.1:8786", "c1-3")
    assert argv[:4] == ["/opt/py", "-m", "distributed.cli.dask_worker", "tcp://10.0.0.1:8786"]
    pairs = {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag.startswith("--")}
    assert "--nanny" in argv and "--no-dashboard" in argv
    assert pairs["--name"] == "c1-3" and pairs["--nthreads"] == "2"
    assert pairs["--memory-limit"] == str(1024**3)
    assert pairs["--lifetime"] == "45s" and pairs["--lifetime-stagger"] == "4s"
    spec = parse_spec(worker_spec(plan, "tcp://10.0.0.1:8786", "c1-3"))
    assert spec.name == "c1-3" and spec.target == "slurm:test"
    assert (spec.resources.cpus_per_task, spec.resources.memory, spec.resources.walltime) == \
        (2, 1024**3, 120)
    assert spec.labels == {"hpcgw.dask": "c1", "hpcgw.dask-worker": "c1-3"}
    assert list(spec.command) == argv
    # the worker's 2 task threads each get one library thread (Dask's policy), not the
    # gateway's per-job default of cpus_per_task; the user's env still wins
    assert spec.env == {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
                        "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    mine = make_plan("c1", "slurm:test", env={"NUMBA_NUM_THREADS": "2"},
                     resources={"cpus_per_task": 2})
    assert parse_spec(worker_spec(mine, "tcp://h:1", "c1-0")).env["NUMBA_NUM_THREADS"] == "2"


def test_image_workers_use_the_image_python() -> None:
    image = "reg/py@sha256:" + "a" * 64
    plan = make_plan("c1", "local", image=image, runtime="podman")
    spec = parse_spec(worker_spec(plan, "tcp://h:1", "c1-0"))
    assert spec.image == image and spec.runtime == "podman" and spec.command[0] == "python3"


@pytest.mark.parametrize("bad, field", [
    ({"name": "a b"}, "name"), ({"name": "x" * 41}, "name"),
    ({"resources": {"nodes": 2}}, "worker_resources"),
    ({"resources": {"walltime": "10"}}, "worker_resources.walltime"),
    ({"lifetime_margin": "2h"}, "lifetime_margin"), ({"renew_lead": "soon"}, "renew_lead"),
])
def test_bad_options_name_the_field(bad: dict, field: str) -> None:
    args = {"name": "ok", "resources": {"walltime": "1h"}}
    args.update(bad)
    with pytest.raises(SpecError) as err:
        make_plan(args.pop("name"), "local", python="/p", **args)
    assert any(i.path == field for i in err.value.issues), err.value


def test_renewal_replaces_ahead_then_retires_the_old_worker() -> None:
    r = Renewal(renew_after=20)
    r.observe({"w0", "w1"}, now=100)
    assert r.due({"w0", "w1"}, now=119) == []
    assert r.due({"w0", "w1"}, now=120) == ["w0", "w1"]
    r.start("w0", "w2")
    assert r.due({"w0", "w1"}, now=121) == ["w1"]            # w0 is being renewed
    assert r.settle({"w0", "w1", "w2"}, {"w0", "w1"}) == []   # w2 not connected yet
    r.observe({"w0", "w1", "w2"}, now=125)
    assert r.settle({"w0", "w1", "w2"}, {"w0", "w1", "w2"}) == ["w0"]
    assert r.renewing == {} and "w0" not in r.first_seen
    assert r.due({"w1", "w2"}, now=144) == ["w1"] and r.due({"w2"}, now=145) == ["w2"]


def test_renewal_when_the_old_worker_retires_first_or_the_replacement_is_scaled_away() -> None:
    r = Renewal(renew_after=0)
    r.observe({"a", "b"}, now=0)
    r.start("a", "a2")
    r.start("b", "b2")
    # a retired by its own --lifetime before a2 came; b2 was scaled away by adapt
    assert r.settle({"a", "a2", "b"}, {"b"}) == ["a"]
    assert r.renewing == {} and r.spent == {"b"}
    assert r.due({"b"}, now=50) == []                         # b keeps running to its lifetime
    r.observe({"a"}, now=60)                                  # a name seen again is a new worker
    assert r.first_seen["a"] == 60


def test_registry_round_trip_and_dead_owner(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "dask")
    assert reg.all() == [] and reg.get("x") is None
    me = Owner.me()
    reg.write(ClusterRecord("c1", "tcp://h:1", "slurm:test", me))
    assert reg.get("c1") == ClusterRecord("c1", "tcp://h:1", "slurm:test", me,
                                          created_at=reg.get("c1").created_at)  # type: ignore[union-attr]
    assert me.alive_here() is True
    assert Owner(me.host, me.pid, (me.ticks or 0) + 1).alive_here() is False   # pid reused
    assert Owner("elsewhere.invalid", os.getpid()).alive_here() is None
    (tmp_path / "dask" / "broken.json").write_text("{not json")
    assert [r.name for r in reg.all()] == ["c1"]
    reg.remove("c1")
    assert reg.all() == []


def test_scheduler_job_spec() -> None:
    pytest.importorskip("distributed")
    from gateway.dask.scheduler_job import dashboard_of, scheduler_spec

    plan = make_plan("c1", "slurm:test", python="/opt/py", env={"A": "1"},
                     resources={"cpus_per_task": 2, "walltime": "10m"})
    spec = scheduler_spec(plan, Path("/data/dask/scheduler/c1.json"), {"walltime": "2h"})
    assert spec["command"] == ["/opt/py", "-m", "distributed.cli.dask_scheduler",
                               "--scheduler-file", "/data/dask/scheduler/c1.json",
                               "--port", "0", "--dashboard-address", ":0"]
    assert spec["labels"] == {"hpcgw.dask": "c1", "hpcgw.dask-role": "scheduler"}
    assert (spec["name"], spec["target"], spec["env"]) == ("c1-scheduler", "slurm:test", {"A": "1"})
    assert spec["resources"]["walltime"] == "02:00:00" and spec["resources"]["cpus_per_task"] == 1
    parse_spec(spec)
    with pytest.raises(SpecError):
        scheduler_spec(plan, Path("/f"), {"walltime": "soon"})
    assert dashboard_of({"address": "tcp://10.1.2.3:4567", "services": {"dashboard": 8787}}) \
        == "http://10.1.2.3:8787/status"
    assert dashboard_of({"address": "tcp://10.1.2.3:4567", "services": {}}) is None


class _Store:
    def __init__(self, states: dict[str, "object"]) -> None:
        self.states = states

    def get(self, job_id: str) -> object:
        from types import SimpleNamespace

        from gateway.errors import NotFoundError

        if job_id not in self.states:
            raise NotFoundError(job_id)
        return SimpleNamespace(state=self.states[job_id])


def test_a_scheduler_job_owner_lives_as_long_as_its_job(tmp_path: Path) -> None:
    from gateway.states import State

    dead_creator = Owner(Owner.me().host, 2**22 + 7, 1, job_id="j1")   # its creator has exited
    store = _Store({"j1": State.RUNNING})
    assert dead_creator.alive_in(store) is True     # type: ignore[arg-type]
    store.states["j1"] = State.CANCELLED
    assert dead_creator.alive_in(store) is False    # type: ignore[arg-type]
    assert Owner("h", 1, job_id="unknown").alive_in(store) is False   # type: ignore[arg-type]
    assert dead_creator.describe() == "job j1"
    reg = Registry(tmp_path / "dask")
    reg.write(ClusterRecord("c2", "tcp://h:1", "local", dead_creator, scheduler="job"))
    reg.scheduler_file("c2").parent.mkdir()
    reg.scheduler_file("c2").write_text("{}")
    assert reg.get("c2").owner.job_id == "j1"       # type: ignore[union-attr]
    reg.remove("c2")
    assert not reg.scheduler_file("c2").exists() and reg.get("c2") is None
