"""End to end through the lead's Gateway API and reconciler: `target: slurm:test`."""

from __future__ import annotations

from pathlib import Path

import pytest
from slurm_it import REPO, WAIT

from gateway.api import Gateway
from gateway.states import State
from gateway.testing.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.slurm]


def test_jobs_run_through_the_reconciler(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    profile = {"env": {**slurm_cluster.env, "PYTHONPATH": str(REPO)},
               "gpu_partitions": {"fake": "gpu"}}
    gw = Gateway({"data_dir": str(tmp_path / "data"),
                  "backends": {"slurm": {"profiles": {"test": profile}}}})
    try:
        specs = [{"name": f"sq{i}", "target": "slurm:test", "outputs": ["sq.txt"],
                  "command": ["sh", "-c", f"echo $(({i} * {i})) | tee sq.txt"]} for i in range(4)]
        specs.append({"name": "bad", "target": "slurm:test", "command": ["sh", "-c", "exit 7"]})
        jobs = gw.submit_many(specs)
        done = gw.wait([j.id for j in jobs], timeout=WAIT)
        assert [j.state for j in done] == [State.SUCCEEDED] * 4 + [State.FAILED]
        assert [j.logs() for j in done[:4]] == [f"{i * i}\n" for i in range(4)]
        assert [p.read_text() for j in done[:4] for p in j.outputs()] == \
            [f"{i * i}\n" for i in range(4)]
        assert (done[4].exit_code, done[4].record.kind) == (7, "failed")
    finally:
        gw.close()


def test_controller_down_and_back_while_jobs_queue_and_run(slurm_cluster: SlurmCluster,
                                                           tmp_path: Path) -> None:
    """slurmctld stops with jobs running and more being submitted: none is failed, lost or
    submitted twice, and all finish once it is back."""
    marks = tmp_path / "marks"
    profile = {"env": {**slurm_cluster.env, "PYTHONPATH": str(REPO)}}
    gw = Gateway({"data_dir": str(tmp_path / "data"), "agent": {"backoff_s": [1]},
                  "backends": {"slurm": {"profiles": {"test": profile}}}})
    command = ["sh", "-c", f"sleep 2; echo $HPCGW_JOB_ID >> {marks}"]
    try:
        first = gw.submit_many([{"name": f"r{i}", "target": "slurm:test", "command": command}
                                for i in range(3)])
        slurm_cluster.stop_controller()
        try:
            later = gw.submit_many([{"name": f"q{i}", "target": "slurm:test", "command": command}
                                    for i in range(2)])
            for _ in range(2):
                report = gw.reconcile()
                assert report is not None and report.unavailable
            states = {j.state for j in gw.store.jobs()}
            assert states <= {State.QUEUED, State.RUNNING, State.SUBMITTING}, states
        finally:
            slurm_cluster.restart_controller()
        done = gw.wait([j.id for j in first + later], timeout=WAIT)
        assert [j.state for j in done] == [State.SUCCEEDED] * 5
        assert sorted(marks.read_text().split()) == sorted(j.id for j in first + later)
    finally:
        gw.close()
