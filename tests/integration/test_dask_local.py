"""A Dask cluster whose workers are local-backend jobs (no Slurm needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.api import Gateway
from gateway.states import State

pytestmark = [pytest.mark.integration]
distributed = pytest.importorskip("distributed")


def test_local_workers_are_gateway_jobs(tmp_path: Path) -> None:
    gw = Gateway({"data_dir": str(tmp_path / "data"), "local": {"cpus": 2}})
    cluster = gw.dask_cluster("local", 2, name="here",
                              worker_resources={"cpus_per_task": 1, "walltime": "10m"})
    try:
        client = distributed.Client(cluster)
        client.wait_for_workers(2, timeout=120)
        assert client.submit(lambda: 6 * 7).result() == 42
        jobs = gw.store.jobs(labels={"hpcgw.dask": "here"})
        assert sorted(j.name for j in jobs) == ["here-0", "here-1"]
        assert {j.backend for j in jobs} == {"local"}
        client.close()
    finally:
        cluster.close()
    assert {j.state for j in gw.store.jobs(labels={"hpcgw.dask": "here"})} == {State.CANCELLED}
    assert not (tmp_path / "data" / "dask" / "here.json").exists()
    gw.close()


def test_local_scheduler_job_outlives_the_cluster_object(tmp_path: Path) -> None:
    """scheduler="job" on the local backend: the scheduler is a job; a Client from the
    registry computes; close_dask (as another process would) ends every job."""
    gw = Gateway({"data_dir": str(tmp_path / "data"), "local": {"cpus": 2}})
    cluster = gw.dask_cluster("local", 1, name="sched", scheduler="job",
                              worker_resources={"cpus_per_task": 1, "walltime": "10m"})
    with distributed.Client(cluster) as first:
        first.wait_for_workers(1, timeout=120)
    assert cluster.shutdown_on_close is False       # not closed at interpreter exit
    by_name = {j.name: j for j in gw.store.jobs(labels={"hpcgw.dask": "sched"})}
    assert set(by_name) == {"sched-scheduler", "sched-0"}
    client = gw.connect_dask("sched")
    assert client.submit(lambda: 6 * 7).result() == 42
    client.close()
    assert gw.close_dask("sched") == []
    assert {j.state for j in gw.store.jobs(labels={"hpcgw.dask": "sched"})} <= \
        {State.CANCELLED, State.SUCCEEDED}
    assert not (tmp_path / "data" / "dask" / "sched.json").exists()
    cluster.close()                                  # the object learns it is gone: no error
    gw.close()
