"""kernels.gemm.matmul: NumPy's BLAS on Numba's threads; small products on one thread."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import kernels
from kernels import gemm
from kernels._jit import numba
from kernels.errors import KernelInputError


@pytest.fixture
def splits(monkeypatch, gemm_split):
    """Every product split (no size floor); the number of split calls made."""
    assert numba.get_num_threads() >= 2, "the split needs two Numba threads"
    monkeypatch.setattr(gemm, "SPLIT_MIN_FLOPS", 0)
    calls = []
    real = gemm._gemm_split

    def spy(*args):
        calls.append(args[3:6])  # m, n, k
        return real(*args)

    monkeypatch.setattr(gemm, "_gemm_split", spy)
    return calls


def operand(rng, rows, cols, dtype, transposed):
    """A ``rows x cols`` array, C-contiguous or the transpose of a C-contiguous one."""
    if transposed:
        return rng.standard_normal((cols, rows)).astype(dtype).T
    return rng.standard_normal((rows, cols)).astype(dtype)


@pytest.mark.parametrize("ta", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("tb", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("m,k,n", [(1024, 32, 256), (256, 1024, 10), (32, 1024, 256),
                                   (7, 300, 9), (1, 5, 3), (3, 5, 1)])
def test_matmul_split_over_threads_matches_numpy(splits, dtype, rng, m, k, n, ta, tb):
    a = operand(rng, m, k, dtype, ta)
    b = operand(rng, k, n, dtype, tb)
    with kernels.blas_threads():
        got = gemm.matmul(a, b)
        out = np.full((m, n), np.nan, dtype)
        same = gemm.matmul(a, b, out=out)
    assert same is out and got.dtype == dtype and got.shape == (m, n)
    assert len(splits) == 2  # both calls took the split path
    ref = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a).max() * np.abs(b).max() * k
    tol = 1e-5 if dtype == np.float32 else 1e-13
    assert np.abs(got - ref).max() <= tol * scale
    np.testing.assert_array_equal(got, out)


def test_matmul_splits_the_longer_side_of_the_output(splits, monkeypatch, rng):
    seen = []
    real = gemm._gemm_split

    def spy(*args):
        seen.append(args[14])  # rows
        return real(*args)

    monkeypatch.setattr(gemm, "_gemm_split", spy)
    a = rng.standard_normal((40, 16))
    with kernels.blas_threads():
        tall = gemm.matmul(a, rng.standard_normal((16, 3)))
        wide = gemm.matmul(a[:3], rng.standard_normal((16, 50)))
    assert seen == [True, False]
    assert tall.shape == (40, 3) and wide.shape == (3, 50)


def blas_counts() -> set[int]:
    """NumPy's BLAS's thread count (another BLAS, such as SciPy's, may be loaded too)."""
    return {i["num_threads"] for i in threadpool_info()
            if i["user_api"] == "blas" and "numpy" in (i.get("filepath") or "")}


def test_matmul_pins_threaded_blas_for_its_call_and_puts_the_count_back(splits, rng):
    a, b = rng.standard_normal((512, 64)), rng.standard_normal((64, 300))
    with threadpool_limits(2, user_api="blas"):  # BLAS threaded, as NumPy starts
        got = gemm.matmul(a, b)
        assert blas_counts() == {2}
    assert len(splits) == 1
    np.testing.assert_allclose(got, a @ b, rtol=1e-12, atol=1e-12)


def test_matmul_from_threads_at_once_keeps_blas_pinned_until_the_last_leaves(splits, rng):
    # two Python threads (Dask's threaded workers) multiplying at the same time while the
    # main thread holds a limit (threadpoolctl would pin from the main thread only)
    import threading

    a, b = rng.standard_normal((400, 48)), rng.standard_normal((48, 200))
    want = a @ b
    bad = []

    def work():
        for _ in range(30):
            if not np.allclose(gemm.matmul(a, b), want, rtol=1e-12, atol=1e-12):
                bad.append(1)

    with threadpool_limits(2, user_api="blas"):
        workers = [threading.Thread(target=work) for _ in range(2)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        assert blas_counts() == {2}
    assert bad == [] and len(splits) == 60
    assert gemm._PIN[0] == 0


def test_matmul_runs_small_products_on_the_calling_thread(gemm_split, monkeypatch, rng):
    # under SPLIT_MIN_FLOPS: one np.matmul with BLAS pinned to one thread for it. With
    # BLAS's own pool (2 threads, as NumPy starts) a step of the training app's model at
    # batch 256 took 12 ms instead of 0.35: the pool woke for the small products, then
    # spun beside the next kernel's threads
    calls, counts = [], []
    monkeypatch.setattr(gemm, "_gemm_split", lambda *a: calls.append(a))
    real = np.matmul

    def spy(*args, **kwargs):
        counts.append(gemm._numpy_blas().threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(gemm.np, "matmul", spy)
    small = rng.standard_normal((256, 10))
    w = rng.standard_normal((10, 256))
    assert 2 * 256 * 10 * 256 < gemm.SPLIT_MIN_FLOPS
    with threadpool_limits(2, user_api="blas"):
        np.testing.assert_allclose(gemm.matmul(small, w), small @ w, rtol=1e-12)
        assert blas_counts() == {2}  # put back after the call
    assert counts == [1] and calls == []
    empty = gemm.matmul(np.ones((4, 0)), np.ones((0, 5)))
    np.testing.assert_array_equal(empty, np.zeros((4, 5)))


def test_matmul_copies_other_layouts_and_splits_them(splits, rng):
    a, b = rng.standard_normal((512, 64)), rng.standard_normal((64, 512))
    strided = a[::2]  # neither C-contiguous nor a transposed one
    np.testing.assert_allclose(gemm.matmul(strided, b), strided @ b, rtol=1e-12)
    raw = np.zeros(a.nbytes + 1, np.uint8)  # float64 at an odd address
    odd = raw[1:].view(np.float64).reshape(a.shape)
    odd[...] = a
    assert not odd.flags.aligned
    np.testing.assert_allclose(gemm.matmul(odd, b), a @ b, rtol=1e-12)
    np.testing.assert_allclose(gemm.matmul(a, b[:, ::3]), a @ b[:, ::3], rtol=1e-12)
    assert splits == [(256, 512, 64), (512, 512, 64), (512, 171, 64)]


@pytest.mark.parametrize("case,match", [
    ("shapes", "b has shape .* needs 3 rows"),
    ("int", "a has dtype int64"),
    ("mixed", "b has dtype float32 but must match"),
    ("1-D", "a must be 2-D"),
    ("out shape", "out must have shape"),
    ("out dtype", "out must be a float64 array"),
    ("out overlaps", "out must not overlap a or b"),
])
def test_matmul_refuses_bad_input_and_writes_nothing(case, match):
    a, b = np.ones((4, 3)), np.ones((3, 5))
    out = np.full((4, 5), 7.0)
    args = {
        "shapes": (a, np.ones((4, 5)), out),
        "int": (np.ones((4, 3), np.int64), b, out),
        "mixed": (a, b.astype(np.float32), out),
        "1-D": (np.ones(3), b, out),
        "out shape": (a, b, np.full((5, 4), 7.0)),
        "out dtype": (a, b, np.zeros((4, 5), np.float32)),
        "out overlaps": None,
    }[case]
    if case == "out overlaps":
        base = np.arange(32.0).reshape(4, 8)
        args = (base[:, :3], np.ones((3, 5)), base.reshape(-1)[4:24].reshape(4, 5))
        before = base.copy()
    x, y, o = args
    with pytest.raises(KernelInputError, match=match):
        gemm.matmul(x, y, out=o)
    if case == "out overlaps":
        np.testing.assert_array_equal(base, before)
    else:
        assert (out == 7.0).all()
