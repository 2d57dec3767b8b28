"""int8 symmetric per-channel quantisation (channel = first axis, e.g. a weight's rows).

    scale[c] = max|w[c, :]| / 127       (1.0 for an all-zero channel)
    q[c, j]  = clip(rint(w[c, j] / scale[c]), -127, 127)      (round half to even)
    w'[c, j] = q[c, j] * scale[c]

Symmetric (no zero point) and -128 unused, so q and -q are both representable; the
round-trip error is at most scale/2 per element. Each channel is two passes over a row
held in cache (max, then quantise), rows in parallel. NaN or inf weights are refused.
"""

from __future__ import annotations

import numpy as np

from kernels import _checks
from kernels._fastmath import row_absmax
from kernels._jit import jit, prange
from kernels.errors import KernelDtypeError, KernelInputError

__all__ = ["dequantize_int8", "quantize_int8"]


@jit(parallel=True)
def _quantize(w, q, scale, bad, zero):
    n, d = w.shape
    for c in prange(n):
        row = w[c]
        amax = row_absmax(row)
        probe = zero
        for j in range(d):
            probe += row[j] * 0.0  # NaN iff some element is NaN or inf
        bad[c] = probe != 0.0  # True for NaN too
        s = amax / 127.0 if amax > 0 else 1.0
        scale[c] = s
        inv = 1.0 / s
        out = q[c]
        for j in range(d):
            v = np.rint(row[j] * inv)
            out[j] = np.int8(min(max(v, -127.0), 127.0))


@jit(parallel=True)
def _dequantize(q, scale, w):
    n, d = q.shape
    for c in prange(n):
        s = scale[c]
        for j in range(d):
            w[c, j] = q[c, j] * s


def _as_2d(a: np.ndarray) -> np.ndarray:
    """(channels, everything else); explicit width so empty arrays reshape too."""
    return a.reshape(a.shape[0], int(np.prod(a.shape[1:])))


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantise ``w`` (ndim >= 1, channels on axis 0): returns ``(q int8, scale)``.

    ``q`` has ``w``'s shape; ``scale`` has shape ``(w.shape[0],)`` and ``w``'s dtype.
    """
    wc = _checks.float_array("w", w)
    if wc.ndim == 0:
        raise KernelInputError("w must have at least 1 dimension (channels on axis 0)")
    w2 = _as_2d(wc) if wc.ndim != 1 else wc.reshape(-1, 1)
    q = np.empty(w2.shape, np.int8)
    scale = np.empty(w2.shape[0], wc.dtype)
    bad = np.zeros(w2.shape[0], np.int64)
    if w2.size:
        _quantize(w2, q, scale, bad, wc.dtype.type(0))
    elif w2.shape[0]:
        scale[:] = 1.0
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise KernelInputError(
            f"w has NaN or inf in channel(s) {rows}; int8 cannot represent them, "
            "clean the weights (np.nan_to_num) before quantising"
        )
    return q.reshape(wc.shape), scale


def dequantize_int8(
    q: np.ndarray, scale: np.ndarray, dtype=np.float32, *, out: np.ndarray | None = None
) -> np.ndarray:
    """Inverse of :func:`quantize_int8`: ``q * scale[:, None]`` in ``dtype`` (float32/64).

    ``out``: optional C-contiguous buffer of ``q``'s shape and ``dtype``.
    """
    if not isinstance(q, np.ndarray) or q.dtype != np.int8:
        got = q.dtype if isinstance(q, np.ndarray) else type(q).__name__
        raise KernelDtypeError(f"q must be an int8 numpy array, got {got}")
    dt = np.dtype(dtype)
    if dt not in _checks.FLOAT_DTYPES:
        raise KernelDtypeError(f"dtype must be float32 or float64, got {dt}")
    if q.ndim == 0:
        raise KernelInputError("q must have at least 1 dimension (channels on axis 0)")
    s = _checks.float_array("scale", scale, ndim=1).astype(dt, copy=False)
    _checks.shape_is("scale", s, (q.shape[0],))
    q2 = _as_2d(np.ascontiguousarray(q))
    res = _checks.out_array("out", out, q.shape, dt)
    w = res.reshape(q2.shape)
    if w.size:
        _dequantize(q2, s, w)
    return res
