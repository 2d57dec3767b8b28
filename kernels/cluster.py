"""k-means: fused distance + argmin assignment, and the centroid update.

Assignment never materialises the n x k distance matrix. For small ``d * k`` each point
is compared with four centroids at a time (four accumulators, so each load of the point
feeds four FMAs) using ``|c|^2 - 2 x.c`` and keeps the running minimum. For large
``d * k`` (see ``_uses_gemm``) chunks of rows go through BLAS GEMM as in scikit-learn,
with the argmin done per chunk in cache; with many centroids or few columns
(``_uses_tiles``) through a tile-major copy of ``x`` made for the call, as a Lloyd run
does. A whole Lloyd run (:func:`kmeans`), whatever
``d`` and ``k``, first makes a tile-major transposed copy of ``x`` (``KMeansTiles``) and then
assigns with ``kernels._simd.tile_argmin``: 32 float32 rows (16 float64) against four
centroids at a time (on a CPU without AVX-512, half a tile per call: at 512 bits the eight
accumulators did not fit AVX2's registers, and 100000 x 64, k = 64 took 309 ms for 20
iterations instead of 177), the dot products and running minima in registers, no horizontal
sums and no distance block in memory; 3.5 ms per iteration against 4.7-5.1 for the BLAS
path at n = 100000, d = k = 64 (the copy, about 4 ms, pays back in one or two
iterations), and the cluster sums are added per tile. The update sums points per
cluster into per-chunk partial buffers (float64) and reduces them, which is also the
shape the MPI and Dask versions need (partial sums + counts, then one all-reduce).
Rows containing NaN are labelled -1 and left out of the update.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kernels import _checks, gemm
from kernels._checks import data_address
from kernels._chunks import chunk_bounds, n_chunks
from kernels._jit import jit, num_threads, prange
from kernels.gemm import _NO_TRANS, _TRANS, _gemm_call
from kernels.threads import blas_threads
from kernels._simd import VEC_BITS, tile_argmin
from kernels.errors import KernelInputError

__all__ = [
    "KMeansTiles",
    "centroids_from_sums",
    "kmeans",
    "kmeans_assign",
    "kmeans_partial_sums",
    "kmeans_update",
]

_SUB_BYTES = 2 * VEC_BITS // 8  # one tile_argmin call: 2 vectors of rows (see _tile_pass)


@jit(parallel=True)
def _assign(x, c, cn, labels, mind, zero):
    n, d = x.shape
    k = c.shape[0]
    for i in prange(n):
        xi = x[i]
        xn = zero
        for t in range(d):
            xn += xi[t] * xi[t]
        best = np.inf
        bj = -1
        j = 0
        while j + 4 <= k:
            a0 = zero
            a1 = zero
            a2 = zero
            a3 = zero
            c0, c1, c2, c3 = c[j], c[j + 1], c[j + 2], c[j + 3]
            for t in range(d):
                v = xi[t]
                a0 += v * c0[t]
                a1 += v * c1[t]
                a2 += v * c2[t]
                a3 += v * c3[t]
            for q, a in enumerate((a0, a1, a2, a3)):
                dist = cn[j + q] - 2.0 * a
                if dist < best:
                    best = dist
                    bj = j + q
            j += 4
        for jj in range(j, k):
            a = zero
            cj = c[jj]
            for t in range(d):
                a += xi[t] * cj[t]
            dist = cn[jj] - 2.0 * a
            if dist < best:
                best = dist
                bj = jj
        labels[i] = bj
        mind[i] = max(best + xn, 0.0) if bj >= 0 else np.nan


@jit()
def _argmin_cols(gt, cn, labels, mind, lo):
    """Labels of rows ``lo .. lo + m`` from ``gt = c @ x[lo:lo+m].T`` (k, m); ``mind``
    gets the best ``|c|^2 - 2 x.c`` (see :func:`_finish_dist`).

    Vectorised across rows: for each centroid every row compares ``|c|^2 - 2 x.c`` with
    its running best and keeps it with selects (strict ``<``: ties keep the lower index;
    a NaN distance never wins, so a NaN row keeps label -1).
    """
    k, m = gt.shape
    best = mind[lo:lo + m]
    lab = labels[lo:lo + m]
    for r in range(m):
        best[r] = np.inf
        lab[r] = -1
    j = 0
    while j + 4 <= k:  # four centroids per sweep: a quarter of the loads/stores of best/lab
        c0, c1, c2, c3 = cn[j], cn[j + 1], cn[j + 2], cn[j + 3]
        g0, g1, g2, g3 = gt[j], gt[j + 1], gt[j + 2], gt[j + 3]
        for r in range(m):
            b = best[r]
            lb = lab[r]
            dist = c0 - 2.0 * g0[r]
            win = dist < b
            b = dist if win else b
            lb = j if win else lb
            dist = c1 - 2.0 * g1[r]
            win = dist < b
            b = dist if win else b
            lb = j + 1 if win else lb
            dist = c2 - 2.0 * g2[r]
            win = dist < b
            b = dist if win else b
            lb = j + 2 if win else lb
            dist = c3 - 2.0 * g3[r]
            win = dist < b
            best[r] = dist if win else b
            lab[r] = j + 3 if win else lb
        j += 4
    for jj in range(j, k):
        cj = cn[jj]
        gj = gt[jj]
        for r in range(m):
            dist = cj - 2.0 * gj[r]
            win = dist < best[r]
            best[r] = dist if win else best[r]
            lab[r] = jj if win else lab[r]


@jit()
def _finish_dist(x, labels, mind, lo, hi, zero):
    """``mind`` held ``|c|^2 - 2 x.c`` of the best centroid: add ``|x|^2`` (clamped at 0;
    NaN for a row without a label). Skipped inside a Lloyd run, which needs no distances."""
    for i in range(lo, hi):
        xn = zero
        for t in range(x.shape[1]):
            xn += x[i, t] * x[i, t]
        mind[i] = max(mind[i] + xn, 0.0) if labels[i] >= 0 else np.nan


# The cost rule (measured on 2 cores, 100k points): BLAS GEMM beats the fused kernel from
# d * k = 1024 multiply-adds per point on, when k >= 32 (the fused kernel pays one
# horizontal sum per point and centroid, so many centroids hurt it most; with few
# centroids the GEMM's separate argmin pass costs more than it saves).
GEMM_MIN_DK = 1024
GEMM_MIN_K = 32
@jit()
def _add_rows(x, labels, lo, hi, psum, pcnt):
    """Add rows ``lo .. hi`` of ``x`` into their clusters' sums/counts (label -1 skipped)."""
    # Branch-free: the same loop inside ``if lab >= 0`` ran 4-5x slower (measured); a
    # skipped row adds selected zeros (not 0 * x, which would spread a NaN) to row 0.
    for i in range(lo, hi):
        lab = labels[i]
        ok = lab >= 0
        row = lab if ok else 0
        pcnt[row] += 1 if ok else 0
        acc = psum[row]
        xi = x[i]
        for t in range(acc.size):
            acc[t] += xi[t] if ok else 0.0


