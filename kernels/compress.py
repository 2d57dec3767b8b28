"""Top-k gradient sparsification with error feedback, for a compressed all-reduce.

Each step sends only the ``k`` largest-magnitude entries of ``grad + residual`` and keeps
the rest in ``residual`` for the next step (error feedback: nothing is dropped, only
delayed). Ranks then all-gather ``(indices, values)`` and scatter-add them with
:func:`densify`. Ties at the threshold go to the lower index (deterministic).

Selection by threshold, two parallel passes over the data: a strided sample gives a
magnitude ``t`` that at least ``k`` entries reach (with a margin); pass 1 checks for
NaN/inf and collects the few entries ``>= t`` (about 1.2 k) into per-chunk buffers;
the exact top-k among those is a small ``np.partition``; pass 2 is ``residual += grad``
(streaming) and the k chosen entries are then zeroed. Whenever the sample misleads (fewer
than k entries reach ``t``), or k is a large fraction of n, the exact fallback runs:
``np.partition`` over all magnitudes, then a serial selection pass.
"""

from __future__ import annotations

import threading

import numpy as np

from kernels import _checks
from kernels._chunks import chunk_bounds, n_chunks
from kernels._jit import jit, prange
from kernels._simd import compress_candidates, compress_candidates_update
from kernels.errors import KernelInputError

__all__ = ["densify", "topk_sparsify"]


@jit(parallel=True)
def _accumulate_abs(g, r, mag):
    bad = 0
    for i in prange(g.size):
        a = abs(r[i] + g[i])
        mag[i] = a
        bad += 0 if a < np.inf else 1
    return bad


@jit()
def _select(g, r, mag, thr, k, idx, vals):
    n_gt = 0
    for i in range(mag.size):
        if mag[i] > thr:
            n_gt += 1
    n_eq = k - n_gt
    o = 0
    for i in range(g.size):
        a = r[i] + g[i]
        m = mag[i]
        if m > thr or (m == thr and n_eq > 0):
            if m == thr:
                n_eq -= 1
            idx[o] = i
            vals[o] = a
            o += 1
            r[i] = 0.0
        else:
            r[i] = a


@jit()
def _collect(g, r, thr, lo, hi, cidx, cval, base, cap, cnt, update):
    """Scalar: the entries ``>= thr`` in ``[lo, hi)`` into slots from ``base + cnt`` (past
    ``cap`` they are only counted); returns ``(cnt, non-finite count)``. ``update``
    stores ``r + g`` back into ``r``."""
    nbad = 0
    for i in range(lo, hi):
        a = r[i] + g[i]
        if update:
            r[i] = a
        m = abs(a)
        nbad += 0 if m < np.inf else 1
        if m >= thr:
            if cnt < cap:
                cidx[base + cnt] = i
                cval[base + cnt] = a
            cnt += 1
    return cnt, nbad


@jit(parallel=True)
def _candidates(g, r, thr, nchunks, cap, cidx, cval, counts, update):
    """Entries with ``|r + g| >= thr``, in index order, into chunk ``c``'s slots
    ``[c * cap, c * cap + cap)``; ``counts[c]`` is the full count (may exceed ``cap``).
    Returns the number of non-finite entries. 64-byte blocks go through one masked
    compress-store each (``kernels._simd``) while a whole block's worth of slots is
    free; the rest of a chunk (and a chunk that ran out of slots) is scalar. ``update``
    also writes ``r + g`` into ``r`` (every entry exactly once): the one-pass mode."""
    bad = 0
    lanes = 64 // g.itemsize
    for c in prange(nchunks):
        lo, hi = chunk_bounds(g.size, nchunks, c)
        cnt = 0
        nbad = 0
        base = c * cap
        i = lo
        while i + lanes <= hi and cnt + lanes <= cap:
            if update:
                res = compress_candidates_update(g, r, i, thr, cidx, cval, base + cnt)
            else:
                res = compress_candidates(g, r, i, thr, cidx, cval, base + cnt)
            cnt += res & 0xFFFFFFFF
            nbad += res >> 32
            i += lanes
        cnt, nb = _collect(g, r, thr, i, hi, cidx, cval, base, cap, cnt, update)
        counts[c] = cnt
        bad += nbad + nb
    return bad


@jit(parallel=True)
def _add_into(r, g):
    for i in prange(r.size):
        r[i] = r[i] + g[i]


@jit()
def _gather_mags(cval, counts, cap, mag):
    """Magnitudes of every chunk's candidates, packed (for the k-th largest)."""
    o = 0
    for c in range(counts.size):
        for j in range(c * cap, c * cap + counts[c]):
            mag[o] = abs(cval[j])
            o += 1


@jit()
def _pick(cidx, cval, counts, cap, t, k, idx, vals):
    """The k chosen candidates, in index order: all with ``|a| > t``, then ties at
    ``t`` by lower index (chunks are in index order, and so is each chunk's list)."""
    n_gt = 0
    for c in range(counts.size):
        for j in range(c * cap, c * cap + counts[c]):
            n_gt += 1 if abs(cval[j]) > t else 0
    n_eq = k - n_gt
    o = 0
    for c in range(counts.size):
        for j in range(c * cap, c * cap + counts[c]):
            m = abs(cval[j])
            if m > t or (m == t and n_eq > 0):
                if m == t:
                    n_eq -= 1
                idx[o] = cidx[j]
                vals[o] = cval[j]
                o += 1


