"""scheduler="job" on the real Slurm cluster: the scheduler is a Slurm job, so the cluster
outlives the process that created it; another process computes on it, a third closes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from slurm_it import REPO, WAIT
from test_dask_cluster import _config, active, squeue, until, workers

from gateway.api import Gateway
from gateway.states import State
from gateway.testing.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.slurm]
pytest.importorskip("distributed")

CREATE = """
import json, sys
from distributed import Client
from gateway.api import Gateway
gw = Gateway(json.loads(sys.argv[1]))
cluster = gw.dask_cluster("slurm:test", 1, name=sys.argv[2], scheduler="job",
                          worker_resources={"cpus_per_task": 1, "walltime": "10m"},
                          scheduler_resources={"walltime": "20m"})
Client(cluster).wait_for_workers(1, timeout=120)
print(json.dumps({"address": cluster.scheduler.address}), flush=True)
"""   # and exits normally, without closing the cluster

ATTACH = """
import json, sys
from gateway.api import Gateway
client = Gateway(json.loads(sys.argv[1])).connect_dask(sys.argv[2])
import dask.array as da
x = da.arange(10_000, chunks=1_000)
print(json.dumps({"sum": int(x.sum().compute()), "answer": client.submit(lambda: 6 * 7).result(),
                  "workers": sorted(w["name"] for w in client.scheduler_info()["workers"].values())}))
client.close()
"""


@pytest.fixture
def env(slurm_cluster: SlurmCluster, tmp_path: Path) -> Iterator[tuple[Gateway, str, dict[str, str]]]:
    config = _config(slurm_cluster, tmp_path / "data")
    (tmp_path / "c.yaml").write_text(json.dumps({"backends": config["backends"]}))
    cli_env = {**os.environ, "PYTHONPATH": str(REPO), "HPCGW_CONFIG": str(tmp_path / "c.yaml")}
    gw = Gateway(config)
    yield gw, json.dumps(config), cli_env
    gw.close()


def _run(code: str, *args: str) -> Any:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=WAIT * 2)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _hpcgw(gw: Gateway, cli_env: dict[str, str], *args: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "gateway.cli.main", "--data-dir",
                           str(gw.config.data_path), *args, "--json"], env=cli_env,
                          capture_output=True, text=True, timeout=WAIT * 2)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_the_cluster_outlives_its_creator_and_closes_from_a_third_process(
        env: tuple[Gateway, str, dict[str, str]], slurm_cluster: SlurmCluster) -> None:
    gw, config, cli_env = env
    created = _run(CREATE, config, "sj")              # the creating process has exited
    jobs = {j.name: j for j in workers(gw, "sj")}
    assert set(jobs) == {"sj-scheduler", "sj-0"}
    scheduler = jobs["sj-scheduler"]
    assert scheduler.spec.labels == {"hpcgw.dask": "sj", "hpcgw.dask-role": "scheduler"}
    assert list(scheduler.spec.command[1:3]) == ["-m", "distributed.cli.dask_scheduler"]
    assert {squeue(slurm_cluster)[j.ref]["state"] for j in jobs.values()} == {"RUNNING"}

    gw.reconcile(block=True)                          # the reaper pass: the owner is the job
    assert {j.name for j in active(gw, "sj")} == {"sj-scheduler", "sj-0"}
    [row] = _hpcgw(gw, cli_env, "dask", "ls")
    assert (row["name"], row["scheduler"], row["owner"], row["owner_alive"], row["address"]) == \
        ("sj", "job", f"job {scheduler.id}", True, created["address"])

    out = _run(ATTACH, config, "sj")                  # a second process computes
    assert out == {"sum": sum(range(10_000)), "answer": 42, "workers": ["sj-0"]}

    closed = _hpcgw(gw, cli_env, "dask", "close", "sj")   # a third one closes it
    assert closed == {"name": "sj", "still_active": []}
    refs = {j.ref for j in workers(gw, "sj")}
    assert not refs & set(squeue(slurm_cluster)), "a job of the cluster is left in Slurm"
    assert all(j.state.terminal for j in workers(gw, "sj"))
    assert not (gw.config.data_path / "dask" / "sj.json").exists()
    assert not (gw.config.data_path / "dask" / "scheduler" / "sj.json").exists()


def test_workers_are_reaped_when_the_scheduler_job_ends(
        env: tuple[Gateway, str, dict[str, str]], slurm_cluster: SlurmCluster) -> None:
    gw, config, _ = env
    _run(CREATE, config, "gone")
    jobs = {j.name: j for j in workers(gw, "gone")}
    worker_ref = jobs["gone-0"].ref
    # Freeze the worker so it cannot leave by itself when its scheduler goes: it stands
    # for a worker still waiting in a queue. Then the scheduler's job ends under us.
    slurm_env = {**os.environ, **slurm_cluster.env}
    subprocess.run(["scontrol", "suspend", str(worker_ref)], env=slurm_env, check=True)
    subprocess.run(["scancel", str(jobs["gone-scheduler"].ref)], env=slurm_env, check=True)
    until(lambda: not active(gw, "gone"), "the reconciler reaped the worker job")
    states = {j.name: j.state for j in workers(gw, "gone")}
    assert states == {"gone-scheduler": State.CANCELLED, "gone-0": State.CANCELLED}
    assert worker_ref not in squeue(slurm_cluster)
    gw.reconcile(block=True)                          # nothing left: the entry goes
    assert not (gw.config.data_path / "dask" / "gone.json").exists()
