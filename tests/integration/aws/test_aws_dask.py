"""A Dask cluster whose workers are aws jobs: moto for EC2/S3, the emulator running each
instance's user-data on this machine (so a worker reaches the scheduler in this process)."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import pytest
from test_aws_cloud import Cloud, _hpcgw

from gateway.states import State

pytestmark = [pytest.mark.integration, pytest.mark.aws, pytest.mark.timeout(300)]
distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")


def test_two_cloud_workers_compute_and_close_leaves_no_instance(
        cloud: Callable[..., Cloud], emulator: Any) -> None:
    c = cloud()
    emu = emulator(owner=c.owner)
    # The emulated instances are this machine: its interpreter has `distributed`. On real
    # instances the default is the AMI's python3 (or the image's, with image=).
    cluster = c.gw.dask_cluster("aws:test", 2, name="cloudy", python=sys.executable,
                                worker_resources={"cpus_per_task": 1, "walltime": "10m"},
                                reconcile_interval=1)
    try:
        client = distributed.Client(cluster)
        client.wait_for_workers(2, timeout=120)
        names = sorted(w["name"] for w in client.scheduler_info()["workers"].values())
        assert names == ["cloudy-0", "cloudy-1"]
        x = da.arange(100_000, chunks=10_000)
        assert int((x * 2).sum().compute()) == 2 * sum(range(100_000))
        running = c.gw.store.jobs(labels={"hpcgw.dask": "cloudy"})
        assert {j.state for j in running} == {State.RUNNING}
        for job in running:                      # each worker is its own (emulated) instance
            [inst] = c.instances(f"hpcgw.{job.id}.1")
            assert inst["State"]["Name"] == "running"
        assert sorted(r["hpcgw:key"] for r in emu.ran) == sorted(
            f"hpcgw.{j.id}.1" for j in running)
        client.close()
    finally:
        cluster.close()
    jobs = c.gw.store.jobs(labels={"hpcgw.dask": "cloudy"})
    assert sorted(j.name for j in jobs) == ["cloudy-0", "cloudy-1"]
    assert {j.state for j in jobs} == {State.CANCELLED}
    listed = {r["id"]: r for r in json.loads(_hpcgw(c, "ls", "--json").stdout)}
    for job in jobs:
        assert listed[job.id]["cost"] and listed[job.id]["cost"] > 0, listed[job.id]
        [inst] = c.instances(f"hpcgw.{job.id}.1")
        assert inst["State"]["Name"] == "terminated"


def test_a_scheduler_job_is_refused_on_the_cloud(cloud: Callable[..., Cloud]) -> None:
    from gateway.errors import SpecError

    c = cloud()
    with pytest.raises(SpecError, match="shared with the target"):
        c.gw.dask_cluster("aws:test", 1, name="nope", scheduler="job")
    assert c.gw.store.jobs() == []
