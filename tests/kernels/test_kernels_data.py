"""kernels.data.take_rows: mini-batch rows gathered by index, against NumPy's x[idx]."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import data
from kernels.errors import KernelDtypeError, KernelInputError


# threads from 64 KiB or 1024 rows on
@pytest.mark.parametrize("rows,cols", [(5, 6), (300, 6), (1000, 6), (1024, 6), (1000, 24),
                                       (1100, 4), (1100, 16)])  # (rows that divide a line)
def test_take_rows_matches_numpy_fancy_indexing(dtype, rng, rows, cols, monkeypatch):
    calls = []
    for name in ("_take", "_take_1"):
        real = getattr(data, name)
        monkeypatch.setattr(data, name, lambda *a, real=real, name=name:
                            calls.append((name, a[3])) or real(*a))
    x = rng.standard_normal((20000, cols)).astype(dtype)
    x[7, 3] = np.nan  # copied as it is
    idx = rng.integers(0, 20000, rows)
    idx[:3] = [7, 7, 19999]  # repeats and the last row
    got = data.take_rows(x, idx)
    np.testing.assert_array_equal(got, x[idx])
    assert got.dtype == dtype and got.flags.c_contiguous
    nbytes = rows * cols * dtype.itemsize
    # the parallel kernel whenever the copy is large enough and there are threads
    threads = min(data.num_threads(), rows // (2 * data.AHEAD))
    big = nbytes >= data.PARALLEL_MIN_BYTES or rows >= data.PARALLEL_MIN_ROWS
    big = big and threads > 1
    assert calls == ([("_take", threads)] if big else [("_take_1", 1)])
    out = np.full((rows, cols), -1, dtype)
    assert data.take_rows(x, idx.astype(np.int32), out=out) is out  # any integer dtype
    np.testing.assert_array_equal(out, x[idx])


def test_take_rows_into_a_slice_of_a_batch_buffer_and_edge_shapes(rng):
    # the training app's use: a rank's share of a batch into the front of one buffer
    x = rng.standard_normal((300, 8)).astype(np.float32)
    buf = np.zeros((64, 8), np.float32)
    idx = np.sort(rng.choice(300, 40, replace=False))
    got = data.take_rows(x, idx, out=buf[:40])
    assert np.shares_memory(got, buf)
    np.testing.assert_array_equal(buf[:40], x[idx])
    assert not buf[40:].any()
    assert data.take_rows(x, np.zeros(0, np.int64)).shape == (0, 8)
    assert data.take_rows(np.zeros((3, 0)), np.array([2, 0])).shape == (2, 0)
    one = data.take_rows(x[:1], np.zeros(5, np.int64))
    np.testing.assert_array_equal(one, np.repeat(x[:1], 5, axis=0))


@pytest.mark.parametrize("bad", [-1, 300, 10**12])
def test_an_index_out_of_range_is_refused_before_anything_is_written(rng, bad):
    x = rng.standard_normal((300, 8))
    idx = np.arange(100)
    idx[57] = bad
    out = np.full((100, 8), 7.0)
    with pytest.raises(KernelInputError, match=rf"idx must be in \[0, 300\).*idx\[57\] = {bad}"):
        data.take_rows(x, idx, out=out)
    assert (out == 7.0).all()  # negative indices are not counted from the end


def test_bad_arguments_name_the_argument_and_the_fix(rng):
    x = rng.standard_normal((50, 6))
    idx = np.arange(10)
    with pytest.raises(KernelInputError, match="x must be a 2-D numpy array"):
        data.take_rows(x[0], idx)
    with pytest.raises(KernelInputError, match="x must be a 2-D numpy array, got list"):
        data.take_rows(x.tolist(), idx)
    with pytest.raises(KernelInputError, match=r"C-contiguous.*np.ascontiguousarray\(x\)"):
        data.take_rows(x[:, ::2], idx)
    with pytest.raises(KernelDtypeError, match=r"x has dtype int64.*astype\(np.float32\)"):
        data.take_rows(np.zeros((5, 2), np.int64), idx[:2])
    with pytest.raises(KernelDtypeError, match="idx must be an integer numpy array"):
        data.take_rows(x, idx.astype(np.float64))
    with pytest.raises(KernelInputError, match="idx must be 1-D"):
        data.take_rows(x, idx.reshape(2, 5))
    with pytest.raises(KernelInputError, match=r"out must have shape \(10, 6\)"):
        data.take_rows(x, idx, out=np.empty((10, 5)))
    with pytest.raises(KernelDtypeError, match="out must be a float64 array"):
        data.take_rows(x, idx, out=np.empty((10, 6), np.float32))
    with pytest.raises(KernelInputError, match="out must not overlap x"):
        data.take_rows(x, idx, out=x[20:30])
    before = x.copy()
    with pytest.raises(KernelInputError):
        data.take_rows(x, idx, out=x[5:15])
    np.testing.assert_array_equal(x, before)


def test_warm_compiles_both_forms_and_checks_them():
    for dt in (np.float32, np.float64):
        data.warm(dt)
    assert data._take.signatures and data._take_1.signatures
