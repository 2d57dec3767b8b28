"""kernels.blas_threads: NumPy's BLAS pinned while kernels run, and restored after."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import kernels
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


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1", None])
def test_blas_threads_refuses_a_limit_that_is_not_a_positive_integer(bad):
    with threadpool_limits(2, user_api="blas"):
        with pytest.raises(KernelInputError, match="limit must be a positive integer"):
            kernels.blas_threads(bad)
        assert set(blas_counts()) == {2}  # nothing changed


def test_kmeans_gemm_path_runs_its_products_on_one_blas_thread(monkeypatch, rng):
    # the chunked-GEMM assignment alternates np.matmul with Numba kernels on worker
    # threads; with BLAS threaded too the pools fight over the cores (docs/kernels.md)
    seen = []
    real = np.matmul

    def spy(*args, **kwargs):
        seen.append(tuple(blas_counts()))
        return real(*args, **kwargs)

    x = rng.standard_normal((3000, 40))
    c = rng.standard_normal((33, 40))
    assert cluster._uses_gemm(c)
    with threadpool_limits(2, user_api="blas"):
        monkeypatch.setattr(np, "matmul", spy)
        labels, _ = cluster.kmeans_assign(x, c)
        monkeypatch.setattr(np, "matmul", real)
        assert set(blas_counts()) == {2}  # restored after the call
    assert seen and all(set(s) == {1} for s in seen)
    d = ((x[:, None, :] - c[None]) ** 2).sum(axis=2)
    assert (labels == d.argmin(axis=1)).all()
