"""Top-k cosine similarity search over an embedding matrix.

One pass over the embeddings: the rows are split into chunks (``prange``); each chunk
reads a row once, scores it against every query and keeps a sorted top-k per query, so
neither the q x n score matrix nor normalised copies are materialised. Chunk results are
merged at the end. Scores are ``q.e / (|q| |e|)``; a zero-norm row or query scores 0;
rows with NaN are never returned. Ties go to the lower row index.
"""

from __future__ import annotations

import numpy as np

from kernels import _checks
from kernels._chunks import chunk_bounds, n_chunks
from kernels._jit import jit, prange
from kernels.errors import KernelInputError

__all__ = ["merge_topk", "topk_cosine"]


@jit()
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


@jit()
def _score_row(qs, qinv, e, einv, s_out, i_out, r, zero):
    """Score row ``e`` against all queries, four at a time (one load of e feeds four FMAs)."""
    nq, d = qs.shape
    q = 0
    while q + 4 <= nq:
        a0 = a1 = a2 = a3 = zero
        q0, q1, q2, q3 = qs[q], qs[q + 1], qs[q + 2], qs[q + 3]
        for t in range(d):
            v = e[t]
            a0 += q0[t] * v
            a1 += q1[t] * v
            a2 += q2[t] * v
            a3 += q3[t] * v
        _insert(s_out[q], i_out[q], a0 * (qinv[q] * einv), r)
        _insert(s_out[q + 1], i_out[q + 1], a1 * (qinv[q + 1] * einv), r)
        _insert(s_out[q + 2], i_out[q + 2], a2 * (qinv[q + 2] * einv), r)
        _insert(s_out[q + 3], i_out[q + 3], a3 * (qinv[q + 3] * einv), r)
        q += 4
    for qq in range(q, nq):
        a = zero
        qv = qs[qq]
        for t in range(d):
            a += qv[t] * e[t]
        _insert(s_out[qq], i_out[qq], a * (qinv[qq] * einv), r)


@jit(parallel=True)
def _topk(qs, qinv, emb, out_s, out_i, nchunks, offset, zero, normalized):
    n, d = emb.shape
    for c in prange(nchunks):
        lo, hi = chunk_bounds(n, nchunks, c)
        for r in range(lo, hi):
            e = emb[r]
            einv = 1.0
            if not normalized:
                en = zero
                for t in range(d):
                    en += e[t] * e[t]
                einv = 1.0 / np.sqrt(en) if en > 0 else 0.0
            _score_row(qs, qinv, e, einv, out_s[c], out_i[c], r + offset, zero)


def merge_topk(scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge candidate lists ``(q, m)`` into the best ``k`` per query (desc score, asc index).

    Used to merge chunk, rank (MPI) and block (Dask) results; index -1 marks padding.
    """
    s = np.where(indices < 0, -np.inf, scores)
    order = np.lexsort((np.where(indices < 0, np.iinfo(np.int64).max, indices), -s), axis=-1)
    order = order[:, :k]
    return np.take_along_axis(scores, order, -1), np.take_along_axis(indices, order, -1)


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
    nch = n_chunks(n, min_rows=512)
    out_s = np.full((nch, q.shape[0], max(kk, 1)), -np.inf, q.dtype)
    out_i = np.full((nch, q.shape[0], max(kk, 1)), -1, np.int64)
    if kk == 0 or q.shape[0] == 0:
        return out_s[0, :, :kk], out_i[0, :, :kk]
    qn = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
    qinv = np.divide(1.0, qn, out=np.zeros_like(qn), where=qn > 0).astype(q.dtype)
    _topk(q, qinv, e, out_s, out_i, nch, int(offset), q.dtype.type(0), bool(normalized))
    if nch == 1:
        return out_s[0], out_i[0]
    return merge_topk(np.concatenate(out_s, axis=1), np.concatenate(out_i, axis=1), kk)
