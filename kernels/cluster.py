"""k-means: fused distance + argmin assignment, and the centroid update.

Assignment never materialises the n x k distance matrix: each point is compared with
four centroids at a time (four accumulators, so each load of the point feeds four FMAs)
using ``|c|^2 - 2 x.c`` and keeps the running minimum. The update sums points per
cluster into per-chunk partial buffers (float64) and reduces them, which is also the
shape the MPI and Dask versions need (partial sums + counts, then one all-reduce).
Rows containing NaN are labelled -1 and left out of the update.
"""

from __future__ import annotations

import numpy as np

from kernels import _checks
from kernels._chunks import chunk_bounds, n_chunks
from kernels._jit import jit, prange
from kernels.errors import KernelInputError

__all__ = [
    "centroids_from_sums",
    "kmeans",
    "kmeans_assign",
    "kmeans_partial_sums",
    "kmeans_update",
]


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


def kmeans_assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid for each row of ``x``: returns ``(labels int64, sq_distances)``.

    Ties go to the lower centroid index; rows with NaN get label -1 and distance NaN.
    """
    x = _checks.float_array("x", x, ndim=2)
    c = _checks.float_array("centroids", centroids, ndim=2, dtype=x.dtype)
    if c.shape[1] != x.shape[1]:
        raise KernelInputError(
            f"centroids must have {x.shape[1]} columns like x, got shape {c.shape}"
        )
    if c.shape[0] == 0:
        raise KernelInputError("centroids is empty; k-means needs at least one centroid")
    n = x.shape[0]
    labels = np.empty(n, np.int64)
    mind = np.empty(n, x.dtype)
    if n:
        cn = np.einsum("ij,ij->i", c, c)
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


def kmeans(
    x: np.ndarray, init: np.ndarray, *, max_iter: int = 100, tol: float = 0.0
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Lloyd's k-means from ``init``: returns ``(centroids, labels, inertia, n_iter)``.

    Stops when labels stop changing or the centroid shift (sum of squares) is <= tol,
    as scikit-learn's lloyd does; labels/inertia are for the returned centroids.
    """
    x = _checks.float_array("x", x, ndim=2)
    c = _checks.float_array("init", init, ndim=2, dtype=x.dtype).copy()
    max_iter = _checks.positive_int("max_iter", max_iter)
    prev = None
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        labels, _ = kmeans_assign(x, c)
        new_c, _ = kmeans_update(x, labels, c.shape[0], previous=c)
        shift = float(((new_c - c) ** 2).sum())
        c = new_c
        if prev is not None and np.array_equal(labels, prev):
            break
        if shift <= tol:
            break
        prev = labels
    labels, mind = kmeans_assign(x, c)
    return c, labels, float(np.nansum(mind, dtype=np.float64)), n_iter
