"""Top-k cosine similarity search over an embedding matrix.

Few queries (fewer than ``GEMM_MIN_QUERIES`` float32, half that float64, a half or a
quarter of it for float32 rows of 512 or 1024 features, ``GEMM_LONG_ROWS``): one pass over
the embeddings, the rows split into chunks (``prange``); each chunk reads a row once,
scores it against every query and keeps a sorted top-k per query, so neither the q x n
score matrix nor normalised copies are materialised; chunk results are merged at the
end. This is a memory-bound scan. More queries make it compute-bound (2 q flops per
element read), so the rows go in blocks of ``GEMM_BLOCK_ROWS`` through BLAS (``queries @
block.T``, a q x block score matrix that stays in cache) and each query's top-k is kept
from its row of scores: each Numba thread does both for its own range of rows, calling
NumPy's BLAS itself (``kernels.gemm``; BLAS pinned to one thread meanwhile,
``gemm.one_thread``), where that is available, else BLAS scores each block on its own
threads and one thread selects. Scores are ``q.e / (|q| |e|)``; a zero-norm row or query
scores 0; rows with NaN are never returned. Ties go to the lower row index.
"""

from __future__ import annotations

import numpy as np

from kernels import _checks, _simd, gemm
from kernels._checks import data_address
from kernels._chunks import chunk_bounds, n_chunks
from kernels._jit import jit, num_threads, pick_twin, prange, serial_twin
from kernels.gemm import _NO_TRANS, _TRANS, _gemm_call
from kernels._prefetch import prefetch_ahead
from kernels._simd import scan_scores
from kernels.errors import KernelInputError

__all__ = ["GEMM_BLOCK_ROWS", "GEMM_MIN_QUERIES", "merge_topk", "topk_cosine"]

