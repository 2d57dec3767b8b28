"""The k-means and search kernels on dask arrays, for any Dask cluster.

Rows are split across blocks (columns are put in one chunk); each block runs the Numba
kernel where it lives (``map_blocks``) and only small per-block results travel: k-means
partial sums and counts, search top-k candidates. Needs ``dask[array]`` (and
``distributed`` for a cluster); imported lazily so ``import kernels`` stays light.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels import _checks, cluster, search
from kernels.errors import KernelInputError

__all__ = ["kmeans", "kmeans_assign", "kmeans_step", "topk_cosine"]

# k-means partials of all blocks up to this size are gathered and summed in the caller's
# process; above it a dask reduction sums them on the cluster. Gathering saves the
# reduction's round of tasks: LocalCluster, one worker process of 2 threads, 8 blocks of
# 50000 x 16 float32, k = 8, a step 49-51 -> 31-38 ms (16 blocks of 250000: 162 -> 130-144).
GATHER_MAX_BYTES = 8 << 20


def _da() -> Any:
    try:
        import dask.array as da
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('kernels.dask needs dask: pip install "dask[array,distributed]"') from exc
    return da


def _rows_only(x: Any, name: str = "x") -> Any:
    """``x`` as a 2-D dask array chunked along rows only."""
    da = _da()
    if not isinstance(x, da.Array):
        raise KernelInputError(f"{name} must be a dask array; use dask.array.from_array({name})")
    if x.ndim != 2:
        raise KernelInputError(f"{name} must be 2-D, got shape {x.shape}")
    _checks.float_dtype(name, x.dtype)
    return x if len(x.chunks[1]) == 1 else x.rechunk({1: -1})


def _centroids(centroids: Any, x: Any) -> np.ndarray:
    """``centroids`` cast to ``x``'s dtype and checked against it as the in-memory kernels
    check them (``cluster._centroids_for``), here in the caller rather than in every
    block's task."""
    try:
        c = np.asarray(centroids, dtype=x.dtype)
    except (TypeError, ValueError) as exc:
        raise KernelInputError(f"centroids must be a (k, {x.shape[1]}) array of numbers: "
                               f"{exc}") from None
    return cluster._centroids_for(x, c)


def kmeans_assign(x: Any, centroids: np.ndarray) -> tuple[Any, Any]:
    """Lazy ``(labels, sq_distances)`` dask arrays, one kernel call per block.

    Both come from one task per block (``_block_assign``: labels and distances side by
    side), so computing them together, ``dask.compute(labels, dist)``, runs the kernel
    once per block (two ``map_blocks`` had run it twice: 800000 x 16 rows in 8 blocks,
    k = 8, median of 15: 43 -> 27 ms with the synchronous scheduler, 36 -> 27 threaded)."""
    x = _rows_only(x)
    c = _centroids(centroids, x)
    both = x.map_blocks(_block_assign, c, dtype=np.float64, chunks=(x.chunks[0], (2,)),
                        meta=np.empty((0, 2)))  # meta given: no trial call on an empty block
    return both[:, 0].astype(np.int64), both[:, 1].astype(x.dtype)


def _block_assign(b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """One block's labels and squared distances as an ``(n, 2)`` float64 array: labels
    (``-1``..``k``) and float32/float64 distances are exact in float64."""
    labels, dist = cluster.kmeans_assign(b, c)
    out = np.empty((labels.shape[0], 2))
    out[:, 0] = labels
    out[:, 1] = dist
    return out


def _block_partials(b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """[sums (k*d), counts (k), inertia] of one block, as a (1, k*(d+1)+1) float64 row
    (``cluster._step_partials``: one pass over the block on the GEMM path or the tiles)."""
    sums, counts, inertia = cluster._step_partials(b, c)
    return np.concatenate([sums.ravel(), counts.astype(np.float64), [inertia]])[None, :]


def kmeans_step(x: Any, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """One Lloyd iteration: ``(new_centroids, counts, inertia of the old centroids)``.

    One task per block (``meta`` given: no trial call on an empty block in the caller);
    the blocks' partial sums are summed where ``GATHER_MAX_BYTES`` says."""
    x = _rows_only(x)
    c = _centroids(centroids, x)
    k, d = c.shape
    width = k * (d + 1) + 1
    parts = x.map_blocks(_block_partials, c, dtype=np.float64, meta=np.empty((0, 0)),
                         chunks=((1,) * x.numblocks[0], (width,)))
    if x.numblocks[0] * width * 8 <= GATHER_MAX_BYTES:
        tot = parts.compute().sum(axis=0)
    else:
        tot = parts.sum(axis=0).compute()
    counts = tot[k * d: k * d + k]
    new = cluster.centroids_from_sums(tot[: k * d].reshape(k, d), counts, c, x.dtype)
    return new, counts.astype(np.int64), float(tot[-1])


def kmeans(x: Any, init: np.ndarray, *, max_iter: int = 100, tol: float = 0.0
           ) -> tuple[np.ndarray, float, int]:
    """Lloyd's k-means on a dask array: ``(centroids, inertia, n_iter)``.

    Stops after ``max_iter`` or when the centroid shift (sum of squares) is <= ``tol``.
    """
    max_iter = _checks.positive_int("max_iter", max_iter)
    x = _rows_only(x)  # column chunks merged once, not in every step's graph
    c = _centroids(init, x)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        new, _, _ = kmeans_step(x, c)
        shift = float(((new - c) ** 2).sum())
        c = new
        if shift <= tol:
            break
    _, _, inertia = kmeans_step(x, c)
    return c, inertia, n_iter


def _block_topk(b: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Top-k candidates of one block as a (1, q, 2k + 1) float64 array: [scores | row
    numbers within the block | the block's row count]. The caller turns row numbers into
    the array's own from the counts: a block does not know its offset when the array's
    chunk sizes are unknown (rows picked by a mask, ``x[x[:, 0] > 0]``)."""
    s, i = search.topk_cosine(q, b, k)
    out = np.full((1, q.shape[0], 2 * k + 1), -np.inf)
    out[0, :, k:] = -1
    out[0, :, : s.shape[1]] = s
    out[0, :, k: k + i.shape[1]] = i
    out[0, :, 2 * k] = b.shape[0]
    return out


def topk_cosine(queries: np.ndarray, embeddings: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine search of in-memory ``queries`` over a dask ``embeddings`` matrix.

    Returns numpy ``(scores, indices)`` of shape ``(q, min(k, n))`` like
    :func:`kernels.search.topk_cosine` (same ordering and ties).
    """
    e = _rows_only(embeddings, "embeddings")
    q = np.ascontiguousarray(queries, dtype=e.dtype)
    if q.ndim != 2 or q.shape[1] != e.shape[1]:
        raise KernelInputError(f"queries must have shape (q, {e.shape[1]}), got {q.shape}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise KernelInputError(f"k must be a positive integer, got {k!r}")
    parts = e.map_blocks(_block_topk, q, int(k), dtype=np.float64, new_axis=2,
                         meta=np.empty((0, 0, 0)),  # no trial call on an empty block
                         chunks=((1,) * e.numblocks[0], (q.shape[0],), (2 * k + 1,)))
    cand = parts.compute()
    rows = cand[:, 0, 2 * k].astype(np.int64)  # each block's row count
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]])
    local = cand[:, :, k: 2 * k].astype(np.int64)
    idx = np.where(local < 0, -1, local + starts[:, None, None])
    scores = np.concatenate(cand[:, :, :k], axis=1).astype(e.dtype)
    return search.merge_topk(scores, np.concatenate(idx, axis=1), min(k, int(rows.sum())))
