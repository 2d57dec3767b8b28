"""Top-k gradient sparsification with error feedback, for a compressed all-reduce.

Each step sends only the ``k`` largest-magnitude entries of ``grad + residual`` and keeps
the rest in ``residual`` for the next step (error feedback: nothing is dropped, only
delayed). Ranks then all-gather ``(indices, values)`` and scatter-add them with
:func:`densify`. Selection: the k-th largest magnitude is found with ``np.partition``
(O(n)); ties at the threshold go to the lower index, so the result is deterministic.
"""

from __future__ import annotations

import numpy as np

from kernels import _checks
from kernels._jit import jit, prange
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


def topk_sparsify(
    grad: np.ndarray, residual: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Select the top-``k`` of ``grad + residual`` by magnitude; update ``residual`` in place.

    ``grad`` and ``residual`` are flat (1-D) arrays of one dtype; ``residual`` must be
    C-contiguous and writable (start it at zeros). Returns ``(indices int64 ascending,
    values)``. Non-finite gradients are refused before ``residual`` is touched.
    """
    g = _checks.float_array("grad", grad, ndim=1)
    _checks.writable_target("residual", residual, g)
    if not residual.flags.c_contiguous:
        raise KernelInputError("residual must be C-contiguous (it is updated in place)")
    k = _checks.positive_int("k", k)
    k = min(k, g.size)
    idx = np.empty(k, np.int64)
    vals = np.empty(k, g.dtype)
    if g.size == 0:
        return idx, vals
    mag = np.empty_like(g)
    if _accumulate_abs(g, residual, mag):
        raise KernelInputError(
            "grad + residual has NaN or inf; skip this step (or reset residual to zeros)"
        )
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