_WS = threading.local()


def _workspace(name: str, n: int, dtype) -> np.ndarray:
    """A per-thread buffer of at least ``n`` elements, reused across calls: a training
    loop sparsifies every step, and fresh candidate buffers cost page faults on first
    touch (measured: about 4 ms of a 22 ms call at n = 2**25, k = 1%)."""
    key = (name, np.dtype(dtype).str)
    bufs = getattr(_WS, "bufs", None)
    if bufs is None:
        bufs = _WS.bufs = {}
    have = bufs.get(key)
    if have is None or have.size < n:
        have = bufs[key] = np.empty(n, dtype)
    return have[:n]


def _sample_threshold(g: np.ndarray, r: np.ndarray, k: int) -> float | None:
    """A magnitude that, judging by a strided sample of 65536 entries, at least ``k``
    entries reach (about 1.2 k for k = 1% of n); None if the sample holds NaN/inf."""
    n = g.size
    step = max(1, n // 65536)
    s = np.abs(r[::step] + g[::step])
    if not np.isfinite(s).all():
        return None
    want = k * s.size / n
    rank = min(s.size, int(want + 4 * np.sqrt(want) + 8))
    return float(np.partition(s, s.size - rank)[s.size - rank])


_ADDED = object()  # one-pass mode fell back after residual already absorbed grad


def _topk_by_threshold(g: np.ndarray, r: np.ndarray, k: int, one_pass: bool):
    """The threshold selection; None when the exact fallback must run instead (nothing
    changed yet), ``_ADDED`` when it must run on ``r`` alone (one-pass mode: ``r``
    already holds ``r + g``)."""
    thr = _sample_threshold(g, r, k)
    if thr is None:
        return None
    nch = n_chunks(g.size, min_rows=1 << 14)
    expect = 2 * k / nch + 1024
    cap = int(expect)
    counts = np.zeros(nch, np.int64)
    for _ in range(2):  # second round only if a chunk overflowed its slots
        cidx = _workspace("cidx", nch * cap, np.int64)
        cval = _workspace("cval", nch * cap, g.dtype)
        if _candidates(g, r, g.dtype.type(thr), nch, cap, cidx, cval, counts, one_pass):
            if one_pass:
                raise KernelInputError(_NONFINITE + " (one_pass=True: residual already "
                                       "holds residual + grad)")
            return None
        if counts.max() <= cap:
            break
        if one_pass:
            return _ADDED
        cap = int(counts.max())
    total = int(counts.sum())
    if total < k:
        return _ADDED if one_pass else None
    mag = _workspace("mag", total, g.dtype)
    _gather_mags(cval, counts, cap, mag)
    t = np.partition(mag, total - k)[total - k]
    idx = np.empty(k, np.int64)
    vals = np.empty(k, g.dtype)
    _pick(cidx, cval, counts, cap, t, k, idx, vals)
    if not one_pass:
        _add_into(r, g)
    r[idx] = 0
    return idx, vals


_NONFINITE = "grad + residual has NaN or inf; skip this step (or reset residual to zeros)"


def topk_sparsify(
    grad: np.ndarray, residual: np.ndarray, k: int, *, one_pass: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Select the top-``k`` of ``grad + residual`` by magnitude; update ``residual`` in place.

    ``grad`` and ``residual`` are flat (1-D) arrays of one dtype; ``residual`` must be
    C-contiguous and writable (start it at zeros). Returns ``(indices int64 ascending,
    values)``. Non-finite gradients are refused before ``residual`` is touched.

    ``one_pass=True`` reads ``grad`` and ``residual`` once instead of twice (the
    candidate scan also stores ``residual + grad``), about 1.5x faster on large vectors.
    A NaN or inf is still refused, but ``residual`` then already holds
    ``residual + grad``: use it where the step is dropped on error anyway, or where the
    gradients were checked before (as a loss-scaler does).
    """
    g = _checks.float_array("grad", grad, ndim=1)
    _checks.writable_target("residual", residual, g)
    if not residual.flags.c_contiguous:
        raise KernelInputError("residual must be C-contiguous (it is updated in place)")
    k = _checks.positive_int("k", k)
    k = min(k, g.size)
    if g.size == 0:
        return np.empty(0, np.int64), np.empty(0, g.dtype)
    if k <= g.size // 8 and g.size >= 1 << 16:
        fast = _topk_by_threshold(g, residual, k, bool(one_pass))
        if fast is _ADDED:
            g = np.zeros_like(g)  # rare (the sample misled): finish on residual alone
        elif fast is not None:
            return fast
    idx = np.empty(k, np.int64)
    vals = np.empty(k, g.dtype)
    mag = np.empty_like(g)
    if _accumulate_abs(g, residual, mag):
        raise KernelInputError(_NONFINITE)
    thr = np.partition(mag, g.size - k)[g.size - k]  # numpy's introselect, O(n)
    _select(g, residual, mag, thr, k, idx, vals)
    return idx, vals


def densify(indices: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Scatter-add ``(indices, values)`` (possibly from several ranks) into a dense vector."""
    idx = _checks.int_array("indices", indices)
    vals = _checks.float_array("values", values, ndim=1)
    _checks.shape_is("values", vals, idx.shape)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise KernelInputError(f"indices must be in [0, {n}), got [{idx.min()}, {idx.max()}]")
    out = np.zeros(n, vals.dtype)
    np.add.at(out, idx, vals)
    return out
