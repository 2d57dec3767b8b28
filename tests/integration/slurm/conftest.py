"""Session-wide private Slurm clusters (see gateway/testing/slurm_cluster.py).

They need Debian's slurm-wlm and munge (the accounting test also slurmdbd and mariadb):
on a machine without them the Slurm tests are skipped with that message; where the
environment variable CI is set they fail instead, so CI cannot silently skip them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.testing.require import require, require_tool
from gateway.testing.slurm_accounting import available as accounting_available
from gateway.testing.slurm_cluster import SlurmCluster


def _need_slurm() -> None:
    require_tool("slurmctld", "apt-get install slurm-wlm munge openmpi-bin")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One slurmd c1: 16 CPUs, 64 GiB, gpu:fake:2, features ib,avx512; partitions debug, gpu."""
    _need_slurm()
    with SlurmCluster(tmp_path_factory.mktemp("slurm1"), "single") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def slurm_cluster_2n(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Two slurmd n1, n2 (4 CPUs each) for multi-node MPI."""
    _need_slurm()
    with SlurmCluster(tmp_path_factory.mktemp("slurm2"), "two-node") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def slurm_cluster_acct(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Single node with slurmdbd + mariadbd (sacct works) and MinJobAge=2, so finished jobs
    soon leave slurmctld's memory and only accounting still knows them."""
    _need_slurm()
    require(accounting_available(), "slurmdbd/mariadbd are not installed "
          "(apt-get install slurmdbd mariadb-server slurm-wlm-mysql-plugin)")
    with SlurmCluster(tmp_path_factory.mktemp("slurmacct"), "single", accounting=True,
                      min_job_age=2) as cluster:
        yield cluster
