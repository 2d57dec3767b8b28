"""A node's prolog fails as a job starts: Slurm drains the node and requeues the job held
("launch failed requeued held"), where it would wait for someone to release it by hand.
hpcgw releases it (``launch_releases`` times, then fails the attempt as ``node_fail``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_it import REPO, WAIT

from gateway import proc
from gateway.api import Gateway
from gateway.states import State
from gateway.testing.require import require_tool
from gateway.testing.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.slurm]


@pytest.fixture(scope="module")
def prolog_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SlurmCluster, Path]]:
    """One node whose prolog fails once per ``fail-*`` file in the returned folder."""
    require_tool("slurmctld", "apt-get install slurm-wlm munge openmpi-bin")
    base = tmp_path_factory.mktemp("slurm-prolog")
    prolog = base / "prolog.sh"
    prolog.write_text(f'#!/bin/sh\nfor m in "{base}"/fail-*; do\n'
                      '  if [ -e "$m" ]; then rm -f "$m"; exit 1; fi\ndone\nexit 0\n')
    prolog.chmod(0o755)
    with SlurmCluster(base / "cluster", "single", extra_conf=(f"Prolog={prolog}",)) as cluster:
        yield cluster, base


def _admin(cluster: SlurmCluster, *argv: str) -> None:
    """What the site's admin does: start the requeued job now (Slurm delays a requeued
    job's start by its own back-off)."""
    proc.run(list(argv), env=cluster.env, timeout=30, check=True)


def _resume(cluster: SlurmCluster) -> None:
    """The admin resumes the node the prolog drained (refused where it is not drained)."""
    proc.run(["scontrol", "update", "nodename=c1", "state=resume"], env=cluster.env,
             timeout=30, check=False)


def _gateway(cluster: SlurmCluster, tmp_path: Path, **profile: object) -> Gateway:
    prof = {"env": {**cluster.env, "PYTHONPATH": str(REPO)}, **profile}
    return Gateway({"data_dir": str(tmp_path / "data"),
                    "backends": {"slurm": {"profiles": {"test": prof}}}})


def _until(gw: Gateway, job_id: str, done, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        gw.reconcile()
        job = gw.store.get(job_id)
        if done(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"{what}: not after {WAIT} s: {gw.store.get(job_id)}")


def test_a_job_held_after_a_failed_launch_is_released_and_runs(
        prolog_cluster: tuple[SlurmCluster, Path], tmp_path: Path) -> None:
    cluster, base = prolog_cluster
    (base / "fail-1").touch()
    gw = _gateway(cluster, tmp_path)
    try:
        (job,) = gw.submit_many([{"name": "held", "target": "slurm:test",
                                  "command": ["sh", "-c", "echo ran"]}])
        held = _until(gw, job.id, lambda j: "released by hpcgw" in (j.reason or ""),
                      "released after the failed launch")
        assert held.state is State.QUEUED and not (base / "fail-1").exists()
        backend = gw.backends.get("slurm:test")
        assert backend.calls["scontrol"] == 1  # type: ignore[attr-defined]
        _resume(cluster)
        _admin(cluster, "scontrol", "update", f"jobid={held.ref}", "starttime=now")
        done = gw.wait([job.id], timeout=WAIT)[0]
        assert done.state is State.SUCCEEDED and done.logs() == "ran\n"
        assert done.record.attempt == held.attempt  # the same attempt: no second submission
        assert backend.calls["sbatch"] == 1  # type: ignore[attr-defined]
        events = [(e.kind, e.message or "") for e in gw.store.events(job.id)]
        assert any("released by hpcgw (1 of 2)" in m for _, m in events), events
    finally:
        gw.close()


def test_with_no_releases_the_attempt_fails_as_node_fail_and_slurm_keeps_nothing(
        prolog_cluster: tuple[SlurmCluster, Path], tmp_path: Path) -> None:
    cluster, base = prolog_cluster
    _resume(cluster)
    (base / "fail-2").touch()
    gw = _gateway(cluster, tmp_path, launch_releases=0)
    try:
        (job,) = gw.submit_many([{"name": "held0", "target": "slurm:test", "retries": {"max": 0},
                                  "command": ["sh", "-c", "echo ran"]}])
        done = _until(gw, job.id, lambda j: j.state.terminal, "the attempt to end")
        assert (done.state, done.kind) == (State.FAILED, "node_fail"), done
        assert "launch failed 1 times" in (done.reason or "")
        queue = proc.run(["squeue", "-h", "--states=all", f"--jobs={done.ref}", "-o", "%T"],
                         env=cluster.env, timeout=30, check=False).stdout.split()
        assert queue in ([], ["CANCELLED"]), queue  # not left pending, held, in the queue
        assert not (gw.config.jobs_path / job.id / "0" / "stdout").exists() or \
            "ran" not in (gw.config.jobs_path / job.id / "0" / "stdout").read_text()
    finally:
        gw.close()
        _resume(cluster)
