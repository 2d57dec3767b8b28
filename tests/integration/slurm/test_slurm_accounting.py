"""Jobs slurmctld has forgotten are still observed, through ONE sacct call (real slurmdbd)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from slurm_it import WAIT, attempt, backend_for, submit_ok, wait_for

from gateway import proc
from gateway.states import State
from gateway.testing.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.slurm]


def _forgotten_by_slurmctld(cluster: SlurmCluster, refs: list[str]) -> None:
    """Wait until squeue no longer lists the jobs (MinJobAge=2; purged within ~10 s)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        res = proc.run(["squeue", "--noheader", "--states=all", f"--jobs={','.join(refs)}",
                        "--format=%i"], env=cluster.env, check=False)
        if not res.stdout.strip():
            return
        time.sleep(0.5)
    raise AssertionError(f"slurmctld still lists {refs}")


def test_finished_jobs_are_read_from_sacct(slurm_cluster_acct: SlurmCluster, tmp_path: Path
                                           ) -> None:
    backend = backend_for(slurm_cluster_acct, gpu_partitions={})
    reqs = [attempt(tmp_path, "acct-fail", command=["sh", "-c", "exit 4"]),
            *(attempt(tmp_path, f"acct-arr{i}", command=["true"], resources={"cpus_per_task": 2})
              for i in range(2))]
    refs = submit_ok(backend, reqs)
    wait_for(backend, refs)
    _forgotten_by_slurmctld(slurm_cluster_acct, refs)
    before = dict(backend.calls)
    seen = wait_for(backend, refs)   # sacct is eventually consistent: poll until it answers
    passes = backend.calls["squeue"] - before.get("squeue", 0)
    assert backend.calls["sacct"] - before.get("sacct", 0) == passes   # one sacct per pass
    assert (seen[refs[0]].state, seen[refs[0]].kind, seen[refs[0]].exit_code) == \
        (State.FAILED, "failed", 4)
    assert all(seen[r].state is State.SUCCEEDED and seen[r].node == "c1" for r in refs[1:])
