"""Top-k gradient sparsification with error feedback, for a compressed all-reduce.

Each step sends only the ``k`` largest-magnitude entries of ``grad + residual`` and keeps
the rest in ``residual`` for the next step (error feedback: nothing is dropped, only
delayed). Ranks then all-gather ``(indices, values)`` and scatter-add them with
:func:`densify`. Ties at the threshold go to the lower index (deterministic).

Selection by threshold, two parallel passes over the data: a sample gives a
magnitude ``t`` that at least ``k`` entries reach (with a margin); pass 1 checks for
NaN/inf and collects the few entries ``>= t`` (about 1.2 k) into per-chunk buffers;
the k-th largest magnitude among those is found by a radix select (``_kth_largest``);
pass 2 is ``residual += grad`` (streaming), zeroing the k chosen entries block by block
as it goes. Whenever the sample misleads (fewer than k entries reach ``t``), or k is a
large fraction of n, the exact fallback runs: the same select over all magnitudes,
then a serial selection pass.

Small ``k`` over at most ``POOL_MAX_N`` entries (``_pool_max_k``) skips both: one serial
pass keeps the magnitudes above a rising cut in a small pool (``_pool_kth``), which gives
the k-th largest, and the select pass follows.

With ``out=`` (and in :class:`ErrorFeedback`) pass 1 also writes ``residual + grad`` into
the separate buffer, with non-temporal stores on x86-64, and pass 2 is gone: one pass
over the data, and the caller's ``residual`` is never written, so the NaN/inf guarantee
holds without the second read. In the one-pass modes the candidates are written as 0
and the ones not chosen are put back (``_restore``, or inside ``_pick``).
"""

from __future__ import annotations

import threading

import numpy as np

from kernels import _checks
from kernels._chunks import chunk_bounds, n_chunks
from kernels._jit import jit, num_threads, prange
from kernels._prefetch import PREFETCH_BYTES, prefetch, row_hint
from kernels._simd import (
    address,
    compress_candidates,
    compress_candidates_nt,
    compress_candidates_update,
    sfence,
    stream_out,
)
from kernels.errors import KernelInputError

__all__ = ["ErrorFeedback", "densify", "topk_sparsify"]


@jit(parallel=True)
def _accumulate_abs(g, r, mag):
    bad = 0
    for i in prange(g.size):
        a = abs(r[i] + g[i])
        mag[i] = a
        bad += 0 if a < np.inf else 1
    return bad


_BLOCK = 32  # entries per block of the serial selection passes
# _pool_kth for n up to POOL_MAX_N and k up to POOL_K, or n >> POOL_N_SHIFT up to
# POOL_MAX_K (16384 entries: 16, 65536: 32)
POOL_MAX_N = 1 << 17
POOL_K = 8
POOL_N_SHIFT = 10
POOL_MAX_K = 32
_POOL_SPARE = 64  # _pool_kth's pool holds 2k + _POOL_SPARE entries (+ _BLOCK of slack)


@jit(refcounts=False)
def _pick_block(out, lo, hi, thr, n_eq, o, idx, vals):
    """``_select``'s scalar part for ``out[lo:hi]`` (already ``r + g``): the entries
    ``> thr`` and the first ``n_eq`` equal to it into ``idx``/``vals`` from ``o``, zeroed
    in ``out``; returns ``(n_eq, o)``."""
    for q in range(lo, hi):
        a = out[q]
        m = abs(a)
        if m > thr or (m == thr and n_eq > 0):
            if m == thr:
                n_eq -= 1
            idx[o] = q
            vals[o] = a
            o += 1
            out[q] = 0.0
    return n_eq, o