SCAN_HINT_MIN_BYTES = 8 << 20  # the vector scan's host-dependent hint from this size
# float64 scans from SCAN_HINT_MIN_BYTES ask for their rows 8 KiB on, on every host
# (_scan_hint): where ROW_HINTS are off (the Zen 4 host, 2026-12-07) pre-normalised float64
# rows ran at 14 GB/s without (one query, 1.4-3.8x with it), norming ones 1.2-1.4x
SCAN_HINT_ALWAYS = True
# the host-dependent hint for one float32 query only: with more, the scan spends longer on
# each row, and on the Intel host (model 167, 2026-12-08; 262144 x 64 float32, A/B in one
# process, medians of 15 per-round ratios, hint / none) it cost 2 / 4 / 8 / 16 queries
# 0.79-0.85x / 0.80-0.82x / 0.77-0.80x / 0.85-0.86x at 64 MiB and 0.99-1.00x at 16 MiB,
# where one query gained 1.10-1.20x (16 MiB) and 0.92-1.04x (64 MiB, pre-normalised /
# norming; 256 MiB 0.91x / 1.07x)
SCAN_HINT_ONE_QUERY = True
# float32 queries from which the blocked-GEMM path runs (float64: half as many). Intel
# host (Emerald Rapids, 2 cores), 262144 x 64, k = 10, scan / GEMM path split over the
# threads, medians of 7: float32 at 32, 48, 64, 96 queries 0.76, 0.92, 0.99, 1.08;
# float64 at 24, 32, 48 0.88, 0.97, 1.19 (docs/kernels.md)
GEMM_MIN_QUERIES = 64
# float32 rows of at least this many features: GEMM_MIN_QUERIES divided by the second
# number (long rows leave the GEMM path fewer scores to select from per byte read). Zen 5
# host, k = 10, 2^23 elements, scan / GEMM (medians of 5): 1536 features at 8, 16, 32,
# 48 queries 1.06, 1.24, 1.54, 1.62x; 768 features 0.83, 1.12, 1.25x at 16, 32, 48; 256
# features 0.73-0.89x up to 48 and 64 features 0.86-1.03x. float64 keeps half of
# GEMM_MIN_QUERIES (1536 features at 32 queries 0.93x, 48 1.16x).
GEMM_LONG_ROWS = ((1024, 4), (512, 2))
VEC_SCAN = True  # the fused scan through kernels._simd.scan_scores (tests turn it off too)
# rows that are not a whole number of vectors (float32 100 or 300 features, as GloVe and
# word2vec give; or fewer features than a vector) take the vector scan too, their last
# piece a masked load: one instruction with AVX-512 (an AVX2 masked load, vmaskmovps, is
# slow on AMD CPUs). Intel host, float32, vector / portable scan per round, medians:
# 100 / 300 features 1.13-1.44x, 20-72 1.19-2.42x, 3-10 1.49-3.62x
SCAN_MASKED_TAIL = _simd.VEC_BITS == 512
GEMM_BLOCK_ROWS = 4096
# the many-query path splits its rows over the threads in ranges of at least this many
# rows / 2 (it was a whole block, 4096: 2000 x 64 float32 with 1024 queries, k = 100,
# 22.3 -> 15.3-16.0 ms split; k = 10 1.04x; 4000 rows, 256 queries 1.14x)
GEMM_SPLIT_MIN_ROWS = 1024
# the many-query path scores tiles of at most GEMM_TILE scores (GEMM_BLOCK_ROWS rows by at
# least GEMM_TILE_QUERIES queries), not a block of rows against every query: a buffer of
# queries x 4096 scores per thread (512 MiB at 16384 queries) was allocated each call,
# and on fresh pages calls in a row took 18 ms instead of 3 (2000 x 64, 1024 queries).
# Zen 5 host, float32, tiles of 2^18 / 2^20 / 2^21 scores against one block of every
# query (medians of 5 alternated rounds): 10000 x 64 with 16384 queries 1.26 / 1.30 /
# 1.32x, 50000 x 128 with 4096 1.01 / 1.17 / 1.17x, 100000 x 64 with 64 1.03-1.05x
GEMM_TILE = 1 << 20
GEMM_TILE_QUERIES = 64
# each thread takes its own queries (all rows; no lists to merge) where the lists are
# pools or the rows fit in this many bytes, else its own rows. Same host, float32,
# queries / rows split: 2000 x 64 with 1024 queries 1.32x (k = 10) and 1.51x (k = 100),
# 10000 x 64 with 256 queries, k = 100 1.40x, 262144 x 64 with 64 queries, k = 1000
# 1.23x; rows that do not fit: 262144 x 64 with 64 queries, k = 10 0.92x, 10000 x 768
# 0.93x, 100000 x 64 0.98x (each thread reads all the rows)
GEMM_BY_QUERIES_MAX_BYTES = 8 << 20
GEMM_SPLIT_MIN_QUERIES = 8  # queries per thread at least, split by queries
GEMM_SPLIT = True  # many queries: threads score their own tiles (tests turn it off too)
# k from which each query's rows that beat the cut go into a pool of 2k, cut back to its
# best k when full (``_offer``), instead of into a sorted list, where a row that gets in
# moves half the list on average. Zen 5 host, 262144 x 64 float32, sorted / pooled
# (median of 5 alternated rounds) at 1, 16, 64 queries: k = 32 0.96, 0.91, 0.99x; 48
# 1.06, 1.02, 1.00x; 64 1.03, 1.11, 1.00x; 128 1.10, 1.32, 1.06x; 1000 3.4-5.6x
POOL_MIN_K = 64
# the pools' first cut (_sample_cut): SAMPLE_ROWS rows scored, in blocks of SAMPLE_BLOCK,
# where there are SAMPLE_MIN_ROWS, k is SAMPLE_MIN_K or more and k x queries at least
# SAMPLE_MIN_KQ. Zen 5 host, float32, 64 features, caches flushed, medians of 15, with /
# without: 262144 rows, 8 queries, k = 512 1.15x; 4 queries, k = 1000 1.11x; 1 query,
# k = 10000 1.24x; 100000 rows, 1 query, k = 5000 1.17x; 8 queries, k = 10000 2.0x.
# Under the rule the sample costs more than the pools' work it saves: one query, k = 100
# 0.81x, k = 1000 0.90x; 64 queries, k = 64 0.95x
SAMPLE_ROWS = 4096
SAMPLE_BLOCK = 128
SAMPLE_MIN_ROWS = 8 * SAMPLE_ROWS
SAMPLE_MIN_K = 256
SAMPLE_MIN_KQ = 4096
# the pools' final order by _radix_sort from this k, else _sort_range. Zen 5 host, one
# range, quicksort / radix, float32 / float64: 256 entries 1.05 / 0.70x, 512 1.93 /
# 1.09x, 1024 2.32 / 1.53x, 4096 3.73 / 2.22x, 30000 5.71 / 3.35x
RADIX_SORT_MIN_K = 512


@jit(refcounts=False)
def _insert(scores, idx, s, r):
    """Insert score ``s`` of row ``r`` into descending ``scores`` if it beats the last."""
    k = scores.size
    if not s > scores[k - 1]:
        return
    p = k - 1
    while p > 0 and s > scores[p - 1]:
        scores[p] = scores[p - 1]
        idx[p] = idx[p - 1]
        p -= 1
    scores[p] = s
    idx[p] = r


@jit(inline=True)
def _better(s, i, t, j):
    """Whether score ``s`` of row ``i`` ranks above score ``t`` of row ``j`` (ties: the
    lower row first). Bitwise, so no branches: which way the compares go is random."""
    return (s > t) | ((s == t) & (i < j))


@jit(inline=True)
def _swap(scores, idx, a, b):
    scores[a], scores[b] = scores[b], scores[a]
    idx[a], idx[b] = idx[b], idx[a]


