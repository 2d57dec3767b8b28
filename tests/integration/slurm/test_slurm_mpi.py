"""Multi-node MPI through the backend: 2 nodes x 2 tasks, mpi4py Allreduce via srun --mpi=pmix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from slurm_it import attempt, backend_for, submit_ok, wait_for

from gateway.states import State
from gateway.testing.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.mpi]

PROGRAM = """
from mpi4py import MPI
comm = MPI.COMM_WORLD
total = comm.allreduce(comm.Get_rank() + 1, op=MPI.SUM)
print(comm.Get_rank(), comm.Get_size(), total, MPI.Get_processor_name(), flush=True)
"""


def test_two_nodes_two_tasks_allreduce(slurm_cluster_2n: SlurmCluster, tmp_path: Path) -> None:
    backend = backend_for(slurm_cluster_2n, gpu_partitions={})
    req = attempt(tmp_path, "mpi", command=[sys.executable, "-c", PROGRAM], mpi="pmix",
                  resources={"nodes": 2, "tasks_per_node": 2},
                  env={"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    [ref] = submit_ok(backend, [req])
    obs = wait_for(backend, [ref])[ref]
    out = (req.attempt_dir / "stdout").read_text()
    assert obs.state is State.SUCCEEDED, (obs, out, (req.attempt_dir / "stderr").read_text())
    assert obs.node == "n[1-2]"
    rows = sorted(line.split() for line in out.splitlines() if line.strip())
    assert [r[:3] for r in rows] == [[str(rank), "4", "10"] for rank in range(4)]
    assert sorted(r[3] for r in rows) == ["n1", "n1", "n2", "n2"]