@jit()
def _select(g, r, out, thr, n_gt, k, idx, vals, inplace):
    """``out = r + g``, then the ``k`` entries with ``|r + g| > thr`` (``n_gt`` of them;
    -1: count them first) and the lowest-indexed ties at ``thr`` moved into ``idx``/
    ``vals`` and zeroed. Blocks of ``_BLOCK`` entries: a vector loop adds and counts the
    block's entries at ``thr`` or above, and only a block with some goes through the
    scalar ``_pick_block`` (the loop was scalar throughout: 1-1.5 ns an entry, now 0.15-0.25
    at 16384 in cache). ``inplace`` (``out`` is ``r``) stores through ``r``: stored
    through ``out``, the loop did not vectorise, since ``out`` might overlap ``r``. Blocks
    are counted from 0, not stepped to ``min(i + _BLOCK, n)``: there LLVM could not prove
    the index non-negative, and each access kept Numba's wraparound (again scalar)."""
    n = g.size
    nblk = n // _BLOCK
    if n_gt < 0:
        n_gt = 0
        for i in range(n):
            n_gt += 1 if abs(r[i] + g[i]) > thr else 0
    n_eq = k - n_gt
    o = 0
    for b in range(nblk):
        i = b * _BLOCK
        hit = 0
        if inplace:
            for j in range(_BLOCK):
                a = r[i + j] + g[i + j]
                r[i + j] = a
                hit += 1 if abs(a) >= thr else 0
        else:
            for j in range(_BLOCK):
                a = r[i + j] + g[i + j]
                out[i + j] = a
                hit += 1 if abs(a) >= thr else 0
        if hit:
            n_eq, o = _pick_block(out, i, i + _BLOCK, thr, n_eq, o, idx, vals)
    for i in range(nblk * _BLOCK, n):
        out[i] = r[i] + g[i]
    _pick_block(out, nblk * _BLOCK, n, thr, n_eq, o, idx, vals)


@jit(refcounts=False)
def _kth_in_place(a, n, k):
    """The ``k``-th largest of ``a[:n]`` (1 <= k <= n, no NaN), which this reorders:
    quickselect, a median-of-three pivot and Hoare's partition (runs of equal keys split
    evenly, so a pool of ties takes no quadratic time). Numba's ``np.partition`` took 13
    ns a key on pools of a few hundred and allocates a copy."""
    lo = 0
    hi = n - 1
    want = k - 1  # position in descending order
    while lo < hi:
        x = a[lo]
        y = a[(lo + hi) >> 1]
        z = a[hi]
        p = max(min(x, y), min(max(x, y), z))
        i = lo
        j = hi
        while i <= j:
            while a[i] > p:
                i += 1
            while a[j] < p:
                j -= 1
            if i <= j:
                t = a[i]
                a[i] = a[j]
                a[j] = t
                i += 1
                j -= 1
        if want <= j:
            hi = j
        elif want >= i:
            lo = i
        else:
            return p
    return a[want]


@jit(refcounts=False)
def _pool_block(g, r, lo, hi, cut, pool, cnt):
    """``_pool_kth``'s scalar part: ``|r + g|`` above ``cut`` in ``[lo, hi)`` appended to
    ``pool`` from ``cnt``; returns the new count."""
    for i in range(lo, hi):
        m = abs(r[i] + g[i])
        if m > cut:
            pool[cnt] = m
            cnt += 1
    return cnt


@jit(refcounts=False)
def _pool_cut(pool, cnt, k):
    """Keep the entries of ``pool[:cnt]`` above its ``k``-th largest; ``(that, count)``."""
    c = _kth_in_place(pool, cnt, k)
    o = 0
    for q in range(cnt):
        if pool[q] > c:
            pool[o] = pool[q]
            o += 1
    return c, o