# size of one chunk's c @ x_chunk.T: with its rows of x, within a 2 MiB L2. Split path,
# medians of 11, 256 KiB / 512 KiB / 1 MiB / 2 MiB, ms: 100000 x 64, k = 64 float32 4.85 /
# 4.80 / 5.13 / 5.33, float64 8.25 / 8.01 / 8.44 / 9.49; 100000 x 32, k = 256 8.45 / 8.48 /
# 8.69 / 9.27; 20000 x 128, k = 32 1.36 / 1.64 / 1.66 / 2.24; 200000 x 16, k = 64 5.58 /
# 5.24 / 5.11 / 5.75
CHUNK_BYTES = 1 << 19
GEMM_SPLIT = True  # False: the Python-thread pool even where the split could run (tests)
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide worker pool per size (a Lloyd run calls this every iteration)."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="kmeans-gemm")
    return _POOLS[workers]


@jit(parallel=True)
def _assign_split(fn, x, c, cn, labels, mind, psum, pcnt, gts, rows, nparts, sums, dist,
                  one, zero):
    """The GEMM path on Numba's threads: part ``p`` takes its own run of row chunks and,
    for each, makes one BLAS call ``gt = c @ x_chunk.T`` (``kernels.gemm._gemm_call``,
    NumPy's OpenBLAS on the calling thread) into its buffer ``gts[p]``, then the argmin,
    the sums (``sums``) and the distances (``dist``), while the chunk is in cache."""
    n, d = x.shape
    k = c.shape[0]
    nblk = (n + rows - 1) // rows
    item = x.itemsize
    for p in prange(nparts):
        gt = gts[p]
        for j in range(nblk * p // nparts, nblk * (p + 1) // nparts):
            lo = j * rows
            hi = min(n, lo + rows)
            m = hi - lo
            _gemm_call(fn, _NO_TRANS, _TRANS, k, m, d, one, data_address(c), d,
                       data_address(x) + lo * d * item, d, zero, data_address(gt), m)
            _argmin_cols(gt[:k * m].reshape((k, m)), cn, labels, mind, lo)
            if sums:
                _add_rows(x, labels, lo, hi, psum[p], pcnt[p])
            if dist:
                _finish_dist(x, labels, mind, lo, hi, zero)


def _assign_gemm(x: np.ndarray, c: np.ndarray, cn: np.ndarray, labels: np.ndarray,
                 mind: np.ndarray, sums: bool = False, dist: bool = True
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """Chunked GEMM path, as scikit-learn: chunks of rows whose ``c @ x_chunk.T`` fits in
    ``CHUNK_BYTES``, then :func:`_argmin_cols` on it while in cache; the n x k matrix is never
    formed. With ``sums`` the chunk is also added into per-thread cluster sums (one pass
    over x per Lloyd iteration); ``dist=False`` leaves ``mind`` as ``|c|^2 - 2 x.c``.
    BLAS runs single-threaded inside the threads: BLAS threads and Numba's both
    spin-wait, and alternating the two pools on the same cores was 10x slower. Where
    ``kernels.gemm`` can call NumPy's OpenBLAS from Numba's threads, each thread takes a
    run of chunks (``_assign_split``, pinned with ``gemm.one_thread``, which works from
    any thread); else a pool of Python threads calls ``np.matmul``."""
    n, (k, d) = x.shape[0], c.shape
    rows = max(64, min(n, CHUNK_BYTES // (k * x.itemsize)))
    nblk = -(-n // rows)
    workers = max(1, min(num_threads(), nblk))
    psum = np.zeros((workers, k, d), np.float64)
    pcnt = np.zeros((workers, k), np.int64)
    blas = gemm._numpy_blas() if GEMM_SPLIT else None
    if blas is not None:
        gts = np.empty((workers, k * rows), x.dtype)
        with gemm.one_thread(blas):
            _assign_split(blas.gemm[x.dtype], x, c, cn, labels, mind,
                          psum, pcnt, gts, rows, workers, sums, dist, x.dtype.type(1),
                          x.dtype.type(0))
    else:
        _assign_pool(x, c, cn, labels, mind, psum, pcnt, rows, workers, sums, dist)
    return (psum.sum(axis=0), pcnt.sum(axis=0)) if sums else None


def _assign_pool(x: np.ndarray, c: np.ndarray, cn: np.ndarray, labels: np.ndarray,
                 mind: np.ndarray, psum: np.ndarray, pcnt: np.ndarray, rows: int,
                 workers: int, sums: bool, dist: bool) -> None:
    """``_assign_split`` without NumPy's OpenBLAS at hand: Python threads (the kernels
    release the GIL) call ``np.matmul`` with BLAS limited by threadpoolctl."""
    n, k = x.shape[0], c.shape[0]
    starts = list(range(0, n, rows))
    zero = x.dtype.type(0)

    def work(w: int) -> None:
        buf = np.empty((k, rows), x.dtype)
        for lo in starts[w::workers]:
            hi = min(n, lo + rows)
            gt = buf if hi - lo == rows else np.empty((k, hi - lo), x.dtype)
            np.matmul(c, x[lo:hi].T, out=gt)
            _argmin_cols(gt, cn, labels, mind, lo)
            if sums:
                _add_rows(x, labels, lo, hi, psum[w], pcnt[w])
            if dist:
                _finish_dist(x, labels, mind, lo, hi, zero)

    with blas_threads(1):
        if workers == 1:
            work(0)
        else:
            list(_pool(workers).map(work, range(workers)))


# One kmeans_assign through KMeansTiles (the tile-major copy made for that call alone)
# where the copy pays back: k >= 256 at any d, k >= 64 up to 16 columns, k >= 16 up to 8
# (see _uses_tiles). Zen 5 host, fused or GEMM path / tiles with the copy, time: 200000
# rows, d = 1-3, k = 256 6.3-13.9x, k = 64 3.0-5.7x, k = 16 1.1-2.5x, k = 8 0.6-1.6x;
# 100000 rows, k = 256 at d = 16-256 1.19-1.52x, k = 1024 1.62-2.12x, k = 64 at d = 16
# 1.05-1.28x but d = 32-256 0.75-0.94x, k = 8-16 at d >= 16 0.20-1.0x.
TILES_MIN_K = 256
TILES_FEW_COLUMNS = ((8, 16), (16, 64))  # (up to this many columns, from this many k)
TILES_MAX_BYTES = 1 << 30  # larger x: no temporary copy of it
# and rows x centroids of at least this: the tiles' setup costs 15-20 us a call (10-100
# rows 0.3-0.9x; 1000 x 16 0.7-0.8x, 1000 x 64 1.3-1.7x, 10000 x 16 1.2-1.4x)
TILES_MIN_WORK = 32768


def _uses_tiles(x: np.ndarray, c: np.ndarray) -> bool:
    """Whether one :func:`kmeans_assign` goes through a ``KMeansTiles`` copy of ``x``."""
    k, d = c.shape
    if d == 0 or x.nbytes > TILES_MAX_BYTES or x.shape[0] * k < TILES_MIN_WORK:
        return False
    return k >= TILES_MIN_K or any(d <= cols and k >= kmin for cols, kmin in TILES_FEW_COLUMNS)


def _uses_gemm(c: np.ndarray) -> bool:
    """The cost rule: BLAS pays off from ``d * k >= GEMM_MIN_DK`` and ``k >= GEMM_MIN_K``."""
    return c.shape[0] >= GEMM_MIN_K and c.shape[0] * c.shape[1] >= GEMM_MIN_DK


def kmeans_assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid for each row of ``x``: returns ``(labels int64, sq_distances)``.

    Ties go to the lower centroid index; rows with NaN get label -1 and distance NaN.
    """
    x = _checks.float_array("x", x, ndim=2)
    c = _centroids_for(x, centroids)
    n = x.shape[0]
    if n and _uses_tiles(x, c):
        return KMeansTiles(x).assign(c)
    labels = np.empty(n, np.int64)
    mind = np.empty(n, x.dtype)
    if n:
        cn = np.einsum("ij,ij->i", c, c)
        if _uses_gemm(c):
            _assign_gemm(x, c, cn, labels, mind)
        else:
            _assign(x, c, cn, labels, mind, x.dtype.type(0))
    return labels, mind


@jit(parallel=True)
def _partial_sums(x, labels, psum, pcnt, nchunks):
    n, d = x.shape
    for c in prange(nchunks):
        lo, hi = chunk_bounds(n, nchunks, c)
        for i in range(lo, hi):
            lab = labels[i]
            if lab < 0:
                continue
            pcnt[c, lab] += 1
            for t in range(d):
                psum[c, lab, t] += x[i, t]


def kmeans_partial_sums(
    x: np.ndarray, labels: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (float64, (k, d)) and counts (int64, (k,)) of the rows of ``x``.

    These add across shards, so MPI ranks or Dask blocks can sum them and then call
    :func:`centroids_from_sums`. Labels of -1 are skipped.
    """
    x = _checks.float_array("x", x, ndim=2)
    lab = _checks.int_array("labels", labels)
    k = _checks.positive_int("k", k)
    if lab.shape[0] != x.shape[0]:
        raise KernelInputError(f"labels must have shape ({x.shape[0]},), got {lab.shape}")
    if lab.size and lab.max() >= k:
        raise KernelInputError(f"labels must be < k={k}, got max {lab.max()}")
    nch = n_chunks(x.shape[0], min_rows=256)
    psum = np.zeros((nch, k, x.shape[1]), np.float64)
    pcnt = np.zeros((nch, k), np.int64)
    if x.shape[0]:
        _partial_sums(x, lab, psum, pcnt, nch)
    return psum.sum(axis=0), pcnt.sum(axis=0)


def centroids_from_sums(
    sums: np.ndarray, counts: np.ndarray, previous: np.ndarray | None = None, dtype=None
) -> np.ndarray:
    """Centroids = sums / counts; an empty cluster keeps ``previous`` (or NaN without it)."""
    counts = np.asarray(counts)
    out = np.full(sums.shape, np.nan, np.float64)
    nz = counts > 0
    out[nz] = sums[nz] / counts[nz, None]
    if previous is not None:
        out[~nz] = previous[~nz]
    return out.astype(dtype if dtype is not None else np.float64)


def kmeans_update(
    x: np.ndarray, labels: np.ndarray, k: int, previous: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """New centroids (dtype of ``x``) and counts from an assignment."""
    sums, counts = kmeans_partial_sums(x, labels, k)
    return centroids_from_sums(sums, counts, previous, x.dtype), counts


@jit(parallel=True)
def _transpose_tiles(x, xt, ldx):
    """Tile-major transposed copy: tile ``b`` (rows ``b*T .. b*T+T-1``, T = 128 bytes of
    the dtype) is the contiguous block ``xt[b*d*T : (b+1)*d*T]`` with
    ``xt[b*d*T + t*T + l] = x[b*T + l, t]``; rows past ``n`` are zero. One sequential
    stream per tile when read back (a plain ``(d, n)`` transpose made 64 streams). Row
    by row, each row read in order and written down its column of the tile (which stays
    in L1): 1.6-3.4x faster than column by column (200000 x 16 float32 2.97 -> 0.88 ms,
    x 100 17.9 -> 8.9)."""
    n, d = x.shape
    tile = 128 // xt.itemsize
    for b in prange(ldx // tile):
        r0 = b * tile
        base = b * d * tile
        for l in range(tile):
            if r0 + l < n:
                row = x[r0 + l]
                for t in range(d):
                    xt[base + t * tile + l] = row[t]
            else:
                for t in range(d):
                    xt[base + t * tile + l] = 0.0


@jit(parallel=True)
def _tile_pass(x, xt, ldx, cf, cnp, kp, labels, sums, psum, pcnt, xn, mind, inert, nchunks):
    """One pass over a tile-major transposed copy of ``x`` (``_transpose_tiles``): per tile
    of 2L rows, ``kernels._simd.tile_argmin`` finds each row's nearest centroid with the
    dot products and running minima in registers (ties to the lower index, NaN never
    wins, padded centroids have ``|c|^2 = inf``). Then, with ``sums`` (a Lloyd step), the
    tile's rows are added into the chunk's cluster sums. Unless ``mind`` is empty it gets
    the squared distances (``|c|^2 - 2 x.c + |x|^2``, NaN for a row without a label;
    ``xn`` holds the rows' ``|x|^2``); unless ``inert`` is empty, ``inert[ch]`` gets their
    sum over chunk ``ch`` (rows without a label left out), summed in a local and stored
    once per chunk: written out and summed by NumPy, or added into ``inert[ch]`` per tile
    (neighbouring chunks' entries share a cache line), the inertia had cost 31-45% of a
    step at 200000 x 16, k = 8; now 0-11%."""
    n, d = x.shape
    tile = 128 // xt.itemsize
    sub = _SUB_BYTES // xt.itemsize  # rows per tile_argmin call: the tile or half of it
    ntiles = ldx // tile
    for ch in prange(nchunks):
        best = np.empty(tile, xt.dtype)
        lab = np.empty(tile, np.int64)
        tot = 0.0
        for b in range(ch * ntiles // nchunks, (ch + 1) * ntiles // nchunks):
            r0 = b * tile
            for h in range(0, tile, sub):
                tile_argmin(cf, cnp, kp, xt, d, tile, b * d * tile + h, best[h:], lab[h:])
            m = min(tile, n - r0)
            for l in range(m):
                labels[r0 + l] = lab[l]
            if sums:
                _add_rows(x, labels, r0, r0 + m, psum[ch], pcnt[ch])
            if mind.size:
                for l in range(m):
                    mind[r0 + l] = max(best[l] + xn[r0 + l], 0.0) if lab[l] >= 0 else np.nan
            if inert.size:
                for l in range(m):
                    tot += max(best[l] + xn[r0 + l], 0.0) if lab[l] >= 0 else 0.0
        if inert.size:
            inert[ch] = tot


def _centroids_for(x: np.ndarray, centroids: np.ndarray, name: str = "centroids") -> np.ndarray:
    """``centroids`` checked against the rows ``x`` (dtype, columns, at least one)."""
    c = _checks.float_array(name, centroids, ndim=2, dtype=x.dtype)
    if c.shape[1] != x.shape[1]:
        raise KernelInputError(f"{name} must have {x.shape[1]} columns like x, got shape {c.shape}")
    if c.shape[0] == 0:
        raise KernelInputError(f"{name} is empty; k-means needs at least one centroid")
    return c


class KMeansTiles:
    """Rows ``x`` copied once into the tile-major layout ``kernels._simd.tile_argmin``
    reads, for many Lloyd steps over the same rows: :func:`kmeans` makes one per run, a
    rank of the MPI app one per shard. ``step(c)`` gives in one pass what
    :func:`kmeans_assign` and :func:`kmeans_partial_sums` give together, plus the
    inertia; ``assign(c)`` what :func:`kmeans_assign` gives. The copy costs about one
    pass over ``x`` (and as much memory); a single :func:`kmeans_assign` pays it back
    only with many centroids or few columns (``_uses_tiles``), and keeps its own paths
    otherwise (the copy and tiles were 0.16-0.51x of its fused kernel there)."""

    def __init__(self, x: np.ndarray) -> None:
        x = _checks.float_array("x", x, ndim=2)
        if not x.shape[1]:
            raise KernelInputError(f"x must have at least one column, got shape {x.shape}")
        self.x = x
        tile = 128 // x.itemsize
        self.ldx = (x.shape[0] + tile - 1) // tile * tile
        self.xt = np.empty(x.shape[1] * self.ldx, x.dtype)
        _transpose_tiles(x, self.xt, self.ldx)
        self.xn = np.einsum("ij,ij->i", x, x)  # |x|^2 per row, for the distances

    def _padded(self, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Centroids padded to a multiple of 4 (extra rows never win: ``|c|^2 = inf``),
        their squared norms, the padded count and a chunk count."""
        (k, d), kp = c.shape, (c.shape[0] + 3) // 4 * 4
        cp = np.zeros((kp, d), self.x.dtype)
        cp[:k] = c
        cnp = np.full(kp, np.inf, self.x.dtype)
        cnp[:k] = np.einsum("ij,ij->i", c, c)
        nch = max(1, min(4 * num_threads(), self.ldx // (128 // self.x.itemsize)))
        return cp.reshape(-1), cnp, kp, nch

    def step(self, centroids: np.ndarray, *, inertia: bool = True
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """``(labels, sums, counts, inertia)`` for ``centroids``: labels as
        :func:`kmeans_assign` gives them, float64 cluster sums and int64 counts as
        :func:`kmeans_partial_sums`, and the sum of the rows' squared distances to their
        centroid (rows with NaN left out; NaN with ``inertia=False``, which skips the
        distances)."""
        x = self.x
        c = _centroids_for(x, centroids)
        k = c.shape[0]
        cf, cnp, kp, nch = self._padded(c)
        labels = np.empty(x.shape[0], np.int64)
        inert = np.zeros(nch if inertia else 0, np.float64)
        psum = np.zeros((nch, kp, x.shape[1]), np.float64)
        pcnt = np.zeros((nch, kp), np.int64)
        _tile_pass(x, self.xt, self.ldx, cf, cnp, kp, labels, True, psum, pcnt, self.xn,
                   np.empty(0, x.dtype), inert, nch)
        total = float(inert.sum()) if inertia else float("nan")
        return labels, psum.sum(axis=0)[:k], pcnt.sum(axis=0)[:k], total

    def assign(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What :func:`kmeans_assign` returns, from the tile-major copy."""
        x = self.x
        cf, cnp, kp, nch = self._padded(_centroids_for(x, centroids))
        labels = np.empty(x.shape[0], np.int64)
        mind = np.empty(x.shape[0], x.dtype)
        psum = np.zeros((1, 1, 1), np.float64)
        pcnt = np.zeros((1, 1), np.int64)
        _tile_pass(x, self.xt, self.ldx, cf, cnp, kp, labels, False, psum, pcnt, self.xn, mind,
                   np.empty(0, np.float64), nch)
        return labels, mind


def _assign_sums(x: np.ndarray, centroids: np.ndarray, dist: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(labels, sq_distances, sums, counts)`` of one shard for ``centroids``: what
    :func:`kmeans_assign` and :func:`kmeans_partial_sums` give together (a Dask block's
    part of a Lloyd step). One pass over ``x`` on the GEMM path (sums and distances per
    chunk, in cache); assignment then partial sums on the fused path. ``dist=False``
    skips the distances (``sq_distances`` then holds nothing useful)."""
    x = _checks.float_array("x", x, ndim=2)
    c = _centroids_for(x, centroids)
    if x.shape[0] == 0 or not _uses_gemm(c):
        labels, mind = kmeans_assign(x, c)
        return (labels, mind, *kmeans_partial_sums(x, labels, c.shape[0]))
    labels = np.empty(x.shape[0], np.int64)
    mind = np.empty(x.shape[0], x.dtype)
    sums, counts = _assign_gemm(x, c, np.einsum("ij,ij->i", c, c), labels, mind, sums=True,
                                dist=dist)
    return labels, mind, sums, counts


def _step_partials(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(sums, counts, inertia)`` of one shard for centroids ``c`` (a Dask block's part
    of a Lloyd step): through a tile copy of the rows where one :func:`kmeans_assign`
    would take one (``_uses_tiles``: labels, sums and inertia in the same pass; 100000 x
    32-64 with 256 centroids 1.24-1.36x the GEMM path, 50000 x 128 with 1024 1.65-1.76x,
    Zen 5 host; few columns about even, 0.88-1.12x), else :func:`_assign_sums`."""
    if x.shape[0] and _uses_tiles(x, c):
        _, sums, counts, inertia = KMeansTiles(x).step(c)
        return sums, counts, inertia
    _, dist, sums, counts = _assign_sums(x, c)
    return sums, counts, float(np.nansum(dist, dtype=np.float64))


def _lloyd_step(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, cluster sums and counts for centroids ``c`` (:func:`_assign_sums` without
    the distances)."""
    labels, _, sums, counts = _assign_sums(x, c, dist=False)
    return labels, sums, counts


def kmeans(
    x: np.ndarray, init: np.ndarray, *, max_iter: int = 100, tol: float = 0.0
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Lloyd's k-means from ``init``: returns ``(centroids, labels, inertia, n_iter)``.

    Stops when labels stop changing or the centroid shift (sum of squares) is <= tol,
    as scikit-learn's lloyd does; labels/inertia are for the returned centroids.
    """
    x = _checks.float_array("x", x, ndim=2)
    c = _centroids_for(x, init, "init").copy()
    max_iter = _checks.positive_int("max_iter", max_iter)
    prev = None
    n_iter = 0
    tiled = KMeansTiles(x) if x.shape[0] and x.shape[1] else None
    for n_iter in range(1, max_iter + 1):
        labels, sums, counts = (tiled.step(c, inertia=False)[:3] if tiled
                                else _lloyd_step(x, c))
        new_c = centroids_from_sums(sums, counts, c, x.dtype)
        shift = float(((new_c - c) ** 2).sum())
        c = new_c
        if prev is not None and np.array_equal(labels, prev):
            break
        if shift <= tol:
            break
        prev = labels
    labels, mind = tiled.assign(c) if tiled else kmeans_assign(x, c)
    return c, labels, float(np.nansum(mind, dtype=np.float64)), n_iter