@jit(refcounts=False)
def _partition(scores, idx, lo, hi):
    """Partition ``[lo, hi]`` around the median of its first, middle and last entries:
    returns the pivot's place ``p``, the entries that rank above it (``_better``) in
    ``[lo, p)``, the others in ``(p, hi]``."""
    mid = (lo + hi) // 2  # the median of lo, mid, hi goes to hi
    if _better(scores[mid], idx[mid], scores[lo], idx[lo]):
        _swap(scores, idx, mid, lo)
    if _better(scores[hi], idx[hi], scores[lo], idx[lo]):
        _swap(scores, idx, hi, lo)
    if _better(scores[mid], idx[mid], scores[hi], idx[hi]):
        _swap(scores, idx, mid, hi)
    ps, pi = scores[hi], idx[hi]
    st = lo  # [lo, st) rank above the pivot, [st, j) not: each entry is swapped with
    for j in range(lo, hi):  # st's and st moves on if it ranks above (no branch)
        s, r = scores[j], idx[j]
        scores[j] = scores[st]
        idx[j] = idx[st]
        scores[st] = s
        idx[st] = r
        st += _better(s, r, ps, pi)
    _swap(scores, idx, st, hi)
    return st


@jit(refcounts=False)
def _select_best(scores, idx, m, k):
    """Reorder ``scores[:m]`` / ``idx[:m]`` so that their best ``k`` come first, the
    ``k``-th best at ``k - 1`` (quickselect)."""
    lo, hi = 0, m - 1
    while lo < hi:
        p = _partition(scores, idx, lo, hi)
        if p == k - 1:
            return
        if p > k - 1:
            hi = p - 1
        else:
            lo = p + 1


@jit()
def _sort_range(scores, idx, lo, hi):
    """``[lo, hi]`` in rank order, best first: quicksort (``_partition``), the larger
    side of each partition kept on a stack (so at most 64 deep) while the smaller is
    sorted, ranges of 16 or fewer by insertion. (A recursive version did not link
    from Numba's cache.)"""
    stack = np.empty(128, np.int64)
    top = 0
    while True:
        while hi - lo >= 16:
            p = _partition(scores, idx, lo, hi)
            if p - lo < hi - p:
                stack[top], stack[top + 1] = p + 1, hi
                hi = p - 1
            else:
                stack[top], stack[top + 1] = lo, p - 1
                lo = p + 1
            top += 2
        for j in range(lo + 1, hi + 1):
            s, r = scores[j], idx[j]
            p = j
            while p > lo and _better(s, r, scores[p - 1], idx[p - 1]):
                scores[p] = scores[p - 1]
                idx[p] = idx[p - 1]
                p -= 1
            scores[p] = s
            idx[p] = r
        if top == 0:
            return
        top -= 2
        lo, hi = stack[top], stack[top + 1]


_RADIX = 11  # bits per pass of _radix_sort
_RADIX_MASK = (1 << _RADIX) - 1


@jit()
def _sort_keys(scores, lo, hi, keys):
    """``keys[j]``: an unsigned integer that sorts ascending as ``scores[lo + j]`` sorts
    descending (the float's bits, the sign folded in; -0.0 as +0.0, so they tie as
    ``_better`` has them). Returns the bits the keys take (32 or 64)."""
    m = hi - lo + 1
    if scores.itemsize == 4:
        b = scores[lo:hi + 1].view(np.uint32)
        for j in range(m):
            keys[j] = _fold_sign(np.uint64(b[j]), np.uint64(1) << np.uint64(31))
        return 32
    b8 = scores[lo:hi + 1].view(np.uint64)
    for j in range(m):
        keys[j] = _fold_sign(b8[j], np.uint64(1) << np.uint64(63))
    return 64


@jit(inline=True)
def _fold_sign(u, top):
    """``_sort_keys``' key of a float's bits ``u`` (sign bit ``top``): negative scores
    keep their bits (larger magnitude, larger key), the others' non-sign bits are
    flipped (larger score, smaller key); -0.0 counts as +0.0."""
    u = np.uint64(0) if u == top else u
    return u if u >= top else u ^ (top - np.uint64(1))


@jit()
def _radix_sort(scores, idx, lo, hi):
    """``_sort_range`` for long ranges: a stable LSD radix sort on ``_sort_keys``, 11 bits
    a pass (a pass whose digit all keys share is skipped), then each run of equal scores
    by row (``_sort_range``). Linear in the range, where the quicksort's branch-free
    partition walks it once per level."""
    m = hi - lo + 1
    keys = np.empty(m, np.uint64)
    nk = np.empty(m, np.uint64)
    perm = np.arange(m)
    np_ = np.empty(m, np.int64)
    nbits = _sort_keys(scores, lo, hi, keys)
    hist = np.empty(_RADIX_MASK + 1, np.int64)
    for shift in range(0, nbits, _RADIX):
        sh = np.uint64(shift)
        hist[:] = 0
        for j in range(m):
            hist[(keys[j] >> sh) & np.uint64(_RADIX_MASK)] += 1
        if hist.max() == m:
            continue
        pos = 0
        for d in range(_RADIX_MASK + 1):
            c = hist[d]
            hist[d] = pos
            pos += c
        for j in range(m):
            d = (keys[j] >> sh) & np.uint64(_RADIX_MASK)
            p = hist[d]
            hist[d] = p + 1
            nk[p] = keys[j]
            np_[p] = perm[j]
        keys, nk = nk, keys
        perm, np_ = np_, perm
    s0 = scores[lo:hi + 1].copy()
    i0 = idx[lo:hi + 1].copy()
    for j in range(m):
        scores[lo + j] = s0[perm[j]]
        idx[lo + j] = i0[perm[j]]
    j = lo
    while j <= hi:  # ties: by row
        e = j
        while e < hi and scores[e + 1] == scores[j]:
            e += 1
        if e > j:
            _sort_range(scores, idx, j, e)
        j = e + 1