@jit(refcounts=False)
def _pool_kth(g, r, k, pool):
    """One serial pass for small ``k``: ``(t, n_gt, bad)``, the ``k``-th largest
    ``|r + g|``, how many entries exceed it, and 1 if an entry is NaN/inf (the pass stops
    there). ``pool`` (``2 k`` or more, plus ``_BLOCK`` of slack) keeps the entries above a cut that
    only rises: when it fills, its ``k``-th largest becomes the cut and only the entries
    above stay. At least ``k`` entries reach the cut, so the answer is the ``k``-th of
    the pool, or the cut itself when fewer than ``k`` exceed it. The first entries fill
    the pool in a vector loop; after that a block of ``_BLOCK`` goes through the scalar
    ``_pool_block`` only when one of its entries passes the cut."""
    n = g.size
    cap = pool.size - _BLOCK
    nblk = n // _BLOCK
    fill = min(nblk, cap // _BLOCK)
    bad = 0
    for i in range(fill * _BLOCK):
        m = abs(r[i] + g[i])
        pool[i] = m
        bad += 0 if m < np.inf else 1
    if bad:
        return pool[0], 0, 1
    cnt = fill * _BLOCK
    cut = g.dtype.type(-1.0)
    if cnt >= k and fill < nblk:
        cut, cnt = _pool_cut(pool, cnt, k)
    gs = g[fill * _BLOCK:]  # indexed from 0 below: from a start LLVM cannot prove
    rs = r[fill * _BLOCK:]  # non-negative, each access kept its wraparound (scalar, 7x)
    for b in range(nblk - fill):
        i = b * _BLOCK
        hit = 0
        nb = 0
        for j in range(_BLOCK):
            m = abs(rs[i + j] + gs[i + j])
            hit += 1 if m > cut else 0
            nb += 0 if m < np.inf else 1
        if nb:
            return cut, 0, 1
        if hit:
            cnt = _pool_block(gs, rs, i, i + _BLOCK, cut, pool, cnt)
            if cnt >= cap:
                cut, cnt = _pool_cut(pool, cnt, k)
    for i in range(nblk * _BLOCK, n):
        if not abs(r[i] + g[i]) < np.inf:
            return cut, 0, 1
    cnt = _pool_block(g, r, nblk * _BLOCK, n, cut, pool, cnt)
    t = cut
    if cnt >= k:
        t = _kth_in_place(pool, cnt, k)
    n_gt = 0
    for q in range(cnt):
        n_gt += 1 if pool[q] > t else 0
    return t, n_gt, 0


@jit()
def _collect(g, r, o, thr, lo, hi, cidx, cval, base, cap, cnt, update):
    """Scalar: the entries ``>= thr`` in ``[lo, hi)`` into slots from ``base + cnt`` (past
    ``cap`` they are only counted); returns ``(cnt, non-finite count)``. ``update``
    stores ``r + g`` into ``o`` (``r`` itself in the in-place mode), 0 for each entry
    that went into a slot."""
    nbad = 0
    for i in range(lo, hi):
        a = r[i] + g[i]
        m = abs(a)
        nbad += 0 if m < np.inf else 1
        kept = a
        if m >= thr:
            if cnt < cap:
                cidx[base + cnt] = i
                cval[base + cnt] = a
                kept = 0.0
            cnt += 1
        if update:
            o[i] = kept
    return cnt, nbad


_READ, _STORE, _STORE_NT = 0, 1, 2  # what the candidate pass does with r + g


@jit(parallel=True)
def _candidates(g, r, o, thr, nchunks, cap, cidx, cval, counts, mode):
    """Entries with ``|r + g| >= thr``, in index order, into chunk ``c``'s slots
    ``[c * cap, c * cap + cap)``; ``counts[c]`` is the full count (may exceed ``cap``).
    Returns the number of non-finite entries. 64-byte blocks go through one vector
    compress each (``kernels._simd``) while a whole block's worth of slots is free; the
    rest of a chunk (and a chunk that ran out of slots) is scalar. ``mode``
    ``_STORE`` also writes ``r + g`` into ``o`` (every entry exactly once; ``o`` may be
    ``r``), with 0 for each candidate kept in a slot (``_restore`` / ``_pick`` put back
    those not chosen: far fewer scattered writes than zeroing the k chosen afterwards);
    ``_STORE_NT`` does so with non-temporal stores from the first 64-byte aligned entry
    of each chunk (``o`` separate from ``r`` and ``g``). Each block asks for the lines
    ``PREFETCH_BYTES`` ahead where ``ROW_HINTS`` (``kernels._prefetch.row_hint``): Intel
    Xeon (Emerald Rapids, 2 cores), 2^25 float32 from memory, the read-only pass 21 -> 27
    GB/s, A/B in one process: the default mode 1.15x, ``one_pass`` 1.26x, ``out=`` 1.12x
    (the default's second pass, ``_add_into_except``, 35-41 GB/s, gained nothing)."""
    bad = 0
    lanes = 64 // g.itemsize
    for c in prange(nchunks):
        lo, hi = chunk_bounds(g.size, nchunks, c)
        cnt = 0
        nbad = 0
        base = c * cap
        i = lo
        if mode == _STORE_NT:
            while i < hi and (address(o, i) & 63) != 0:
                i += 1
            cnt, nbad = _collect(g, r, o, thr, lo, i, cidx, cval, base, cap, cnt, True)
        ahead = PREFETCH_BYTES // g.itemsize
        last = g.size - 1
        while i + lanes <= hi and cnt + lanes <= cap:
            row_hint(g, min(i + ahead, last))
            row_hint(r, min(i + ahead, last))
            if mode == _STORE_NT:
                res = compress_candidates_nt(g, r, o, i, thr, cidx, cval, base + cnt)
            elif mode == _STORE:
                res = compress_candidates_update(g, r, o, i, thr, cidx, cval, base + cnt)
            else:
                res = compress_candidates(g, r, o, i, thr, cidx, cval, base + cnt)
            cnt += res & 0xFFFFFFFF
            nbad += res >> 32
            i += lanes
        cnt, nb = _collect(g, r, o, thr, i, hi, cidx, cval, base, cap, cnt, mode != _READ)
        if mode == _STORE_NT:
            sfence()
        counts[c] = cnt
        bad += nbad + nb
    return bad


_ZERO_BLOCK = 4096  # entries added before the chosen among them are zeroed (in cache)


@jit(parallel=True)
def _add_into_except(r, g, idx, nchunks):
    """``r += g``, then 0 at the sorted positions ``idx``: block by block, each block's
    chosen entries zeroed right after the block is written (still in cache). Zeroing
    them afterwards cost 1.6-1.7 ms of scattered writes at k = 1% of 2**25 float32."""
    for c in prange(nchunks):
        lo, hi = chunk_bounds(r.size, nchunks, c)
        j = np.searchsorted(idx, lo)
        for b in range(lo, hi, _ZERO_BLOCK):
            e = min(b + _ZERO_BLOCK, hi)
            rb = r[b:e]  # through slices: indexed from b, the loop was not vectorised
            gb = g[b:e]
            for i in range(rb.size):
                rb[i] = rb[i] + gb[i]
            while j < idx.size and idx[j] < e:
                r[idx[j]] = 0.0
                j += 1


@jit(parallel=True)
def _gather_mags(cval, counts, cap, mag):
    """Magnitudes of every chunk's candidates, packed (for the k-th largest). Plain
    loops over slices: ``np.cumsum`` here ran as a parallel region of its own, and a
    loop indexed from each chunk's base was not vectorised (0.25 -> 0.03 ms for 375000
    float32)."""
    start = np.empty(counts.size, np.int64)
    o = 0
    for c in range(counts.size):
        start[c] = o
        o += counts[c]
    for c in prange(counts.size):
        dst = mag[start[c]:start[c] + counts[c]]
        src = cval[c * cap:c * cap + counts[c]]
        for j in range(src.size):
            dst[j] = abs(src[j])


# bits per radix-select level: 16 (a 256 KiB int32 histogram per slice), or for a level
# over fewer than _WIDE_DIGIT_MIN keys 11 (8 KiB), 13 for a float64's first. Zeroing and
# walking 65536 buckets had cost 20-30 us a level, most of a small select: Zen 5 host,
# interleaved, medians, us, 16 / 11 bits: float32 16384 keys 47.6 / 19.2, 65536 67.7 /
# 45.0, 262144 173.6 / 151.7. A float64 first level of 11 bits is its exponent alone
# (data of a few octaves: few buckets), 0.91-0.92x at 65536-262144; of 13 bits, against
# 16: 16384 keys 41.6 / 28.2, 32768 60.8 / 48.3, 65536 85.1 / 77.1, 131072 the same
_DIGIT = 16
_DIGIT_SMALL = 11
_DIGIT_SMALL_FIRST64 = 13
_WIDE_DIGIT_MIN = 1 << 18
_SMALL_SELECT = 1 << 14  # below this many magnitudes np.partition is quicker
_GROUP = 256  # buckets summed at a time while looking for the k-th from the top


@jit(parallel=True)
def _kth_largest_bits(keys, k, nbits, nsl, hist):
    """The ``k``-th largest of ``keys`` (1 <= k <= size), the bit patterns of non-negative
    floats, which order as the floats do; ``keys`` is used as scratch. Radix select from
    the top, 16, 13 or 11 bits a level after the sign (``_DIGIT``): a histogram of the
    level's digit (``nsl`` slices in parallel, one ``hist`` row each), then the keys in
    the bucket that holds the k-th are moved to the front (each slice compacts its own
    part, then the parts are joined), until one key is left or the last digit is done
    (that level may re-read bits the levels before settled). Two passes over the
    magnitudes and a few over a small remainder: at about 375000 float32 candidates
    2.9 -> 0.6 ms against ``np.partition``."""
    m = keys.size
    top = nbits - 1  # bits below the sign still to settle
    need = k
    cnt = np.empty(nsl, np.int64)  # every slice's count is set before it is read
    while True:
        src = keys[:m]
        ns = nsl if m >= _SMALL_SELECT else 1
        if m >= _WIDE_DIGIT_MIN:
            dig = _DIGIT
        elif nbits == 64 and top == nbits - 1:  # a float64's top 11 bits are its exponent
            dig = _DIGIT_SMALL_FIRST64  # alone: too few buckets to split data on
        else:
            dig = _DIGIT_SMALL
        shift = max(top - dig, 0)  # the last level may re-read settled bits
        top = shift
        nb = 1 << dig
        mask = nb - 1
        for s in prange(ns):
            h = hist[s]
            for q in range(nb):
                h[q] = 0
            lo, hi = chunk_bounds(m, ns, s)
            for i in range(lo, hi):
                h[(src[i] >> shift) & mask] += 1
        tot = hist[0, :nb]  # plain loops: in a parallel kernel, array expressions and
        for s in range(1, ns):  # .sum() become parallel regions of their own (0.13 -> 1.4 ms)
            for q in range(nb):
                tot[q] += hist[s, q]
        grp = nb - _GROUP  # skip groups of buckets, then buckets, from the top
        while True:
            c = 0
            for q in range(grp, grp + _GROUP):
                c += tot[q]
            if c >= need:
                break
            need -= c
            grp -= _GROUP
        b = grp + _GROUP - 1
        while tot[b] < need:
            need -= tot[b]
            b -= 1
        if shift == 0 or tot[b] == 1:  # every key left in bucket b is the answer
            for i in range(m):
                if ((src[i] >> shift) & mask) == b:
                    return src[i]
        for s in prange(ns):
            lo, hi = chunk_bounds(m, ns, s)
            o = lo
            for i in range(lo, hi):
                v = src[i]
                if ((v >> shift) & mask) == b:
                    src[o] = v
                    o += 1
            cnt[s] = o - lo
        pos = cnt[0]
        for s in range(1, ns):
            lo = chunk_bounds(m, ns, s)[0]
            for j in range(cnt[s]):
                src[pos + j] = src[lo + j]
            pos += cnt[s]
        m = pos
    return keys[0]


_UINT = {4: np.uint32, 8: np.uint64}


def _kth_largest(mag: np.ndarray, k: int):
    """The ``k``-th largest entry of ``mag`` (1-D, C-contiguous, non-negative, no NaN),
    which this overwrites: every caller passes a scratch array."""
    if mag.size < _SMALL_SELECT:
        return np.partition(mag, mag.size - k)[mag.size - k]
    ut = _UINT[mag.itemsize]
    nsl = num_threads()
    hist = _workspace("hist", nsl << _DIGIT, np.int32).reshape(nsl, 1 << _DIGIT)
    bits = _kth_largest_bits(mag.view(ut), k, 8 * mag.itemsize, nsl, hist)
    return np.array([bits], ut).view(mag.dtype)[0]


@jit(parallel=True)
def _restore(o, cidx, cval, counts, cap):
    """Put every candidate kept in a slot back into ``o`` (see ``_candidates``)."""
    for c in prange(counts.size):
        for j in range(c * cap, c * cap + min(counts[c], cap)):
            o[cidx[j]] = cval[j]


_PICK_AHEAD = 128  # about 13 put-back writes ahead at k = 1%: 1.73 -> 1.57 ms at 2**25


@jit(parallel=True)
def _pick(cidx, cval, counts, cap, t, k, idx, vals, o, restore):
    """The k chosen candidates, in index order: all with ``|a| > t``, then ties at
    ``t`` by lower index (chunks are in index order, and so is each chunk's list).
    Parallel over chunks: count each chunk's ``> t`` and ``== t``, hand out the ties and
    output offsets in chunk order, then each chunk writes its own slice. ``restore``:
    the candidates not chosen go back into ``o``."""
    nch = counts.size
    ngt = np.empty(nch, np.int64)  # empty, not zeros: every chunk sets its own, and in a
    neq = np.empty(nch, np.int64)  # parallel kernel np.zeros is a parallel region
    for c in prange(nch):
        a = 0
        e = 0
        vc = cval[c * cap:c * cap + counts[c]]
        for j in range(vc.size):
            m = abs(vc[j])
            a += 1 if m > t else 0
            e += 1 if m == t else 0
        ngt[c] = a
        neq[c] = e
    start = np.empty(nch, np.int64)
    ties = np.empty(nch, np.int64)
    n_eq = k
    for c in range(nch):
        n_eq -= ngt[c]
    pos = 0
    for c in range(nch):
        start[c] = pos
        ties[c] = min(neq[c], n_eq)
        n_eq -= ties[c]
        pos += ngt[c] + ties[c]
    for c in prange(nch):
        p = start[c]
        te = ties[c]
        last = c * cap + counts[c] - 1
        for j in range(counts[c]):
            if restore:  # the line of a candidate to put back, _PICK_AHEAD candidates on
                a = min(c * cap + j + _PICK_AHEAD, last)
                if abs(cval[a]) < t:
                    prefetch(o, cidx[a])
            v = cval[c * cap + j]
            m = abs(v)
            if m > t or (m == t and te > 0):
                if m == t:
                    te -= 1
                idx[p] = cidx[c * cap + j]
                vals[p] = v
                p += 1
            elif restore:
                o[cidx[c * cap + j]] = v


_SAMPLE = 65536  # entries in the threshold sample, at most
_SAMPLE_MIN = 16384  # and at least (or n / 32 between the two)


def _sample_layout(n: int, itemsize: int) -> tuple[int, int, int]:
    """``(positions, stride, block)``: the sample is ``block`` consecutive entries (64
    bytes) from each of ``positions`` places ``stride`` apart. Whole cache lines, not
    single entries: the sample costs one line fetch per 64 bytes instead of one per
    entry (with ``_line_sample``'s prefetch, 0.8-1.0 -> 0.15-0.35 ms at n = 2**25 float32).
    About n / 32 entries, from 16384 to 65536."""
    block = max(1, 64 // itemsize)
    want = min(_SAMPLE, max(_SAMPLE_MIN, n >> 5))
    pos = max(1, min(want // block, n // block))
    return pos, n // pos, block


@jit(parallel=True)
def _line_sample(g, r, stride, block, s):
    """``s[p * block + t] = |r + g|`` at ``p * stride + t``; returns the non-finite count.
    Each place is a cache miss the core does not see coming: asking for the lines 8
    places ahead overlaps them (0.59 -> 0.15 ms at n = 2**25 float32, caches flushed)."""
    bad = 0
    npos = s.size // block
    for p in prange(npos):
        q = min(p + 8, npos - 1) * stride
        prefetch(g, q)
        prefetch(r, q)
        gs = g[p * stride:p * stride + block]  # slices: indexed from p * stride the loop
        rs = r[p * stride:p * stride + block]  # ran scalar, 0.39 -> 0.16 ms caches flushed
        ss = s[p * block:p * block + block]
        nb = 0
        for t in range(block):
            a = abs(rs[t] + gs[t])
            ss[t] = a
            nb += 0 if a < np.inf else 1
        bad += nb
    return bad


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
    """A magnitude that, judging by a sample of 16384-65536 entries (``_sample_layout``),
    at least ``k`` entries reach (about 1.2-1.35 k for k = 1% of n); None if the sample holds
    NaN/inf."""
    n = g.size
    pos, stride, block = _sample_layout(n, g.itemsize)
    s = np.empty(pos * block, g.dtype)
    if _line_sample(g, r, stride, block, s):
        return None
    want = k * s.size / n
    rank = min(s.size, int(want + 4 * np.sqrt(want) + 8))
    return float(_kth_largest(s, rank))


_ADDED = object()  # a one-pass mode fell back after ``o`` already absorbed grad


def _topk_by_threshold(g: np.ndarray, r: np.ndarray, o: np.ndarray, k: int, mode: int):
    """The threshold selection; None when the exact fallback must run instead (nothing
    changed yet), ``_ADDED`` when it must run on ``o`` alone (one-pass modes: ``o``, which
    is ``r`` itself in place, already holds ``r + g``)."""
    one_pass = mode != _READ
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
        if _candidates(g, r, o, g.dtype.type(thr), nch, cap, cidx, cval, counts, mode):
            if one_pass and o is r:
                _restore(o, cidx, cval, counts, cap)
                raise KernelInputError(_NONFINITE + " (one_pass=True: residual already "
                                       "holds residual + grad)")
            return None
        if counts.max() <= cap:
            break
        if one_pass:
            _restore(o, cidx, cval, counts, cap)
            return _ADDED
        cap = int(counts.max())
    total = int(counts.sum())
    if total < k:
        if one_pass:
            _restore(o, cidx, cval, counts, cap)
            return _ADDED
        return None
    mag = _workspace("mag", total, g.dtype)
    _gather_mags(cval, counts, cap, mag)
    t = _kth_largest(mag, k)
    idx = np.empty(k, np.int64)
    vals = np.empty(k, g.dtype)
    _pick(cidx, cval, counts, cap, t, k, idx, vals, o, one_pass)
    if not one_pass:
        _add_into_except(r, g, idx, nch)
    return idx, vals


def _pool_max_k(n: int) -> int:
    """The largest k that ``_pool_kth`` takes over ``n`` entries (n <= ``POOL_MAX_N``)."""
    return min(POOL_MAX_K, max(POOL_K, n >> POOL_N_SHIFT))


_NONFINITE = "grad + residual has NaN or inf; skip this step (or reset residual to zeros)"


def topk_sparsify(
    grad: np.ndarray, residual: np.ndarray, k: int, *, one_pass: bool = False,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Select the top-``k`` of ``grad + residual`` by magnitude; update the residual.

    ``grad`` and ``residual`` are flat (1-D) arrays of one dtype (start ``residual`` at
    zeros). Returns ``(indices int64 ascending, values)``. Non-finite gradients are
    refused (:class:`KernelInputError`) before ``residual`` is touched.

    Where the new residual goes:

    - default: into ``residual`` (C-contiguous, writable), in two passes over the data
      (the first checks for NaN/inf before anything changes);
    - ``out=spare``: into ``spare``, a second buffer like ``residual``, in one pass;
      ``residual`` is only read, so it is intact if the call raises (``out`` then holds
      nothing useful). Swap the two buffers between steps (as :class:`ErrorFeedback`
      does). The fastest mode that keeps the guarantee;
    - ``one_pass=True``: into ``residual`` in one pass, about 1.5x faster than the
      default, no second buffer. A NaN or inf is still refused, but ``residual`` may
      then already hold ``residual + grad``: use it where the step is dropped on error
      anyway, or where the gradients were checked before (as a loss-scaler does).

    Small ``k`` (up to 8, or ``n / 1024`` up to 32, over at most ``POOL_MAX_N``
    entries: ``_pool_max_k``) is selected in one pass through a small pool
    (``_pool_kth``) in every mode, so there ``residual`` is never changed by a refused
    call.
    """
    g = _checks.float_array("grad", grad, ndim=1)
    if out is None:
        _checks.writable_target("residual", residual, g)
        if not residual.flags.c_contiguous:
            raise KernelInputError("residual must be C-contiguous (it is updated in place)")
        r = o = residual
        mode = _STORE if one_pass else _READ
    else:
        if one_pass:
            raise KernelInputError("pass either out= (a separate buffer) or one_pass=True "
                                   "(in place), not both")
        r = _checks.float_array("residual", residual, ndim=1, dtype=g.dtype)
        _checks.shape_is("residual", r, g.shape)
        o = _checks.out_array("out", out, g.shape, g.dtype)
        if np.shares_memory(o, r) or np.shares_memory(o, g):
            raise KernelInputError("out must not overlap residual or grad; for an in-place "
                                   "update leave out=None")
        mode = _STORE_NT if stream_out(o) else _STORE
    k = _checks.positive_int("k", k)
    k = min(k, g.size)
    if g.size == 0:
        return np.empty(0, np.int64), np.empty(0, g.dtype)
    small = g.size <= POOL_MAX_N and k <= _pool_max_k(g.size)
    if k <= g.size // 8 and g.size >= 1 << 16 and not small:
        fast = _topk_by_threshold(g, r, o, k, mode)
        if fast is _ADDED:
            g = np.zeros_like(g)  # rare (the sample misled): finish on o alone
            r = o
        elif fast is not None:
            return fast
    if small:
        pool = _workspace("pool", 2 * k + _POOL_SPARE + _BLOCK, g.dtype)
        thr, n_gt, bad = _pool_kth(g, r, k, pool)
    else:
        mag = np.empty_like(g)
        bad = _accumulate_abs(g, r, mag)
        n_gt = -1  # _select counts them
    if bad:
        raise KernelInputError(_NONFINITE)
    if not small:
        thr = _kth_largest(mag, k)  # mag is scratch from here on
    idx = np.empty(k, np.int64)
    vals = np.empty(k, g.dtype)
    _select(g, r, o, thr, n_gt, k, idx, vals, o is r)
    return idx, vals


class ErrorFeedback:
    """Error-feedback state for one flat gradient: the residual and a spare buffer.

    ``step(grad, k)`` sparsifies ``grad + residual`` in one pass into the spare buffer
    (``topk_sparsify(..., out=)``) and then swaps the two, so a refused step (NaN/inf)
    leaves :attr:`residual` exactly as it was. Costs a second vector's worth of memory.
    """

    def __init__(self, size: int, dtype=np.float32):
        dt = np.dtype(dtype)
        if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise KernelInputError(f"dtype must be float32 or float64, got {dt}")
        n = _checks.positive_int("size", size)
        self._bufs = [np.zeros(n, dt), np.zeros(n, dt)]

    @property
    def residual(self) -> np.ndarray:
        """What has not been sent yet (assign into it with ``[...] =`` to restore)."""
        return self._bufs[0]

    def step(self, grad: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, values)`` of the top-``k`` of ``grad + residual``; see topk_sparsify."""
        r = self._bufs[0]
        g = _checks.float_array("grad", grad, ndim=1, dtype=r.dtype)
        _checks.shape_is("grad", g, r.shape)
        res = topk_sparsify(g, r, k, out=self._bufs[1])
        self._bufs.reverse()
        return res


def densify(indices: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Scatter-add ``(indices, values)`` (possibly from several ranks) into a dense vector."""
    idx = _checks.int_array("indices", indices)
    vals = _checks.float_array("values", values, ndim=1)
    _checks.shape_is("values", vals, idx.shape)
    _checks.in_range("indices", idx, n)
    out = np.zeros(n, vals.dtype)
    np.add.at(out, idx, vals)
    return out
