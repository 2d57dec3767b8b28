"""Dask clusters whose workers are gateway jobs on the real local Slurm cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from slurm_it import REPO, WAIT

from gateway.api import Gateway
from gateway.states import State
from gateway.testing.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.slurm]
distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")


def _config(cluster: SlurmCluster, data: Path) -> dict[str, Any]:
    profile = {"env": {**cluster.env, "PYTHONPATH": str(REPO)}, "max_walltime": "1d"}
    return {"data_dir": str(data), "backends": {"slurm": {"profiles": {"test": profile}}}}


@pytest.fixture
def gw(slurm_cluster: SlurmCluster, tmp_path: Path) -> Iterator[Gateway]:
    gateway = Gateway(_config(slurm_cluster, tmp_path / "data"))
    yield gateway
    gateway.close()


def squeue(cluster: SlurmCluster) -> dict[str, dict[str, str]]:
    """Jobs Slurm still has pending or running: id -> CPUs, memory, time limit, state."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%C|%m|%l|%T"], env={**os.environ, **cluster.env},
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return {r[0]: {"cpus": r[1], "memory": r[2], "time": r[3], "state": r[4]} for r in rows}


def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``check`` (a safety-net timeout only: a stuck test fails instead of hanging)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {what}")
        time.sleep(0.3)


def workers(gw: Gateway, name: str) -> list[Any]:
    return gw.store.jobs(labels={"hpcgw.dask": name}, newest_first=False)


def active(gw: Gateway, name: str) -> list[Any]:
    gw.reconcile()
    return [j for j in workers(gw, name) if not j.state.terminal]


def test_workers_are_slurm_jobs_that_scale_and_leave_nothing(gw: Gateway,
                                                             slurm_cluster: SlurmCluster) -> None:
    cluster = gw.dask_cluster("slurm:test", 2, name="scale",
                              worker_resources={"cpus_per_task": 2, "memory": "1G",
                                                "walltime": "10m"})
    try:
        client = distributed.Client(cluster)
        client.wait_for_workers(2, timeout=WAIT)
        jobs = sorted(workers(gw, "scale"), key=lambda j: j.name)
        assert [j.name for j in jobs] == ["scale-0", "scale-1"]
        assert all(j.backend == "slurm:test" and j.ref for j in jobs)
        slurm = squeue(slurm_cluster)
        assert [slurm[j.ref] for j in jobs] == [
            {"cpus": "2", "memory": "1G", "time": "10:00", "state": "RUNNING"}] * 2
        info = client.scheduler_info()["workers"].values()
        assert sorted((w["name"], w["nthreads"]) for w in info) == [("scale-0", 2), ("scale-1", 2)]
        assert client.submit(lambda x: x * 2, 21).result() == 42

        cluster.scale(3)
        client.wait_for_workers(3, timeout=WAIT)
        cluster.scale(1)
        until(lambda: len(client.scheduler_info()["workers"]) == 1, "scaled down to 1 worker")
        until(lambda: len(active(gw, "scale")) == 1, "two worker jobs ended after scale(1)")

        cluster.adapt(minimum=1, maximum=3)
        futures = client.map(lambda i: time.sleep(1) or i, range(30))
        until(lambda: len(client.scheduler_info()["workers"]) > 1, "adapt scaled up")
        assert sum(client.gather(futures)) == sum(range(30))
    finally:
        cluster.close()
    refs = [j.ref for j in workers(gw, "scale")]
    assert len(refs) >= 4
    assert not set(refs) & set(squeue(slurm_cluster)), "a worker job is left in Slurm"
    assert {j.state for j in workers(gw, "scale")} <= {State.CANCELLED, State.SUCCEEDED}


