"""Mini-batches: rows of a data matrix gathered by index, on every core.

``x[idx]`` (NumPy's fancy indexing) copies the rows one after another on one thread,
and for a shuffled mini-batch each row is a cache miss: the loads wait on memory in
turn. :func:`take_rows` splits the rows over Numba's threads and asks for each row (a
hint per cache line of it) ``AHEAD`` rows before it copies it, so several misses are in
flight per core. Emerald Rapids host, 2 cores, 1024 sorted random rows of a 131072-row
matrix that a 32 MiB write had pushed out of cache, medians of 196, us, NumPy / the
kernel with a hint for a row's first and last line / a hint per line: float32 x 32
34-47 / 21-23 / 19-22, x 256 122-143 / 87-95 / 76-84, float64 x 128 128-152 / 86-98 /
77-88 (ranges: two runs). One thread without hints had been 1.3x slower than with.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels import _checks
from kernels._chunks import chunk_bounds
from kernels._jit import jit, num_threads, pick_twin, prange, serial_twin
from kernels._prefetch import prefetch
from kernels.errors import KernelInputError

__all__ = ["take_rows"]

AHEAD = 8  # rows asked for before they are copied (4 to 32 measured alike; 0 was 1.3x slower)
# a call copying fewer bytes than this and fewer rows than that runs on the calling
# thread only: the rows are cache misses, so their count matters as well as their bytes
# (1024 rows of 32 bytes, in cache: one thread 5.8 us, two 4.7; 512 rows out of cache:
# 6.6 and 8.1)
PARALLEL_MIN_BYTES = 64 << 10
PARALLEL_MIN_ROWS = 1024


@jit(parallel=True)
def _take(x, idx, out, nchunks):
    """``out[i] = x[idx[i]]``, chunks of ``idx`` on the threads, each row asked for
    ``AHEAD`` rows before it is copied (a hint per cache line of it); first, on the
    calling thread, every index is checked: returns the position of the first outside
    ``[0, len(x))`` (nothing written), else -1. One call for both: a second dispatch cost
    more than the check."""
    m = idx.size
    n = x.shape[0]
    for i in range(m):
        if idx[i] < 0 or idx[i] >= n:
            return i
    d = x.shape[1]
    flat = x.reshape(-1)
    step = 64 // x.itemsize  # one hint per cache line
    tail = 64 % max(1, d * x.itemsize) != 0  # rows that may end in a line of their own
    for c in prange(nchunks):
        lo, hi = chunk_bounds(m, nchunks, c)
        for i in range(lo, hi):
            if i + AHEAD < hi:
                at = idx[i + AHEAD] * d
                e = at
                while e < at + d:  # (a range with this step divides for its length:
                    prefetch(flat, e)  # rows of 16 bytes in cache took 2x as long)
                    e += step
                if tail:
                    prefetch(flat, at + d - 1)
            r = idx[i]
            for t in range(d):
                out[i, t] = x[r, t]
    return -1


_take_1 = serial_twin(_take)


def take_rows(x: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``idx`` of the 2-D array ``x``, in that order: ``x[idx]`` for a mini-batch.

    ``x`` is float32 or float64 and C-contiguous (it is not copied: a data matrix is
    gathered from many times); ``idx`` a 1-D integer array of row numbers in
    ``[0, len(x))`` (negative numbers are refused, not counted from the end). The rows go
    into ``out`` when given (shape ``(len(idx), x.shape[1])``, ``x``'s dtype), else into
    a new array. An index out of range raises :class:`KernelInputError` before anything
    is written.
    """
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        got = x.shape if isinstance(x, np.ndarray) else type(x).__name__
        raise KernelInputError(f"x must be a 2-D numpy array, got {got}")
    if x.dtype not in _checks.FLOAT_DTYPES:
        x = _checks.float_array("x", x)  # raises, naming the dtype and the cast
    if not x.flags.c_contiguous:
        raise KernelInputError("x must be C-contiguous (make it so once with "
                               "np.ascontiguousarray(x), not per batch)")
    ix = _checks.int_array("idx", idx)
    o = _checks.out_array("out", out, (ix.size, x.shape[1]), x.dtype)
    if out is not None and np.shares_memory(o, x):
        raise KernelInputError("out must not overlap x")
    big = o.nbytes >= PARALLEL_MIN_BYTES or ix.size >= PARALLEL_MIN_ROWS
    nch = num_threads() if big else 1
    nch = max(1, min(nch, ix.size // (2 * AHEAD)))
    bad = pick_twin(_take, _take_1, nch)(x, ix, o, nch)
    if bad >= 0:
        raise KernelInputError(f"idx must be in [0, {x.shape[0]}) (rows of x), got "
                               f"idx[{bad}] = {ix[bad]}")
    return o


def warm(dtype: Any) -> None:
    """Compile (or load) both forms for ``dtype`` (``kernels.warmup``'s entry)."""
    x = np.arange(12, dtype=dtype).reshape(4, 3)
    ix = np.array([3, 0, 2, 1] * 8)
    out = np.empty((ix.size, 3), dtype)
    for nch in (1, 2):
        (_take_1 if nch == 1 else _take)(x, ix, out, nch)
    if not np.array_equal(out, x[ix]):
        raise RuntimeError(f"kernels.data: take_rows came out wrong: {out}")