@jit(refcounts=False)
def _offer(scores, idx, s, r, pooled):
    """Score ``s`` of row ``r`` into a query's list where it beats the cut, the worst
    score kept (always ``scores[-1]``): the sorted list (``_insert``), or with ``pooled``
    a pool of ``2k`` (``POOL_MIN_K``): the pool's fill count is ``idx[-1]``; once full,
    its best ``k`` are kept (``_select_best``) and the ``k``-th's score becomes the cut."""
    if not pooled:
        _insert(scores, idx, s, r)
    elif s > scores[scores.size - 1]:
        last = scores.size - 1
        m = idx[last]
        scores[m] = s
        idx[m] = r
        m += 1
        if m == last:
            k = last // 2
            _select_best(scores, idx, m, k)
            scores[last] = scores[k - 1]
            m = k
        idx[last] = m


@jit()
def _score4(qs, qinv, emb, r0, einv, s_out, i_out, offset, zero, pooled):
    """Score rows ``r0 .. r0 + 3`` against every query. Four rows at a time give four
    independent sums per query (their reductions overlap instead of waiting on each
    other) and one load of a query element feeds four FMAs."""
    nq, d = qs.shape
    e0, e1, e2, e3 = emb[r0], emb[r0 + 1], emb[r0 + 2], emb[r0 + 3]
    for q in range(nq):
        qv = qs[q]
        a0 = a1 = a2 = a3 = zero
        for t in range(d):
            w = qv[t]
            a0 += w * e0[t]
            a1 += w * e1[t]
            a2 += w * e2[t]
            a3 += w * e3[t]
        qi = qinv[q]
        _offer(s_out[q], i_out[q], a0 * (qi * einv[0]), r0 + offset, pooled)
        _offer(s_out[q], i_out[q], a1 * (qi * einv[1]), r0 + 1 + offset, pooled)
        _offer(s_out[q], i_out[q], a2 * (qi * einv[2]), r0 + 2 + offset, pooled)
        _offer(s_out[q], i_out[q], a3 * (qi * einv[3]), r0 + 3 + offset, pooled)


@jit(fastmath={"contract"})
def _inv_norm(s):
    """``1 / sqrt(s)`` correctly rounded: with the project's fast-math flags LLVM turns
    this into a reciprocal square-root estimate and a Newton step on some targets (an
    Intel host: 1 / sqrt(1) came out 0.99999994 in float32, so a row parallel to the
    query scored below an equal one), hence flags of its own."""
    return 1.0 / np.sqrt(s) if s > 0 else (s if s != s else 0.0)


@jit()
def _score1(qs, qinv, emb, r, normalized, s_out, i_out, offset, zero, pooled):
    """One row against every query (the last 1-3 rows of a chunk)."""
    nq, d = qs.shape
    e = emb[r]
    sq = zero
    for t in range(d):
        sq += e[t] * e[t]
    einv = 1.0 if normalized else _inv_norm(sq)
    for q in range(nq):
        a = zero
        for t in range(d):
            a += qs[q, t] * e[t]
        _offer(s_out[q], i_out[q], a * (qinv[q] * einv), r + offset, pooled)


@jit(parallel=True)
def _topk(qs, qinv, emb, out_s, out_i, nchunks, offset, zero, normalized, pooled):
    n, d = emb.shape
    for c in prange(nchunks):
        lo, hi = chunk_bounds(n, nchunks, c)
        einv = np.ones(4, emb.dtype)
        n4 = lo + (hi - lo) // 4 * 4
        flat = emb.reshape(-1)
        for r0 in range(lo, n4, 4):
            prefetch_ahead(flat, r0 * d, 4 * d * flat.itemsize)
            if not normalized:
                e0, e1, e2, e3 = emb[r0], emb[r0 + 1], emb[r0 + 2], emb[r0 + 3]
                s0 = s1 = s2 = s3 = zero
                for t in range(d):
                    s0 += e0[t] * e0[t]
                    s1 += e1[t] * e1[t]
                    s2 += e2[t] * e2[t]
                    s3 += e3[t] * e3[t]
                einv[0] = _inv_norm(s0)
                einv[1] = _inv_norm(s1)
                einv[2] = _inv_norm(s2)
                einv[3] = _inv_norm(s3)
            _score4(qs, qinv, emb, r0, einv, out_s[c], out_i[c], offset, zero, pooled)
        for r in range(n4, hi):
            _score1(qs, qinv, emb, r, normalized, out_s[c], out_i[c], offset, zero, pooled)


