"""int8 symmetric per-channel quantisation (channel = first axis, e.g. a weight's rows).

    scale[c] = max|w[c, :]| / 127       (1.0 for an all-zero channel)
    q[c, j]  = clip(rint(w[c, j] / scale[c]), -127, 127)      (round half to even)
    w'[c, j] = q[c, j] * scale[c]

Symmetric (no zero point) and -128 unused, so q and -q are both representable. The
division is a multiplication by ``1 / scale[c]`` in ``w``'s dtype (16 lanes per vector for
float32, not 8 in float64: 0.17 -> 0.09-0.11 ns per element on one core), which puts
``w / scale`` off by at most 1.5e-5 (float32) before rounding: an element that close to
a .5 boundary may round the other way (49 of 33.5 million random normals did), so the
round-trip error is at most (0.5 + 3e-5) * scale per element. Each channel is two passes
over a row held in cache (max, then quantise + a NaN/inf probe), rows in parallel. NaN or inf
weights are refused. Dequantising into an output of ``NT_MIN_BYTES`` or more uses
non-temporal stores (``kernels._simd``): the output is not read into cache before it is
overwritten, 81% -> 96-101% of the STREAM triad here; smaller outputs, which the caller
will likely read back from cache, keep ordinary stores.
"""

from __future__ import annotations

import numpy as np

from kernels import _checks
from kernels._chunks import chunk_bounds, n_chunks, row_chunks
from kernels._jit import jit, overload, pick_twin, prange, serial_twin, types
from kernels._prefetch import PREFETCH_BYTES, row_hint
from kernels._simd import (NT_MIN_BYTES, QUANT_LANES, VEC_BITS, address, dequant_store_nt,
                           quant_store, quant_store_part, sfence, stream_out)
from kernels.errors import KernelDtypeError, KernelInputError

__all__ = ["NT_MIN_BYTES", "dequantize_int8", "quantize_int8"]



def _narrow(like, v):  # pragma: no cover - replaced by the overload inside jitted code
    """``v`` cast back to ``like``'s integer type."""
    raise NotImplementedError


@overload(_narrow, inline="always")
def _narrow_overload(like, v):
    # numba widens int32 & int32 to int64; the max then ran on 8 lanes instead of 16
    if like == types.int32:
        return lambda like, v: np.int32(v)
    return lambda like, v: v


@jit(inline=True)
def _scale_of(amax):
    """A channel's scale from its ``max |w|`` (1 for an all-zero channel)."""
    return amax / 127.0 if amax > 0 else 1.0


@jit(inline=True)
def _code(x, inv, lim):
    """One element's int8 code: ``clip(rint(x * inv), -lim, lim)``."""
    return np.int8(min(max(np.rint(x * inv), -lim), lim))


@jit(parallel=True)
def _quantize(w, wbits, q, scale, sbits, bad, mask, inf_bits, ahead, masked):
    """Two passes per row held in L1. Pass 1 takes max |w| on the bit patterns
    (``wbits`` is ``w`` viewed as int32/int64, sign bit masked off): an integer max
    vectorises without fast-math NaN flags, and NaN/inf show up as patterns
    ``>= inf_bits``, so no separate probe. The max's bits are stored through ``sbits``
    (``scale`` viewed as ints) and read back as a float. Pass 2 quantises, asking for
    the lines ``ahead`` elements on, or the next row's where rows are longer, as it
    goes, where ``kernels._prefetch.ROW_HINTS`` is on (no load reaches memory during
    this pass otherwise, and a row of 4 KiB or more is a page of its own, where the
    hardware prefetcher of an Intel host stops: 1.26-1.27x float32, 1.23-1.26x float64
    from memory there; on the Zen 4 host an 8 KiB-ahead hint cost 18-21%). The next row
    alone was too close for short rows: Intel Emerald Rapids, float32 from memory (every
    line flushed), next row / 8 KiB: 1.54x at 128 features, 1.30x at 1024 (hence
    ``ahead``: ``PREFETCH_BYTES`` from ``AHEAD_MIN_BYTES`` on, else 0).

    A row's last piece under 64 elements (or a whole shorter row) goes out as masked
    vectors where ``masked`` (``MASKED_TAIL``). Small arrays run the serial twin
    (``_quantize_1``: no parallel launch)."""
    n, d = w.shape
    wf = w.reshape(-1)
    qf = q.reshape(-1)
    one = w.dtype.type(1.0)
    lim = w.dtype.type(127.0)
    step = part = 64 // w.itemsize  # elements per cache line, per masked vector
    last = wf.size - 1
    for c in prange(n):
        rb = wbits[c]
        mb = _narrow(mask, rb[0] & mask)
        for j in range(d):
            mb = max(mb, _narrow(mask, rb[j] & mask))
        bad[c] = mb >= inf_bits
        sbits[c] = mb
        scale[c] = _scale_of(scale[c])
        inv = one / scale[c]
        base = c * d
        nxt = base + max(d, ahead)  # asked for meanwhile where ROW_HINTS is on
        j = 0
        while j + QUANT_LANES <= d:  # 64 at a time (kernels._simd.quant_store), then the rest
            for k in range(j, j + QUANT_LANES, step):
                row_hint(wf, min(nxt + k, last))
            quant_store(wf, inv, qf, base + j)
            j += QUANT_LANES
        if masked and d - j >= MASKED_MIN:  # in masked vectors
            while j < d:
                quant_store_part(wf, inv, qf, base + j, min(d - j, part))
                j += part
        for k in range(base + j, base + d):
            qf[k] = _code(wf[k], inv, lim)


_quantize_1 = serial_twin(_quantize)