def test_workers_outlive_their_walltime(gw: Gateway, slurm_cluster: SlurmCluster) -> None:
    """Workers with a 2-minute walltime retire after 45 s (lifetime margin 75 s); each is
    replaced ahead of time and a computation longer than any worker's life is still right."""
    cluster = gw.dask_cluster("slurm:test", 2, name="renew", lifetime_margin="75s",
                              worker_resources={"cpus_per_task": 1, "walltime": "2m"})
    try:
        client = distributed.Client(cluster)
        client.wait_for_workers(2, timeout=WAIT)
        def slow_double(block: Any) -> Any:   # nested: pickled by value, not by module
            time.sleep(2)
            return block * 2

        x = da.arange(40_000, chunks=1_000).persist()       # data held by the workers
        total = da.map_blocks(slow_double, x).sum()         # 40 blocks x 2 s on 2 workers
        assert total.compute() == 2 * sum(range(40_000))
        assert x.sum().compute() == sum(range(40_000))
    finally:
        cluster.close()
    jobs = workers(gw, "renew")
    first = [j for j in jobs if j.name in ("renew-0", "renew-1")]
    assert len(jobs) > 2, "no worker was replaced"
    assert all(j.state in (State.SUCCEEDED, State.CANCELLED) for j in jobs), \
        [(j.name, j.state, j.reason) for j in jobs]
    for old in first:   # its replacement was asked for before it ended
        assert any(j.submitted_at < (old.ended_at or 0) for j in jobs if j.name not in
                   ("renew-0", "renew-1")), old
    assert not {j.ref for j in jobs} & set(squeue(slurm_cluster))


OWNER = """
import json, sys, time
from gateway.api import Gateway
gw = Gateway(json.loads(sys.argv[1]))
cluster = gw.dask_cluster("slurm:test", 1, name="owned",
                          worker_resources={"cpus_per_task": 1, "walltime": "10m"})
from distributed import Client
Client(cluster).wait_for_workers(1, timeout=120)
print("ready", flush=True)
time.sleep(600)
"""

ATTACH = """
import json, sys
from gateway.api import Gateway
client = Gateway(json.loads(sys.argv[1])).connect_dask("owned")
print(json.dumps({"answer": client.submit(lambda: 6 * 7).result(),
                  "workers": sorted(w["name"] for w in client.scheduler_info()["workers"].values())}))
client.close()
"""


def _python(code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True,
                            stdout=subprocess.PIPE, **kwargs)


def test_reattach_from_another_process_and_reap_after_the_owner_dies(
        gw: Gateway, slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    config = json.dumps(_config(slurm_cluster, tmp_path / "data"))
    owner = _python(OWNER, config)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
        attach = _python(ATTACH, config)
        out, _ = attach.communicate(timeout=WAIT)
        assert json.loads(out) == {"answer": 42, "workers": ["owned-0"]}

        cli = [sys.executable, "-m", "gateway.cli.main", "--data-dir", str(tmp_path / "data")]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HPCGW_CONFIG": str(tmp_path / "c.yaml")}
        (tmp_path / "c.yaml").write_text(json.dumps(
            {"backends": _config(slurm_cluster, tmp_path / "data")["backends"]}))
        listed = json.loads(subprocess.run([*cli, "dask", "ls", "--json"], env=env, check=True,
                                           capture_output=True, text=True).stdout)
        assert [(r["name"], r["owner_alive"], len(r["active_jobs"])) for r in listed] == \
            [("owned", True, 1)]
        nothing = subprocess.run([*cli, "dask", "reap", "--json"], env=env, check=True,
                                 capture_output=True, text=True).stdout
        assert json.loads(nothing) == []        # the owner lives: nothing is reaped
        # Freeze the worker (SIGSTOP) so that it cannot notice the lost scheduler and exit
        # by itself: it then stands for a worker job still waiting in a queue.
        ref = workers(gw, "owned")[0].ref
        subprocess.run(["scontrol", "suspend", str(ref)], env={**os.environ, **slurm_cluster.env},
                       check=True)
    finally:
        owner.send_signal(signal.SIGKILL)       # the notebook dies without closing
        owner.wait()
    assert squeue(slurm_cluster)[ref]["state"] == "SUSPENDED"
    reaped = json.loads(subprocess.run([*cli, "dask", "reap", "--json"], env=env, check=True,
                                       capture_output=True, text=True).stdout)
    assert [(r["name"], r["still_active"]) for r in reaped] == [("owned", [])]
    assert ref not in squeue(slurm_cluster)
    assert [j.state for j in workers(gw, "owned")] == [State.CANCELLED]
    assert not (tmp_path / "data" / "dask" / "owned.json").exists()
