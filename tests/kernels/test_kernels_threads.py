"""kernels.blas_threads: NumPy's BLAS pinned while kernels run, and restored after."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import kernels
from gateway.testing.require import require_tool
from kernels import cluster
from kernels.errors import KernelInputError


def blas_counts() -> list[int]:
    counts = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    assert counts, "NumPy's BLAS is not visible to threadpoolctl"
    return counts


def test_blas_threads_pins_blas_inside_and_restores_the_previous_count():
    with threadpool_limits(2, user_api="blas"):  # a known count above 1, on any machine
        assert blas_counts() == [2] * len(blas_counts())
        with kernels.blas_threads():
            assert set(blas_counts()) == {1}
            a = np.arange(64.0).reshape(8, 8)
            np.testing.assert_array_equal(a @ np.eye(8), a)  # products still work
        assert set(blas_counts()) == {2}
        with kernels.blas_threads(2):
            assert set(blas_counts()) == {2}
        with kernels.blas_threads(), kernels.blas_threads(2):  # the inner one wins, then
            assert set(blas_counts()) == {2}                     # both restore in turn
        assert set(blas_counts()) == {2}


def test_blas_threads_scans_again_after_an_import(monkeypatch):
    # a library with a BLAS of its own arrives with an import (SciPy's OpenBLAS, which a
    # kernel's first compile loads): a controller made before it would leave it out
    import sys
    import types

    from kernels import threads

    first = threads._controller()
    assert threads._controller() is first  # nothing imported since: the same scan
    monkeypatch.setitem(sys.modules, "hpcgw_test_new_module", types.ModuleType("m"))
    again = threads._controller()
    assert again is not first
    assert threads._controller() is again


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1", None])
def test_blas_threads_refuses_a_limit_that_is_not_a_positive_integer(bad):
    with threadpool_limits(2, user_api="blas"):
        with pytest.raises(KernelInputError, match="limit must be a positive integer"):
            kernels.blas_threads(bad)
        assert set(blas_counts()) == {2}  # nothing changed


def test_kmeans_gemm_pool_runs_its_products_on_one_blas_thread(monkeypatch, rng):
    # without the split (a NumPy whose BLAS kernels.gemm cannot call), the chunked-GEMM
    # assignment alternates np.matmul with Numba kernels on Python worker threads; with
    # BLAS threaded too the pools fight over the cores (docs/kernels.md)
    seen = []
    real = np.matmul

    def spy(*args, **kwargs):
        seen.append(tuple(blas_counts()))
        return real(*args, **kwargs)

    x = rng.standard_normal((3000, 40))
    c = rng.standard_normal((33, 40))
    assert cluster._uses_gemm(c)
    monkeypatch.setattr(cluster, "GEMM_SPLIT", False)
    with threadpool_limits(2, user_api="blas"):
        monkeypatch.setattr(np, "matmul", spy)
        labels, _ = cluster.kmeans_assign(x, c)
        monkeypatch.setattr(np, "matmul", real)
        assert set(blas_counts()) == {2}  # restored after the call
    assert seen and all(set(s) == {1} for s in seen)
    d = ((x[:, None, :] - c[None]) ** 2).sum(axis=2)
    assert (labels == d.argmin(axis=1)).all()


def test_kmeans_gemm_split_pins_blas_from_any_thread(monkeypatch, rng, gemm_split):
    # the split path (each Numba thread makes its own BLAS calls) pins NumPy's OpenBLAS
    # through kernels.gemm.one_thread, which works from a worker thread (a Dask task)
    # while the main thread holds a threadpoolctl limit; threadpoolctl's own pin does
    # nothing there, and the products would then wake OpenBLAS's pool on every call
    import threading

    seen = []
    real = cluster._assign_split

    def numpy_blas_threads():  # the library the split calls (SciPy's may load another)
        return {i["num_threads"] for i in threadpool_info()
                if i["user_api"] == "blas" and "numpy" in (i.get("filepath") or "")}

    def spy(*args):
        seen.append(numpy_blas_threads())
        return real(*args)

    monkeypatch.setattr(cluster, "_assign_split", spy)
    x = rng.standard_normal((3000, 40))
    c = rng.standard_normal((33, 40))
    want = cluster.kmeans_assign(x, c)
    got = {}
    with threadpool_limits(2, user_api="blas"):
        worker = threading.Thread(target=lambda: got.setdefault("r", cluster.kmeans_assign(x, c)))
        worker.start()
        worker.join(60)
        assert set(blas_counts()) == {2}  # put back when the worker's call left
    assert seen == [{1}, {1}]
    np.testing.assert_array_equal(got["r"][0], want[0])
    np.testing.assert_allclose(got["r"][1], want[1], rtol=1e-12)
    d = ((x[:, None, :] - c[None]) ** 2).sum(axis=2)
    assert (want[0] == d.argmin(axis=1)).all()


SHARE = """
import json, os, sys
from threadpoolctl import threadpool_info
from kernels.apps._mpi import SerialComm, share_cores
from kernels._jit import numba
t = share_cores(SerialComm())
print(json.dumps({"threads": t, "numba": numba.get_num_threads(),
                  "blas": [i["num_threads"] for i in threadpool_info()
                           if i["user_api"] == "blas"]}))
"""


def test_usable_cores_are_the_affinity_not_the_machines_count(monkeypatch):
    from kernels.apps import _mpi

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5})
    assert _mpi._usable_cores() == 2


def test_share_cores_splits_the_cores_the_process_may_use_between_local_ranks():
    # taskset narrows the affinity, as a Slurm allocation or an MPI binding does (to one
    # core first: below the machine's count wherever it has more than one);
    # NUMBA_NUM_THREADS above every expectation, so Numba's own cap hides no split taken
    # from os.cpu_count()
    taskset = require_tool("taskset", "apt-get install util-linux")
    cores = sorted(os.sched_getaffinity(0))
    n = len(cores)
    every = ",".join(map(str, cores))
    for local, cpus, want in (("1", str(cores[0]), 1), ("2", every, max(1, n // 2)),
                              ("1", every, n)):
        env = {**os.environ, "OMPI_COMM_WORLD_LOCAL_SIZE": local,
               "NUMBA_NUM_THREADS": str(n + 1)}
        out = subprocess.run([taskset, "-c", cpus, sys.executable, "-c", SHARE], env=env,
                             capture_output=True, text=True, check=True).stdout
        got = json.loads(out.strip().splitlines()[-1])
        assert got["threads"] == got["numba"] == want, (local, cpus)
        assert set(got["blas"]) == {1}