@jit(parallel=True)
def _topk_vec(qs, qinv, emb, out_s, out_i, nchunks, offset, zero, normalized, lanes, sc,
              ahead, pooled):
    """``_topk`` with ``lanes`` rows at a time scored by ``kernels._simd.scan_scores``
    (``d`` a multiple of ``lanes``, or any ``d`` where ``SCAN_MASKED_TAIL``);
    ``sc[c]`` holds chunk ``c``'s scores. A score that
    cannot beat a query's current k-th is rejected by one compare. The scan reads its
    rows in memory order, which the Zen 4 host's prefetcher follows; an Intel host's does
    not run far enough ahead, so there each step asks for the rows 8 KiB on
    (``kernels._prefetch.ROW_HINTS``: from memory 1.33-1.37x norming the rows,
    1.07-1.11x pre-normalised), where the matrix is ``SCAN_HINT_MIN_BYTES`` or more
    (``ahead``, ``_scan_hint``; float64 on every host; float32 for one query only,
    ``SCAN_HINT_ONE_QUERY``): at 2 MiB, in the L2, the hint cost 0.88-1.02x."""
    for c in prange(nchunks):
        _topk_vec_chunk(np.int64(c), qs, qinv, emb, out_s, out_i, nchunks, offset, zero,
                        normalized, lanes, sc, ahead, pooled)


@jit()
def _topk_vec_chunk(c, qs, qinv, emb, out_s, out_i, nchunks, offset, zero, normalized, lanes,
                    sc, ahead, pooled):
    """Chunk ``c`` of ``_topk_vec`` (not inlined: docs/kernels.md, "Where compile time
    goes")."""
    n, d = emb.shape
    nq = qs.shape[0]
    flat = emb.reshape(-1)
    qflat = qs.reshape(-1)
    lo, hi = chunk_bounds(n, nchunks, c)
    buf = sc[c]
    ids = out_i[c]  # (a view per offer cost a reference count, up and down, each)
    nb = lo + (hi - lo) // lanes * lanes
    for r0 in range(lo, nb, lanes):
        if ahead == 2:
            prefetch_ahead(flat, r0 * d, lanes * d * flat.itemsize)
        elif ahead:
            prefetch_ahead(flat, r0 * d, lanes * d * flat.itemsize, True)
        scan_scores(flat, r0, d, qflat, nq, qinv, normalized, buf)
        for q in range(nq):
            best = out_s[c, q]
            kth = best[best.size - 1]
            for j in range(lanes):
                v = buf[q * lanes + j]
                if v > kth:
                    _offer(best, ids[q], v, r0 + j + offset, pooled)
                    kth = best[best.size - 1]
    for r in range(nb, hi):
        _score1(qs, qinv, emb, r, normalized, out_s[c], out_i[c], offset, zero, pooled)


@jit()
def _query_inv(q, out):
    """``1 / |q_i|`` per query, the sum of squares in float64, correctly rounded
    (``_inv_norm``); 0 for a zero, NaN or inf query, whose scores then come out 0 or NaN
    as before. NumPy's einsum, divide and cast had cost 5 us of a 22 us call on 1000
    rows."""
    for i in range(q.shape[0]):
        s = 0.0
        for t in range(q.shape[1]):
            v = np.float64(q[i, t])
            s += v * v
        out[i] = _inv_norm(s) if s == s else 0.0


@jit(parallel=True)
def _merge_chunks(out_s, out_i, pooled):
    """Chunk lists merged into chunk 0's, in chunk order: a later chunk's entry that ties
    goes after the ones already there, so ties keep the lower row index. (NumPy's
    ``merge_topk`` took 0.1 ms of a 1 ms one-query scan.) Pools (``pooled``): each
    chunk's entries in turn are put after chunk 0's, the two first cut to their best
    ``k`` (``_select_best``) where both do not fit in ``2k``; then the best ``k`` of what
    is there are picked and sorted (``_radix_sort`` from ``RADIX_SORT_MIN_K``, else
    ``_sort_range``)."""
    nch, nq, width = out_s.shape
    k = width // 2 if pooled else width
    for q in prange(nq):
        best = out_s[0, q]
        idx = out_i[0, q]
        m = idx[width - 1]  # (pools: chunk 0's fill count)
        for c in range(1, nch):
            if pooled:
                cs, ci = out_s[c, q], out_i[c, q]
                mc = ci[width - 1]
                if m + mc > 2 * k:  # no room for both: each cut to its best k first
                    if m > k:
                        _select_best(best, idx, m, k)
                        m = k
                    if mc > k:
                        _select_best(cs, ci, mc, k)
                        mc = k
                best[m:m + mc] = cs[:mc]
                idx[m:m + mc] = ci[:mc]
                m += mc
            else:
                for j in range(k):
                    if not out_s[c, q, j] > best[k - 1]:
                        break
                    _insert(best, idx, out_s[c, q, j], out_i[c, q, j])
        if pooled:
            if m > k:
                _select_best(best, idx, m, k)
            if k >= RADIX_SORT_MIN_K:
                _radix_sort(best, idx, 0, k - 1)
            else:
                _sort_range(best, idx, 0, k - 1)


_topk_vec_1 = serial_twin(_topk_vec)  # calls of one chunk: no parallel launch
_topk_1 = serial_twin(_topk)
_merge_chunks_1 = serial_twin(_merge_chunks)


