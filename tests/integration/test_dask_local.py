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
