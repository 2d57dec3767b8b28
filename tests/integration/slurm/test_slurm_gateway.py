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