def _merge(out_s: np.ndarray, out_i: np.ndarray, pooled: bool) -> None:
    """``_merge_chunks``, its queries over the threads where they are pools (a pool's
    selections and sort: 80 us a query at k = 1000)."""
    pick_twin(_merge_chunks, _merge_chunks_1, out_s.shape[1] if pooled else 1)(
        out_s, out_i, pooled)


@jit()
def _inv_norms(e, out, zero):
    """``1 / |e_r|`` per row (0 for a zero row; NaN rows give NaN)."""
    n, d = e.shape
    for r in range(n):
        s = zero
        for t in range(d):
            s += e[r, t] * e[r, t]
        out[r] = _inv_norm(s)


@jit()
def _select_rows(scores, einv, out_s, out_i, offset, scale, pooled):
    """Per query (row of ``scores``): offer every column's score, times the
    row's ``einv`` when ``scale``, to that query's list (``_offer``). A score that cannot
    beat the worst kept is rejected by one compare, so this is one streaming pass."""
    nq, m = scores.shape
    for q in range(nq):
        srow = scores[q]
        best = out_s[q]
        idx = out_i[q]
        kth = best[best.size - 1]
        for r in range(m):
            v = srow[r] * einv[r] if scale else srow[r]
            if v > kth:
                _offer(best, idx, v, r + offset, pooled)
                kth = best[best.size - 1]


@jit(parallel=True)
def _topk_gemm_split(fn, qn, e, out_s, out_i, nchunks, offset, normalized, sc, einv, one,
                     zero, block, qblock, pooled, by_queries):
    """``_topk_gemm`` over ``nchunks`` threads, each scoring its tiles by BLAS calls of its
    own (``kernels.gemm``'s ``cblas_?gemm64_`` at address ``fn``, BLAS pinned to one
    thread): chunk ``c`` takes a range of the rows and selects into chunk ``c``'s lists,
    or with ``by_queries`` a range of the queries, all rows, into chunk 0's lists."""
    n, nq = e.shape[0], qn.shape[0]
    for c in prange(nchunks):
        if by_queries:
            qlo, qhi = chunk_bounds(nq, nchunks, c)
            _topk_gemm_chunk(fn, qn, e, 0, n, qlo, qhi, out_s[0], out_i[0], offset,
                             normalized, sc[c], einv[c], one, zero, block, qblock, pooled)
        else:
            lo, hi = chunk_bounds(n, nchunks, c)
            _topk_gemm_chunk(fn, qn, e, lo, hi, 0, nq, out_s[c], out_i[c], offset,
                             normalized, sc[c], einv[c], one, zero, block, qblock, pooled)


@jit()
def _topk_gemm_chunk(fn, qn, e, lo, hi, qlo, qhi, out_s, out_i, offset, normalized, buf, ei,
                     one, zero, block, qblock, pooled):
    """Rows ``[lo, hi)`` against queries ``[qlo, qhi)``, ``buf`` holding a tile's scores
    (up to ``qblock`` queries by ``block`` rows), each tile's selected into the lists."""
    d = e.shape[1]
    item = e.itemsize
    for b in range(lo, hi, block):
        m = min(block, hi - b)
        if not normalized:
            _inv_norms(e[b:b + m], ei[:m], zero)
        for q0 in range(qlo, qhi, qblock):
            mq = min(qblock, qhi - q0)
            _gemm_call(fn, _NO_TRANS, _TRANS, mq, m, d, one, data_address(qn) + q0 * d * item,
                       d, data_address(e) + b * d * item, d, zero, data_address(buf), m)
            _select_rows(buf[:mq * m].reshape((mq, m)), ei[:m], out_s[q0:q0 + mq],
                         out_i[q0:q0 + mq], b + offset, not normalized, pooled)


def warm_gemm(dtype) -> None:
    """Compile (or load) the many-query path's split kernel for ``dtype`` whatever this
    process's thread count (``kernels.warmup``'s entry)."""
    blas = gemm._numpy_blas()
    if blas is None:
        return
    dt = np.dtype(dtype)
    e = np.arange(24, dtype=dt).reshape(8, 3)
    qn = np.ones((2, 3), dt)
    out_s = np.full((2, 2, 1), -np.inf, dt)
    out_i = np.full((2, 2, 1), -1, np.int64)
    with gemm.one_thread(blas):
        _topk_gemm_split(blas.gemm[dt], qn, e, out_s, out_i, 2, 0, False,
                         np.empty((2, 2 * 4), dt), np.ones((2, 4), dt), dt.type(1.0),
                         dt.type(0.0), 4, 2, False, False)
    if out_i[:, :, 0].tolist() != [[3, 3], [7, 7]]:
        raise RuntimeError(f"kernels.search: the split GEMM path came out wrong: {out_i}")

