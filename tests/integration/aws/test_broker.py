"""The broker for `target: auto`, against a real (small) Slurm cluster and moto + emulated
instances: with an idle cluster jobs stay on Slurm; with a long queue they burst to the cloud."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from test_aws_cloud import REPO, Cloud

from gateway.states import State
from gateway.testing.require import require_tool
from gateway.testing.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.aws, pytest.mark.slurm]


@pytest.fixture(scope="module")
def small_slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    require_tool("slurmctld", "apt-get install slurm-wlm munge")
    with SlurmCluster(tmp_path_factory.mktemp("broker-slurm"), "single", cpus=2) as cluster:
        yield cluster


@pytest.fixture
def hybrid(tmp_path: Path, aws_env: str, bucket: str, small_slurm: SlurmCluster,
           request: pytest.FixtureRequest) -> Iterator[Cloud]:
    slurm = {"test": {"env": {**small_slurm.env, "PYTHONPATH": str(REPO)}}}
    cloud = Cloud(tmp_path, aws_env, bucket, owner=request.node.name[:60],
                  extra_config={"backends": {"slurm": {"profiles": slurm}},
                         "broker": {"prefer": "slurm:test", "burst_after_s": 60}})
    yield cloud
    cloud.gw.close()
    subprocess.run(["scancel", "--user=root"], env={**os.environ, **small_slurm.env},
                   capture_output=True)


def _fill(cluster: SlurmCluster, jobs: int) -> None:
    for _ in range(jobs):
        subprocess.run(["sbatch", "--parsable", "-c", "1", "--time=10", "-o", "/dev/null",
                        "--wrap", "sleep 300"], env={**os.environ, **cluster.env}, check=True,
                       capture_output=True)


def _placement(cloud: Cloud, job_id: str) -> dict[str, Any]:
    return dict(cloud.gw.store.get(job_id).provenance["placement"])


def test_idle_cluster_keeps_the_job_on_slurm(hybrid: Cloud, emulator: Callable[..., Any]) -> None:
    emulator(owner=hybrid.owner)
    job = hybrid.gw.submit({"name": "auto-idle", "target": "auto", "command": ["echo", "here"]},
                           start=False)
    record = hybrid.until(job.id)
    assert record.state == State.SUCCEEDED, record.reason
    assert record.backend == "slurm:test"
    placement = _placement(hybrid, job.id)
    assert placement["chosen"] == "slurm:test" and "preferred" in placement["reason"]
    assert {e["target"] for e in placement["estimates"]} == {"slurm:test", "aws:test"}
    assert any("auto -> slurm:test" in (e.message or "") for e in hybrid.gw.store.events(job.id))


def test_long_queue_bursts_to_the_cloud_within_policy(hybrid: Cloud, small_slurm: SlurmCluster,
                                                      emulator: Callable[..., Any]) -> None:
    emulator(owner=hybrid.owner)
    _fill(small_slurm, 4)  # 2 running on the 2 CPUs, 2 pending: a wait of many minutes
    job = hybrid.gw.submit({"name": "auto-busy", "target": "auto", "command": ["echo", "there"]},
                           start=False)
    record = hybrid.until(job.id)
    assert record.state == State.SUCCEEDED, record.reason
    assert record.backend == "aws:test" and record.cost and record.cost > 0
    placement = _placement(hybrid, job.id)
    slurm = next(e for e in placement["estimates"] if e["target"] == "slurm:test")
    assert slurm["wait_s"] > 60 and "pending" in slurm["why"]
    assert "burst_after_s" in placement["reason"]
    assert hybrid.gw.logs(job.id).strip() == "there"


def test_cost_cap_keeps_work_off_the_cloud(hybrid: Cloud, small_slurm: SlurmCluster) -> None:
    _fill(small_slurm, 4)
    plan = hybrid.gw.plan({"name": "capped", "target": "auto", "command": ["true"]})
    assert plan["placement"]["chosen"] == "aws:test"
    from gateway.config import load_config

    capped = load_config({"broker": {"prefer": "slurm:test", "burst_after_s": 60, "max_cost": 0}},
                         environ=hybrid.env)
    from gateway.api import Gateway

    gw = Gateway(capped, backends={"aws:test": hybrid.backend})
    try:
        assert gw.plan({"name": "capped", "target": "auto", "command": ["true"]})[
            "placement"]["chosen"] == "slurm:test"
    finally:
        gw.close()
