"""Optional MPI: one small communicator seam with a serial stand-in.

mpi4py is imported only when the process was started by an MPI launcher (its
environment says so) or when ``HPCGW_FORCE_MPI=1``; a plain ``python -m ...`` run uses
:class:`SerialComm` and needs neither MPI nor mpi4py.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np

_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


class Comm(Protocol):
    """What the apps need from a communicator."""

    rank: int
    size: int

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray: ...
    def allgather(self, obj: Any) -> list[Any]: ...
    def barrier(self) -> None: ...


class SerialComm:
    """One process, no MPI: reductions are the identity."""

    rank = 0
    size = 1

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        return None


class MPIComm:
    """mpi4py's COMM_WORLD behind the :class:`Comm` seam."""

    def __init__(self) -> None:
        try:
            from mpi4py import MPI
        except ImportError as exc:  # pragma: no cover - depends on the image
            raise RuntimeError(
                "this job was started under MPI but mpi4py is not installed; "
                "pip install mpi4py (it needs libopenmpi-dev to build)"
            ) from exc
        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        """Sum ``buf`` over ranks, in place (``buf`` must be C-contiguous)."""
        self._comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
        return buf

    def allgather(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj)

    def barrier(self) -> None:
        self._comm.Barrier()


def under_mpi_launcher(env: dict[str, str] | None = None) -> bool:
    """True when an MPI launcher started this process (or HPCGW_FORCE_MPI=1)."""
    env = dict(os.environ) if env is None else env
    return env.get("HPCGW_FORCE_MPI") == "1" or any(v in env for v in _LAUNCHER_VARS)


def get_comm() -> Comm:
    """COMM_WORLD under an MPI launcher, else a :class:`SerialComm`."""
    return MPIComm() if under_mpi_launcher() else SerialComm()


def _usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (what Slurm, a cgroup cpuset or
    ``taskset`` leave it), not the machine's count (``os.cpu_count()``: on a 64-core node
    where a job was given 8 cores, two unbound ranks had each taken 8 threads, Numba's
    own cap, 16 on 8 cores). Ranks bound to cores of their own (Open MPI binds each to a
    core at ``-n 2``) get one thread each; ranks bound to a shared socket may get fewer
    than their share, never more."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def share_cores(comm: Comm) -> int:
    """Give this rank's share of the cores it may use (its CPU affinity, split between the
    ranks on the node) to Numba and pin BLAS to one thread.

    Both OpenBLAS and Numba's OpenMP pool spin-wait between calls; with both threaded on
    the same cores a training step was measured 30x slower here (10 ms vs 0.3 ms), so the
    apps run their (small) GEMMs single-threaded and the kernels threaded.
    Returns the Numba threads per rank.
    """
    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", comm.size))
    threads = max(1, _usable_cores() // max(1, local))
    from kernels._jit import numba

    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import warnings

        warnings.warn("threadpoolctl is not installed: BLAS threads are not limited and may "
                      "contend with Numba's; pip install threadpoolctl", stacklevel=2)
    else:
        threadpool_limits(1, user_api="blas")
    return threads