@jit(parallel=True)
def _quantize_flat(w, q, scale, bad):
    """``_quantize`` of rows of one element (each its own channel): one elementwise
    loop through the same ``_scale_of`` and ``_code`` (vectorised; the row loop ran one
    row at a time)."""
    one = w.dtype.type(1.0)
    lim = w.dtype.type(127.0)
    for c in prange(w.size):
        a = abs(w[c])
        bad[c] = not a < np.inf
        scale[c] = _scale_of(a)
        q[c] = _code(w[c], one / scale[c], lim)


_quantize_flat_1 = serial_twin(_quantize_flat)


# a row's last piece under 64 elements (or a whole shorter row) as masked vectors, a
# register of w each (kernels._simd.quant_store_part): with AVX-512 only, and for pieces
# of MASKED_MIN elements or more (docs/kernels.md)
MASKED_TAIL = VEC_BITS == 512
MASKED_MIN = 2


# Arrays this large ask 8 KiB ahead in ``_quantize``'s second pass; smaller ones the next
# row only: in cache (2^19 float32, 1024 features) the 8 KiB hint cost 23% against 9%
AHEAD_MIN_BYTES = 8 << 20

_BITS = {np.dtype(np.float32): (np.int32, 0x7FFFFFFF, 0x7F800000),
         np.dtype(np.float64): (np.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}


@jit(parallel=True)
def _dequantize(q, scale, w):
    n, d = q.shape
    for c in prange(n):
        s = scale[c]
        for j in range(d):
            w[c, j] = q[c, j] * s


@jit(parallel=True)
def _dequantize_flat(q, scale, w):
    """``_dequantize`` of rows of one element: one elementwise loop (vectorised; the
    row loop was 3.6x slower at 262144 x 1 float32)."""
    for c in prange(q.size):
        w[c] = q[c] * scale[c]


_dequantize_1 = serial_twin(_dequantize)
_dequantize_flat_1 = serial_twin(_dequantize_flat)


@jit(parallel=True)
def _dequantize_nt(q, scale, w, nchunks):
    """``_dequantize`` with 64-byte non-temporal stores; a scalar head until ``w[c, j]``
    is 64-byte aligned and a scalar tail per row, one ``sfence`` per chunk of rows."""
    n, d = q.shape
    qf = q.reshape(-1)
    wf = w.reshape(-1)
    lanes = 64 // wf.itemsize
    for ch in prange(nchunks):
        lo, hi = chunk_bounds(n, nchunks, ch)
        for c in range(lo, hi):
            s = scale[c]
            base = c * d
            j = 0
            while j < d and (address(wf, base + j) & 63) != 0:
                wf[base + j] = qf[base + j] * s
                j += 1
            while j + lanes <= d:
                dequant_store_nt(qf, s, wf, base + j)
                j += lanes
            while j < d:
                wf[base + j] = qf[base + j] * s
                j += 1
        sfence()


def _as_2d(a: np.ndarray) -> np.ndarray:
    """(channels, everything else); explicit width so empty arrays reshape too."""
    return a.reshape(a.shape[0], int(np.prod(a.shape[1:])))


def quantize_int8(w: np.ndarray, *, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Quantise ``w`` (ndim >= 1, channels on axis 0): returns ``(q int8, scale)``.

    ``q`` has ``w``'s shape (written into ``out`` when given: a C-contiguous int8 buffer);
    ``scale`` has shape ``(w.shape[0],)`` and ``w``'s dtype.
    """
    wc = _checks.float_array("w", w)
    if wc.ndim == 0:
        raise KernelInputError("w must have at least 1 dimension (channels on axis 0)")
    w2 = _as_2d(wc) if wc.ndim != 1 else wc.reshape(-1, 1)
    q = _int8_out(out, wc.shape).reshape(w2.shape)
    scale = np.empty(w2.shape[0], wc.dtype)
    bad = np.zeros(w2.shape[0], np.bool_)
    if w2.size and w2.shape[1] == 1:
        pick_twin(_quantize_flat, _quantize_flat_1, row_chunks(*w2.shape))(
            w2.reshape(-1), q.reshape(-1), scale, bad)
    elif w2.size:
        ity, mask, inf_bits = _BITS[wc.dtype]
        ahead = PREFETCH_BYTES // wc.itemsize if w2.nbytes >= AHEAD_MIN_BYTES else 0
        pick_twin(_quantize, _quantize_1, row_chunks(*w2.shape))(
            w2, w2.view(ity), q, scale, scale.view(ity), bad, ity(mask), ity(inf_bits), ahead,
            MASKED_TAIL)
    elif w2.shape[0]:
        scale[:] = 1.0
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise KernelInputError(
            f"w has NaN or inf in channel(s) {rows}; int8 cannot represent them, "
            "clean the weights (np.nan_to_num) before quantising"
        )
    return (out if out is not None else q.reshape(wc.shape)), scale


def _int8_out(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """The caller's int8 buffer (checked) or a new one."""
    if out is None:
        return np.empty(shape, np.int8)
    if not isinstance(out, np.ndarray) or out.dtype != np.int8:
        got = out.dtype if isinstance(out, np.ndarray) else type(out).__name__
        raise KernelDtypeError(f"out must be an int8 array, got {got}")
    _checks.shape_is("out", out, shape)
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise KernelInputError("out must be C-contiguous and writable (np.empty(shape, np.int8))")
    return out


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
    if w.size and stream_out(w, fresh=out is None):
        _dequantize_nt(q2, s, w, n_chunks(q2.shape[0], min_rows=1))
    elif w.size and q2.shape[1] == 1:
        pick_twin(_dequantize_flat, _dequantize_flat_1, row_chunks(*q2.shape))(
            q2.reshape(-1), s, w.reshape(-1))
    elif w.size:
        pick_twin(_dequantize, _dequantize_1, row_chunks(*q2.shape))(q2, s, w)
    return res