def _topk_gemm(q: np.ndarray, qinv: np.ndarray, e: np.ndarray, kk: int, offset: int,
               normalized: bool, cut: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Many queries: BLAS scores a tile of rows by queries, then selection. Where
    ``kernels.gemm`` can call NumPy's BLAS from Numba's threads, each thread does that
    for its own queries or rows (``_topk_gemm_split``, ``GEMM_BY_QUERIES_MAX_BYTES``);
    else BLAS (threaded) scores each tile and one thread selects."""
    nq, n = q.shape[0], e.shape[0]
    qn = q * qinv[:, None]
    pooled = kk >= POOL_MIN_K
    blas = gemm._numpy_blas()
    by_q = pooled or e.nbytes <= GEMM_BY_QUERIES_MAX_BYTES
    if by_q:
        nch = min(num_threads(), -(-nq // GEMM_SPLIT_MIN_QUERIES))
    else:
        nch = min(num_threads(), -(-n // min(GEMM_BLOCK_ROWS, GEMM_SPLIT_MIN_ROWS)))
    block = min(GEMM_BLOCK_ROWS, n if by_q else -(-n // nch))
    qblock = min(nq, max(GEMM_TILE_QUERIES, GEMM_TILE // block))
    zero = q.dtype.type(0)
    if blas is not None and GEMM_SPLIT:
        out_s, out_i = _lists(1 if by_q else nch, nq, kk, q.dtype, pooled, cut)
        sc = np.empty((nch, qblock * block), q.dtype)
        einv = np.ones((nch, block), q.dtype)
        with gemm.one_thread(blas):  # from any thread (threadpoolctl's pin is not)
            _topk_gemm_split(blas.gemm[q.dtype], qn, e, out_s, out_i, nch, offset,
                             normalized, sc, einv, q.dtype.type(1.0), zero, block, qblock,
                             pooled, by_q)
        if pooled or not by_q:
            _merge(out_s, out_i, pooled)
        return _result(out_s, out_i, kk)
    out_s, out_i = _lists(1, nq, kk, q.dtype, pooled, cut)
    buf = np.empty(qblock * block, q.dtype)
    einv = np.ones(block, q.dtype)
    for lo in range(0, n, block):
        blk = e[lo:lo + block]
        m = blk.shape[0]
        if not normalized:
            _inv_norms(blk, einv[:m], zero)
        for q0 in range(0, nq, qblock):
            sc = buf[:min(qblock, nq - q0) * m].reshape(-1, m)
            np.matmul(qn[q0:q0 + qblock], blk.T, out=sc)
            _select_rows(sc, einv[:m], out_s[0, q0:q0 + qblock], out_i[0, q0:q0 + qblock],
                         lo + offset, not normalized, pooled)
    if pooled:
        _merge(out_s, out_i, pooled)
    return _result(out_s, out_i, kk)


def _lists(nch: int, nq: int, k: int, dtype: np.dtype, pooled: bool,
           cut: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each chunk's per-query lists, empty: scores -inf and rows -1, ``k`` of each, or
    with ``pooled`` a pool of ``2k`` and its cut (-inf, or per query ``cut``) and fill
    count (``_offer``)."""
    out_s = np.full((nch, nq, 2 * k + 1 if pooled else k), -np.inf, dtype)
    out_i = np.full(out_s.shape, -1, np.int64)
    if pooled:
        out_i[:, :, -1] = 0
        if cut is not None:
            out_s[:, :, -1] = cut
    return out_s, out_i


def _sample_cut(q: np.ndarray, qinv: np.ndarray, e: np.ndarray, k: int,
                normalized: bool) -> np.ndarray | None:
    """Per query, a score that judging by ``SAMPLE_ROWS`` rows (blocks of
    ``SAMPLE_BLOCK`` spread over ``e``) at least ``k`` rows beat, with a margin: the
    pools start from it, so the rows under it are never appended. None outside the rule
    above ``SAMPLE_ROWS`` or where the margin would take the whole sample. The caller
    checks that ``k`` rows did beat it (``topk_cosine``)."""
    n = e.shape[0]
    if n < SAMPLE_MIN_ROWS or k < SAMPLE_MIN_K or k * q.shape[0] < SAMPLE_MIN_KQ:
        return None
    nb = SAMPLE_ROWS // SAMPLE_BLOCK
    starts = np.arange(nb) * (n - SAMPLE_BLOCK) // (nb - 1)
    rows = e[(starts[:, None] + np.arange(SAMPLE_BLOCK)).ravel()]
    want = k * rows.shape[0] / n
    m = int(want + 4 * np.sqrt(want) + 8)  # the m-th best of the sample
    if m >= rows.shape[0]:
        return None
    s = gemm.matmul(q * qinv[:, None], rows.T)  # (not BLAS's pool: it would spin)
    if not normalized:
        with np.errstate(divide="ignore"):
            norm = np.sqrt(np.einsum("ij,ij->i", rows, rows))
            s *= np.where(norm > 0, 1 / norm, 0)  # a zero row scores 0, a NaN row NaN
    s[np.isnan(s)] = -np.inf  # (rows with NaN never count)
    cut = np.partition(s, s.shape[1] - m, axis=1)[:, s.shape[1] - m]
    # a little under it: rows that tie with the sample's m-th pass too, whatever the
    # last bits of their scores in the scan or BLAS (scores are at most 1 in size)
    return cut - 8 * np.finfo(s.dtype).eps


def _result(out_s: np.ndarray, out_i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk 0's merged lists, their first ``k`` entries (a pool's copied out, so the
    caller gets C-contiguous arrays of its own)."""
    if out_s.shape[2] == k:
        return out_s[0], out_i[0]
    return out_s[0, :, :k].copy(), out_i[0, :, :k].copy()


def merge_topk(scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge candidate lists ``(q, m)`` into the best ``k`` per query (desc score, asc index).

    Used to merge chunk, rank (MPI) and block (Dask) results; index -1 marks padding.
    """
    s = np.where(indices < 0, -np.inf, scores)
    order = np.lexsort((np.where(indices < 0, np.iinfo(np.int64).max, indices), -s), axis=-1)
    order = order[:, :k]
    return np.take_along_axis(scores, order, -1), np.take_along_axis(indices, order, -1)


def _gemm_min_queries(dtype: np.dtype, d: int) -> int:
    """Queries from which ``topk_cosine`` takes the blocked-GEMM path."""
    if dtype == np.float32:
        for features, div in GEMM_LONG_ROWS:
            if d >= features:
                return max(1, GEMM_MIN_QUERIES // div)
    return max(1, GEMM_MIN_QUERIES * 4 // dtype.itemsize)


def topk_cosine(
    queries: np.ndarray, embeddings: np.ndarray, k: int, *, offset: int = 0,
    normalized: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``embeddings`` most cosine-similar to each row of ``queries``.

    Returns ``(scores, indices)`` of shape ``(q, min(k, n))``, best first; ``indices`` are
    row numbers plus ``offset`` (for shards). -1 / -inf pad when fewer valid rows exist.
    ``normalized=True`` says the embedding rows already have unit norm (skips their norms).
    """
    q = _checks.float_array("queries", queries, ndim=2)
    e = _checks.float_array("embeddings", embeddings, ndim=2, dtype=q.dtype)
    k = _checks.positive_int("k", k)
    if e.shape[1] != q.shape[1]:
        raise KernelInputError(
            f"embeddings must have {q.shape[1]} columns like queries, got shape {e.shape}"
        )
    n = e.shape[0]
    kk = min(k, n)
    qinv = np.empty(q.shape[0], q.dtype)
    _query_inv(q, qinv)
    gemm_path = bool(kk and q.shape[0] >= _gemm_min_queries(q.dtype, e.shape[1])
                     and e.shape[1])
    offset, normalized = int(offset), bool(normalized)
    cut = _sample_cut(q, qinv, e, kk, normalized)
    s, i = _search(q, qinv, e, kk, offset, normalized, gemm_path, cut)
    if cut is not None:
        short = i[:, kk - 1] < 0  # fewer than k rows beat the cut (NaN rows, or a sample
        if short.any():  # that misled): those queries again, without one
            s[short], i[short] = _search(q[short], qinv[short], e, kk, offset, normalized,
                                         gemm_path, None)
    return s, i


def _scan_hint(e: np.ndarray, nq: int = 1) -> int:
    """``_topk_vec``'s ``ahead`` for ``nq`` queries: 0 no hint, 1 the host-dependent one
    (``row_hint``; float32 one query only: ``SCAN_HINT_ONE_QUERY``), 2 a hint on any
    host (float64, ``SCAN_HINT_ALWAYS``)."""
    if e.nbytes < SCAN_HINT_MIN_BYTES:
        return 0
    if SCAN_HINT_ALWAYS and e.itemsize == 8:
        return 2
    return 1 if nq == 1 or not SCAN_HINT_ONE_QUERY else 0


def _search(q: np.ndarray, qinv: np.ndarray, e: np.ndarray, kk: int, offset: int,
            normalized: bool, gemm_path: bool,
            cut: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``topk_cosine`` after its checks: the many-query path or the scan, lists (pools
    where ``cut`` is given) starting from ``cut``."""
    n = e.shape[0]
    if gemm_path:
        return _topk_gemm(q, qinv, e, kk, offset, normalized, cut)
    pooled = kk >= POOL_MIN_K
    # pools: a chunk per thread (each chunk fills its own pool of 2k, merged afterwards)
    nch = n_chunks(n, min_rows=512)
    if pooled:
        nch = min(nch, num_threads())
    out_s, out_i = _lists(nch, q.shape[0], max(kk, 1), q.dtype, pooled, cut)
    if kk == 0 or q.shape[0] == 0:
        return _result(out_s, out_i, kk)
    lanes = _simd.VEC_BITS // 8 // q.itemsize  # rows per scan_scores call
    if (VEC_SCAN and (e.shape[1] % lanes == 0 or SCAN_MASKED_TAIL) and e.shape[1]
            and e.flags.c_contiguous):
        sc = np.empty((nch, q.shape[0] * lanes), q.dtype)
        pick_twin(_topk_vec, _topk_vec_1, nch)(
            q, qinv, e, out_s, out_i, nch, offset, q.dtype.type(0), normalized,
            lanes, sc, _scan_hint(e, q.shape[0]), pooled)
    else:
        pick_twin(_topk, _topk_1, nch)(q, qinv, e, out_s, out_i, nch, offset,
                                       q.dtype.type(0), normalized, pooled)
    if nch > 1 or pooled:
        _merge(out_s, out_i, pooled)
    return _result(out_s, out_i, kk)
