"""GELU and fused bias + activation, forward and backward.

GELU is the exact (erf) form, as ``torch.nn.functional.gelu`` by default. libm's ``erf``
is a scalar call that does not vectorise, so float64 uses ``kernels._avx512`` where numba
targets AVX2 and FMA: for ``|x| < 4.99`` polynomial pieces with no exp and no division
(AVX-512: 8 lanes, 16 pieces looked up in registers; AVX2: 4 lanes, 128 pieces read
from a table in memory), the other lanes put aside and finished in batches (AVX-512: by
explicit vectors with table lookups; AVX2: by the loop below). Elsewhere
``kernels._erf.normal_parts`` (a vectorisable normal CDF/PDF); all a few ulp, also in
the lower tail. float32 with AVX2 and FMA: ``kernels._avx512`` too, 16 lanes per vector
with AVX-512 (8 with AVX2), ``Phi(-|x|)`` (backward: ``R``) from polynomial pieces
looked up per lane (AVX-512: 16 pieces by ``vpermps``; AVX2: 4 by ``vpshufb``), no
division and no exp (GELU within 3e-7 relative for x >= 0, 2e-5
below where the output is tiny; 1.3x the speed of the path below, the backward 1.6x).
Otherwise float32 uses a rational approximation of erf (max abs error 4e-9 in exact
arithmetic) evaluated in float32; float32 rounding brings it to about 3e-7 (absolute).
That derivative does not need erf: it is written through Mills' ratio (``_gelu_grad``),
within 2e-7, with the exp of ``kernels._fastmath.exp_softmax``.
"""

from __future__ import annotations

import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros

from kernels import _avx512, _checks
from kernels._avx512 import (
    BLOCK32,
    gelu_bias_bwd_f32,
    gelu_bias_bwd_f32_nt,
    gelu_bias_bwd_f32_tail,
    gelu_bias_f32,
    gelu_bias_f32_nt,
    gelu_bias_f32_tail,
    gelu_bwd_f32,
    gelu_bwd_f32_nt,
    gelu_bwd_f32_tail,
    gelu_f32,
    gelu_f32_nt,
    gelu_f32_tail,
    gelu_bias_bwd_f64,
    gelu_bias_bwd_f64_nt,
    gelu_bias_bwd_f64_staged,
    gelu_bias_bwd_f64_tail,
    gelu_bias_f64,
    gelu_bias_f64_nt,
    gelu_bias_f64_staged,
    gelu_bias_f64_tail,
    gelu_bwd_f64,
    gelu_bwd_f64_nt,
    gelu_bwd_f64_staged,
    gelu_bwd_f64_tail,
    gelu_f64,
    gelu_f64_nt,
    gelu_f64_staged,
    gelu_f64_tail,
    gelu_wide_bwd_f64,
    gelu_wide_bwd_f64_tail,
    gelu_wide_f64,
    gelu_wide_f64_tail,
)
from kernels._chunks import chunk_bounds, n_chunks, row_chunks
from kernels._erf import normal_parts
from kernels._fastmath import exp_softmax
from kernels._jit import jit, num_threads, overload, pick_twin, prange, serial_twin, types
from kernels._prefetch import PREFETCH_BYTES, row_hint
from kernels._simd import _host_has_avx2_fma, address, copy64_nt, sfence, stream_out
from kernels.errors import KernelInputError

__all__ = ["ACTIVATIONS", "bias_act", "bias_act_backward", "gelu", "gelu_backward"]

ACTIVATIONS = ("none", "relu", "gelu")
_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
# erf(t) ~= t * P(t^2) / Q(t^2) for |t| <= 4 (|1 - erf(4)| < 2e-8): least-squares rational
# fit made for this module, checked against math.erf in tests/kernels/test_nn_kernels.py.
_P = (1.1283791675368093, 0.18565416075385283, 0.05423797294741766, 0.0038496057137109895,
      0.000373889833054752, 4.524064593301735e-06, -1.241426653142419e-08)
_Q = (1.0, 0.49786508289675646, 0.11402190100368464, 0.015442771372252945,
      0.0012998009073068944, 6.157816873348688e-05)
P0, P1, P2, P3, P4, P5, P6 = _P
Q1, Q2, Q3, Q4, Q5 = _Q[1:]


_F = np.float32
FP0, FP1, FP2, FP3, FP4, FP5, FP6 = (_F(c) for c in _P)
FQ1, FQ2, FQ3, FQ4, FQ5 = (_F(c) for c in _Q[1:])


@jit()
def _erf_rational(t):
    """The rational erf in float32 arithmetic (16 lanes per AVX-512 vector, not 8):
    rounding adds a few float32 ulp, about 3e-7 absolute, within the float32 tolerance."""
    t = min(max(t, _F(-4.0)), _F(4.0))
    u = t * t
    u2 = u * u
    p = ((FP0 + FP1 * u) + (FP2 + FP3 * u) * u2) + ((FP4 + FP5 * u) + FP6 * u2) * (u2 * u2)
    q = ((_F(1.0) + FQ1 * u) + (FQ2 + FQ3 * u) * u2) + (FQ4 + FQ5 * u) * (u2 * u2)
    return t * p / q


def _gelu_cdf(z):  # pragma: no cover - replaced by the overload inside jitted code
    """Phi(z): the rational erf in float32, ``kernels._erf.normal_parts`` in float64."""
    raise NotImplementedError


@overload(_gelu_cdf, inline="always")
def _gelu_cdf_overload(z):
    if z == types.float32:
        def f32(z):
            t = z * _F(_SQRT1_2)
            # below t = -4, where erf is clamped (its float32 value there is not -1: x =
            # -3e38 gave -9e30), Phi(z) < 8e-9: 0, so -inf gives NaN as on the vector path;
            # above, rounding took Phi below 0 near -5.4 (GELU +3e-7 instead of -2e-7)
            if t < _F(-4.0):
                return _F(0.0)
            return max(_F(0.5) + _F(0.5) * _erf_rational(t), _F(0.0))
        return f32
    return lambda z: normal_parts(np.float64(z))[0]


# GELU'(z) in float32 without erf: for a = |z|, Phi(-a) = phi(a) R(a) (R: Mills' ratio),
# so GELU'(z) = 1 - phi(a) (R(a) - a) for z >= 0 and phi(a) (R(a) - a) below, and the
# derivative needs phi anyway. R(a) ~= t (M1 + M2 t + ... + M6 t^5), t = 1 / (1 + MP a),
# fitted here to max |phi (R - fit)| = 5e-9 on [0, 12] (weighted least squares, checked
# against scipy in tests/kernels/test_kernels_nn.py). Against the rational erf plus
# exp: 6 instead of 14 multiply-adds per vector, and the same one division. The exp is
# softmax's (degree 5, no flush to 0): below x = -13.2, where GELU' is under 1e-37 in
# size, the result is about -9e-38 instead of 0 (0.292 -> 0.263 ns per element).
_MP = 0.275
_M = (0.29530451881266745, 0.10555465953994059, 0.8370518962027043, -0.8296868934986321,
      1.1329984864998628, -0.2879085183460168)
FMP = _F(_MP)
FM1, FM2, FM3, FM4, FM5, FM6 = (_F(c) for c in _M)


def _gelu_grad(z):  # pragma: no cover - replaced by the overload inside jitted code
    """GELU'(z) = Phi(z) + z phi(z); float32 by Mills' ratio, float64 by its parts."""
    raise NotImplementedError


@overload(_gelu_grad, inline="always")
def _gelu_grad_overload(z):
    if z == types.float32:
        def f32(z):
            a = abs(z)
            a = _F(20.0) if a > _F(20.0) else a  # +-inf: phi = 0 times a finite; NaN stays
            t = _F(1.0) / (_F(1.0) + FMP * a)
            r = t * (FM1 + t * (FM2 + t * (FM3 + t * (FM4 + t * (FM5 + t * FM6)))))
            pm = _F(_INV_SQRT_2PI) * exp_softmax(_F(-0.5) * a * a) * (r - a)
            return _F(1.0) - pm if z >= _F(0.0) else pm
        return f32

    def f64(z):
        zf = np.float64(z)
        cdf, pdf = normal_parts(zf)
        return cdf + zf * pdf
    return f64


@jit(inline=True)
def _act(z, act):
    """act: 0 none, 1 relu, 2 gelu (exact erf form)."""
    if act == 1:
        return max(z, 0.0)
    if act == 2:
        return z * _gelu_cdf(z)
    return z


@jit(inline=True)
def _act_grad(z, act):
    """d act(z) / dz for the same codes as ``_act``."""
    if act == 1:
        return 1.0 if z > 0.0 else 0.0
    if act == 2:
        return _gelu_grad(z)
    return 1.0


@jit(parallel=True)
def _gelu(x, out):
    for i in prange(x.size):
        out[i] = _act(x[i], 2)


@jit(parallel=True)
def _gelu_bwd(dy, x, out):
    for i in prange(x.size):
        out[i] = dy[i] * _act_grad(x[i], 2)


@jit()
def _gelu_rows(x, out, lo, hi):
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            out[i, j] = _act(x[i, j], 2)


@jit()
def _gelu_bwd_rows(dy, x, out, lo, hi):
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            out[i, j] = dy[i, j] * _act_grad(x[i, j], 2)


@jit(parallel=True)
def _gelu_2d(x, out, nchunks):
    for c in prange(nchunks):
        lo, hi = chunk_bounds(x.shape[0], nchunks, c)
        _gelu_rows(x, out, lo, hi)


@jit(parallel=True)
def _gelu_bwd_2d(dy, x, out, nchunks):
    for c in prange(nchunks):
        lo, hi = chunk_bounds(x.shape[0], nchunks, c)
        _gelu_bwd_rows(dy, x, out, lo, hi)


_ROW = 512  # elements per row of the 2-D view

# -- GELU through kernels._avx512 (AVX-512): 32 float64 or 64 float32 elements per call ---
# fastmath "contract" only: the intrinsics' rounding tricks must not be reassociated.
# ``nt``: outputs of NT_MIN_BYTES or more are written with non-temporal stores (after a
# masked head up to the output's next 64-byte boundary; one sfence per chunk). Measured
# in one round-robin at 2 x 128 Mi elements: GELU 26-28 -> 38 GB/s, bias + GELU 30 -> 37.
VEC_F64 = _host_has_avx2_fma()  # tests turn it off to run the portable float64 path too
# (AVX-512: ``_avx512.central_pieces``, 8 lanes; AVX2: ``central_pieces_mem``, 4 lanes)
VEC_F32 = _host_has_avx2_fma()  # and this one the portable float32 path (the float32
# kernels run at the CPU's vector width: 16 lanes with AVX-512, 8 with AVX2)
_B = _avx512.BLOCK
_TILE = max(_B, BLOCK32)  # the bias is tiled this far past its end (see _gelu_chunk)


@jit(inline=True)
def _head(out, i, hi, nt):
    """Where the blocks of ``[i, hi)`` start: ``i``, or with ``nt`` the first
    index whose ``out`` address is 64-byte aligned (a non-temporal store needs it)."""
    if not nt:
        return i
    return min(hi, i + ((64 - (address(out, i) & 63)) & 63) // out.itemsize)


# Both directions, float64: ``|z| < 4.99`` by the central pieces (``_avx512.central_pieces``
# or, with AVX2, ``central_pieces_mem``: no exp); the other lanes are put aside per chunk
# and finished in batches by ``_finish`` (``_finish_portable`` without AVX-512).
# float32 needs no lanes put aside: its pieces cover |z| < 5.99, and past that the result
# is z or 0 (GELU') to float32 accuracy (``_avx512._pieces_f32``).
_PEND = 96  # put-aside lanes per chunk before a batch is finished (see _finish)


@jit(inline=True)
def _pending(nchunks):
    """Per-chunk buffers for the put-aside lanes: ``z``, ``dy``, the index in the output
    and the one in the bias gradient. One allocation each; pages are only touched where
    lanes are put aside."""
    m = _PEND + 2 * _B
    return (np.empty((nchunks, m)), np.empty((nchunks, m)),
            np.empty((nchunks, m), np.int64), np.empty((nchunks, m), np.int64))


@jit(inline=True)
def _scatter(pz, pi, pj, cnt, out, acc, bias):
    """The finished lanes to their places in ``out`` (and, with ``bias``, added to the
    bias gradient ``acc``)."""
    for t in range(cnt):
        out[pi[t]] = pz[t]
        if bias:
            acc[pj[t]] += pz[t]


@jit(inline=True, fastmath={"contract"})
def _finish_lanes(pz, pdy, cnt, backward):
    """``pz[:cnt]`` finished in place through the full-range path, whole batches of
    ``_B`` lanes and then a masked tail: ``pz Phi(pz)``, or backward ``pdy GELU'(pz)``."""
    k = 0
    while k + _B <= cnt:
        if backward:
            gelu_wide_bwd_f64(pdy, pz, pz, k, _B)
        else:
            gelu_wide_f64(pdy, pz, pz, k, _B)
        k += _B
    if k < cnt:
        if backward:
            gelu_wide_bwd_f64_tail(pdy, pz, pz, k, cnt - k)
        else:
            gelu_wide_f64_tail(pdy, pz, pz, k, cnt - k)


@jit(fastmath={"contract"})
def _finish(pz, pdy, pi, pj, cnt, out, acc, bias, backward):
    """The ``cnt`` lanes put aside (``|z| >= 4.99`` or NaN), 32 at a time through the
    full-range path: ``out[pi[t]] = pz[t] Phi(pz[t])``, or backward ``pdy[t]
    GELU'(pz[t])``; with ``bias``, also added to ``acc[pj[t]]`` (the bias gradient).
    Returns 0, the new count. Called every ``_PEND`` lanes: while it runs, the chunk's
    input streams pause, so small batches keep the memory busy (``N(0, 3^2)`` inputs
    from memory, one core, ns per element: 1.11-1.23 at 256, 0.96 at 64, 0.85-0.86 at
    96, 0.92-0.96 at 128; in cache 32 cost 0.90, 96 0.81)."""
    _finish_lanes(pz, pdy, cnt, backward)
    _scatter(pz, pi, pj, cnt, out, acc, bias)
    return 0


@jit(fastmath={"contract"})
def _finish_portable(pz, pdy, pi, pj, cnt, out, acc, bias, backward):
    """``_finish`` without AVX-512: the lanes through ``normal_parts`` (a loop LLVM
    vectorises at 4 lanes)."""
    if backward:
        for t in range(cnt):
            pz[t] = pdy[t] * _act_grad(pz[t], 2)
    else:
        for t in range(cnt):
            pz[t] = _act(pz[t], 2)
    _scatter(pz, pi, pj, cnt, out, acc, bias)
    return 0


@jit(inline=True)
def _put_aside(bits, i, j, pz, pdy, pi, pj, cnt):
    """Keep the lanes set in ``bits`` of the block at ``i`` (bias column ``j``) that an
    AVX2 float64 intrinsic left for later: it wrote the block's ``z`` and ``dy`` to
    ``pz``/``pdy`` from ``cnt`` on, and they are packed here (moving left, so in
    place). Returns the new count."""
    k0 = cnt
    while bits:
        k = trailing_zeros(bits)
        bits &= bits - 1
        pz[cnt] = pz[k0 + k]
        pdy[cnt] = pdy[k0 + k]
        pi[cnt] = i + k
        pj[cnt] = j + k
        cnt += 1
    return cnt


def _finish_any(pz, pdy, pi, pj, cnt, out, acc, bias,
                backward):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_finish_any, inline="always")
def _finish_any_overload(pz, pdy, pi, pj, cnt, out, acc, bias, backward):
    """``_finish`` for float64 outputs; float32 puts nothing aside, and its kernels must
    not compile ``_finish``'s AVX-512 intrinsics (they run on AVX2 CPUs too)."""
    if out.dtype == types.float32:
        return lambda pz, pdy, pi, pj, cnt, out, acc, bias, backward: 0
    if not _avx512.AVAILABLE:
        def portable(pz, pdy, pi, pj, cnt, out, acc, bias, backward):
            return _finish_portable(pz, pdy, pi, pj, cnt, out, acc, bias, backward)
        return portable

    def impl(pz, pdy, pi, pj, cnt, out, acc, bias, backward):
        return _finish(pz, pdy, pi, pj, cnt, out, acc, bias, backward)
    return impl


_GELU_F64_BLOCKS = {  # (bias, backward): the plain, masked tail and non-temporal intrinsic
    (False, False): (gelu_f64, gelu_f64_tail, gelu_f64_nt),
    (False, True): (gelu_bwd_f64, gelu_bwd_f64_tail, gelu_bwd_f64_nt),
    (True, False): (gelu_bias_f64, gelu_bias_f64_tail, gelu_bias_f64_nt),
    (True, True): (gelu_bias_bwd_f64, gelu_bias_bwd_f64_tail, gelu_bias_bwd_f64_nt),
}
_GELU_F64_AVX2_BLOCKS = _avx512.GELU_F64_AVX2  # the same without AVX-512: a bit mask
_GELU_F32_BLOCKS = {  # the same for float32: nothing is put aside
    (False, False): (gelu_f32, gelu_f32_tail, gelu_f32_nt),
    (False, True): (gelu_bwd_f32, gelu_bwd_f32_tail, gelu_bwd_f32_nt),
    (True, False): (gelu_bias_f32, gelu_bias_f32_tail, gelu_bias_f32_nt),
    (True, True): (gelu_bias_bwd_f32, gelu_bias_bwd_f32_tail, gelu_bias_bwd_f32_nt),
}


def _gelu_block(kind, bias, backward, dy, x, bt, out, acc, i, j, n, pz, pdy, pi, pj,
                cnt):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_gelu_block, inline="always")
def _gelu_block_overload(kind, bias, backward, dy, x, bt, out, acc, i, j, n, pz, pdy, pi, pj,
                         cnt):
    """One call of the ``_avx512`` intrinsic for the constants ``kind`` (0 the plain
    block, 1 the masked ``_tail``, 2 the non-temporal ``_nt``), ``bias`` and
    ``backward`` (and ``x``'s dtype): chosen while typing, so each call site compiles
    only its own."""
    if not all(isinstance(a, (types.BooleanLiteral, types.IntegerLiteral))
               for a in (kind, bias, backward)):
        return None
    key = bias.literal_value, backward.literal_value
    if x.dtype == types.float32:
        fn32 = _GELU_F32_BLOCKS[key][kind.literal_value]

        def impl32(kind, bias, backward, dy, x, bt, out, acc, i, j, n, pz, pdy, pi, pj, cnt):
            fn32(dy, x, bt, out, acc, i, j, n)
            return cnt
        return impl32
    if not _avx512.AVAILABLE:
        fn2 = _GELU_F64_AVX2_BLOCKS[key][kind.literal_value]

        def impl2(kind, bias, backward, dy, x, bt, out, acc, i, j, n, pz, pdy, pi, pj, cnt):
            bits = fn2(dy, x, bt, out, acc, i, j, n, pz, pdy, cnt)
            if bits:
                return _put_aside(bits, i, j, pz, pdy, pi, pj, cnt)
            return cnt
        return impl2
    fn = _GELU_F64_BLOCKS[key][kind.literal_value]

    def impl(kind, bias, backward, dy, x, bt, out, acc, i, j, n, pz, pdy, pi, pj, cnt):
        return fn(dy, x, bt, out, acc, i, j, n, pz, pdy, pi, pj, cnt)
    return impl


@jit(inline=True)
def _ask_ahead(dy, x, i, backward):
    """Ask for the block of ``x`` (backward: and of ``dy``, the same size) that starts
    ``PREFETCH_BYTES`` past index ``i``, where ``ROW_HINTS`` (``kernels._prefetch.row_hint``):
    the hardware prefetcher does not run far enough ahead of a loop that does this much
    work per line. Intel Xeon (Emerald Rapids, 2 cores), 2^25 elements from memory, A/B
    in one process: float64 GELU 1.5x (N(0, 1)) and 1.3x (N(0, 3^2)), backward 1.3x /
    1.2x, float32 GELU 1.5x; 4 KiB ahead the same as 8. One index for both arrays (the
    block's start, clamped to the last element; its other lines may point past the end,
    which a hint may): the backward's loop then spills no register."""
    k = min(i + PREFETCH_BYTES // x.itemsize, x.size - 1)
    line = 64 // x.itemsize  # (written out: numba's itemsize is not a constant to LLVM)
    row_hint(x, k)
    row_hint(x, k + line)
    row_hint(x, k + 2 * line)
    row_hint(x, k + 3 * line)
    if backward:
        row_hint(dy, k)
        row_hint(dy, k + line)
        row_hint(dy, k + 2 * line)
        row_hint(dy, k + 3 * line)


@jit(fastmath={"contract"})
def _gelu_chunk(c, dy, x, bt, out, pdb, ncols, nchunks, nt, bufs, bias, backward):
    """Chunk ``c`` of one of the four float64 or float32 GELU kernels over flat ``x``
    (and ``dy``) into ``out``, ``256 // itemsize`` elements per block (4 vectors);
    ``bias``/``backward`` are constants in each caller below, so only that kernel's
    intrinsics are compiled (one loop with them as runtime flags compiled all
    twelve and made bias + GELU 0.60 -> 0.76 ns per element in cache).

    With a bias, ``x`` and ``out`` are flat ``(rows, ncols)`` arrays and ``bt`` is the
    bias tiled to ``ncols + _TILE``, so a block that crosses into the next row still
    reads its bias contiguously (``bt[j:j+32]``, ``j`` the column): no head and tail
    per row (masked stores are slow here, and with non-temporal stores rows that do not
    start on a 64-byte boundary took two each, 21 instead of 38 GB/s); the backward
    sums the chunk's bias gradient into ``pdb[c]``, tiled like ``bt`` (``_untile_sum``
    folds it back). Without a bias ``ncols`` is past ``x.size`` and ``bt``, ``pdb`` are
    not read. Lanes put aside: see ``_finish`` (with ``nt``, their blocks are written
    through the cache: ``_avx512``)."""
    pzs, pdys, pis, pjs = bufs
    # run-time booleans for _finish (not the constants), so that it compiles once for
    # all four kernels rather than once per kernel
    grad_b = nchunks > 0 and bias and backward
    wide_b = nchunks > 0 and backward
    lo, hi = chunk_bounds(x.size, nchunks, c)
    pz, pdy, pi, pj = pzs[c], pdys[c], pis[c], pjs[c]
    acc = pdb[c]
    cnt = 0
    i = _head(out, lo, hi, nt)
    if i > lo:
        cnt = _gelu_block(1, bias, backward, dy, x, bt, out, acc, lo, lo % ncols, i - lo,
                          pz, pdy, pi, pj, cnt)
    j = i % ncols
    blk = 256 // x.itemsize  # _B for float64, BLOCK32 for float32
    while i + blk <= hi:
        _ask_ahead(dy, x, i, backward)
        if nt:
            cnt = _gelu_block(2, bias, backward, dy, x, bt, out, acc, i, j, blk,
                              pz, pdy, pi, pj, cnt)
        else:
            cnt = _gelu_block(0, bias, backward, dy, x, bt, out, acc, i, j, blk,
                              pz, pdy, pi, pj, cnt)
        if cnt > _PEND:
            cnt = _finish_any(pz, pdy, pi, pj, cnt, out, acc, grad_b, wide_b)
        i += blk
        j += blk
        if j >= ncols:
            j %= ncols
    if i < hi:
        cnt = _gelu_block(1, bias, backward, dy, x, bt, out, acc, i, j, hi - i,
                          pz, pdy, pi, pj, cnt)
    _finish_any(pz, pdy, pi, pj, cnt, out, acc, grad_b, wide_b)
    if nt:
        sfence()


# Streamed float64 (AVX-512): a block with lanes put aside goes to a per-chunk stage
# instead of ``out``, ``_GROUP`` such blocks at a time; their lanes are finished into the
# stage and the blocks streamed out from there (``_finish_staged``), so every line of
# ``out`` is written once, non-temporally. Before, such blocks were stored plainly and
# their lanes scattered into them: each line read from memory first (write-allocate),
# and the scattered stores waited behind those reads. Zen 4, 2^25 elements from memory,
# N(0, 3^2) (nearly every block has a lane put aside), A/B by rounds in 5 processes:
# backward 1.09-1.21x, forward 0.93-1.13x; N(0, 1) 0.98-1.02x. Intel Xeon (Emerald
# Rapids), the same inputs, one process: forward 1.07x, and with the hints of
# ``_ask_ahead`` 1.26x over plain stores with them (19.3 -> 24.4 GB/s).
_GROUP = 8  # staged blocks per batch: 2 KiB (16 blocks 1.00-1.17x, 4 slower in cache)


@jit(inline=True)
def _stages(nchunks):
    """Per-chunk stages (``_GROUP`` blocks) and the ``out`` index of each staged block."""
    return np.empty((nchunks, _GROUP * _B)), np.empty((nchunks, _GROUP), np.int64)


@jit(fastmath={"contract"})
def _finish_staged(pz, pdy, pi, pj, cnt, st, bi, ns, out, acc, bias, backward):
    """The ``cnt`` lanes put aside from the ``ns`` staged blocks (``pi``: their index in
    ``st``), finished as ``_finish`` does, into the stage, then each block
    ``st[s*_B:(s+1)*_B]`` streamed out to ``out[bi[s]:]``. Returns 0, the new count."""
    _finish_lanes(pz, pdy, cnt, backward)
    _scatter(pz, pi, pj, cnt, st, acc, bias)
    for s in range(ns):
        for q in range(0, _B, 8):
            copy64_nt(out, bi[s] + q, st, s * _B + q)
    return 0


_GELU_F64_STAGED = {(False, False): gelu_f64_staged, (False, True): gelu_bwd_f64_staged,
                    (True, False): gelu_bias_f64_staged, (True, True): gelu_bias_bwd_f64_staged}


def _staged_block(bias, backward, dy, x, bt, out, acc, i, j, pz, pdy, pi, pj, cnt, st,
                  o):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_staged_block, inline="always")
def _staged_block_overload(bias, backward, dy, x, bt, out, acc, i, j, pz, pdy, pi, pj, cnt,
                           st, o):
    """The ``_staged`` intrinsic for the constants ``bias`` and ``backward``."""
    if not all(isinstance(a, types.BooleanLiteral) for a in (bias, backward)):
        return None
    fn = _GELU_F64_STAGED[bias.literal_value, backward.literal_value]

    def impl(bias, backward, dy, x, bt, out, acc, i, j, pz, pdy, pi, pj, cnt, st, o):
        return fn(dy, x, bt, out, acc, i, j, _B, pz, pdy, pi, pj, cnt, st, o)
    return impl


@jit(fastmath={"contract"})
def _gelu_chunk_staged(c, dy, x, bt, out, pdb, ncols, nchunks, bufs, stages, bias,
                       backward):
    """``_gelu_chunk`` for a streamed float64 kernel, its blocks with lanes put aside
    staged (``_GROUP``, above). The masked head and tail blocks are written as there."""
    pzs, pdys, pis, pjs = bufs
    lo, hi = chunk_bounds(x.size, nchunks, c)
    pz, pdy, pi, pj = pzs[c], pdys[c], pis[c], pjs[c]
    st, bi = stages[0][c], stages[1][c]
    acc = pdb[c]
    grad_b = nchunks > 0 and bias and backward  # run-time, as in _gelu_chunk
    wide_b = nchunks > 0 and backward
    cnt = 0
    i = _head(out, lo, hi, True)
    if i > lo:
        cnt = _gelu_block(1, bias, backward, dy, x, bt, out, acc, lo, lo % ncols, i - lo,
                          pz, pdy, pi, pj, cnt)
        cnt = _finish_any(pz, pdy, pi, pj, cnt, out, acc, grad_b, wide_b)
    j = i % ncols
    ns = 0
    while i + _B <= hi:
        _ask_ahead(dy, x, i, backward)
        c0 = cnt
        cnt = _staged_block(bias, backward, dy, x, bt, out, acc, i, j, pz, pdy, pi, pj, cnt,
                            st, ns * _B)
        if cnt > c0:
            bi[ns] = i
            ns += 1
            if ns == _GROUP or cnt > _PEND:  # (the buffers hold _PEND + 2 _B lanes)
                cnt = _finish_staged(pz, pdy, pi, pj, cnt, st, bi, ns, out, acc, grad_b,
                                     wide_b)
                ns = 0
        i += _B
        j += _B
        if j >= ncols:
            j %= ncols
    if ns:
        cnt = _finish_staged(pz, pdy, pi, pj, cnt, st, bi, ns, out, acc, grad_b, wide_b)
    if i < hi:
        cnt = _gelu_block(1, bias, backward, dy, x, bt, out, acc, i, j, hi - i,
                          pz, pdy, pi, pj, cnt)
        _finish_any(pz, pdy, pi, pj, cnt, out, acc, grad_b, wide_b)
    sfence()


# The kernels. Each ``prange`` body calls one chunk function that is not inlined. Numba
# types a parfor's body twice (``c`` is an int64 in the kernel, a uint64 in the parfor's
# own function), and code inlined there, or reached through an ``inline="always"``
# overload (whose implementation numba compiles whole, LLVM too, just to type the call),
# was compiled each time; ``c`` goes to the chunk as an int64, so it compiles once. Which
# kernel runs is chosen in Python (``_kernel``), so each compiles only its own loop (one
# that chose between the staged and the plain loop held both). Cold first calls of the
# eight kernels (both dtypes, not streamed) 49.9 -> 16.4 s, float64 GELU 10.1 -> 3.3 s;
# from memory the split kernels ran as the inlined ones (A/B in one process, 0.97-1.01x).
@jit(parallel=True, fastmath={"contract"})
def _gelu_avx(dy, x, bt, out, pdb, ncols, nchunks, nt):
    bufs = _pending(nchunks)
    for c in prange(nchunks):
        _gelu_chunk(np.int64(c), dy, x, bt, out, pdb, ncols, nchunks, nt, bufs, False, False)


@jit(parallel=True, fastmath={"contract"})
def _gelu_bwd_avx(dy, x, bt, out, pdb, ncols, nchunks, nt):
    bufs = _pending(nchunks)
    for c in prange(nchunks):
        _gelu_chunk(np.int64(c), dy, x, bt, out, pdb, ncols, nchunks, nt, bufs, False, True)


@jit(parallel=True, fastmath={"contract"})
def _bias_gelu_avx(dy, x, bt, out, pdb, ncols, nchunks, nt):
    bufs = _pending(nchunks)
    for c in prange(nchunks):
        _gelu_chunk(np.int64(c), dy, x, bt, out, pdb, ncols, nchunks, nt, bufs, True, False)


@jit(parallel=True, fastmath={"contract"})
def _bias_gelu_bwd_avx(dy, x, bt, out, pdb, ncols, nchunks, nt):
    bufs = _pending(nchunks)
    for c in prange(nchunks):
        _gelu_chunk(np.int64(c), dy, x, bt, out, pdb, ncols, nchunks, nt, bufs, True, True)


# The same streamed in float64 with AVX-512 (``nt`` is then always true; it stays a
# parameter so that every GELU kernel is called alike).
@jit(parallel=True, fastmath={"contract"})
def _gelu_staged(dy, x, bt, out, pdb, ncols, nchunks, nt):
    bufs, stages = _pending(nchunks), _stages(nchunks)
    for c in prange(nchunks):
        _gelu_chunk_staged(np.int64(c), dy, x, bt, out, pdb, ncols, nchunks, bufs, stages,
                           False, False)


@jit(parallel=True, fastmath={"contract"})
def _gelu_bwd_staged(dy, x, bt, out, pdb, ncols, nchunks, nt):
    bufs, stages = _pending(nchunks), _stages(nchunks)
    for c in prange(nchunks):
        _gelu_chunk_staged(np.int64(c), dy, x, bt, out, pdb, ncols, nchunks, bufs, stages,
                           False, True)


@jit(parallel=True, fastmath={"contract"})
def _bias_gelu_staged(dy, x, bt, out, pdb, ncols, nchunks, nt):
    bufs, stages = _pending(nchunks), _stages(nchunks)
    for c in prange(nchunks):
        _gelu_chunk_staged(np.int64(c), dy, x, bt, out, pdb, ncols, nchunks, bufs, stages,
                           True, False)


@jit(parallel=True, fastmath={"contract"})
def _bias_gelu_bwd_staged(dy, x, bt, out, pdb, ncols, nchunks, nt):
    bufs, stages = _pending(nchunks), _stages(nchunks)
    for c in prange(nchunks):
        _gelu_chunk_staged(np.int64(c), dy, x, bt, out, pdb, ncols, nchunks, bufs, stages,
                           True, True)


_GELU_VEC = {(False, False): _gelu_avx, (False, True): _gelu_bwd_avx,
             (True, False): _bias_gelu_avx, (True, True): _bias_gelu_bwd_avx}
_GELU_STAGED = {(False, False): _gelu_staged, (False, True): _gelu_bwd_staged,
                (True, False): _bias_gelu_staged, (True, True): _bias_gelu_bwd_staged}


def _kernel(dtype, bias: bool, backward: bool, nt: bool):
    """The GELU kernel for ``bias``/``backward`` that a ``dtype`` output streamed (``nt``)
    or not runs: the staged one for float64 streamed with AVX-512."""
    staged = nt and dtype == np.float64 and _avx512.AVAILABLE
    return (_GELU_STAGED if staged else _GELU_VEC)[bias, backward]


def _gelu_vec(dy, x, out, *, b=None, pdb=None, backward=False, fresh=False) -> None:
    """Run the float64 or float32 GELU kernel for ``b``/``backward`` on C-contiguous ``x`` (2-D with
    a bias ``b``) into ``out`` (``fresh``: the call's own new output, ``stream_out``)."""
    nch = _flat_chunks(x.size)
    bias = b is not None
    ncols = b.size if bias else x.size + 1
    bt = _tiled(b) if bias else x.reshape(-1)
    if pdb is None:
        pdb = np.empty((nch, 1), x.dtype)
    nt = stream_out(out, fresh, x)
    _kernel(x.dtype, bias, backward, nt)(dy.reshape(-1), x.reshape(-1), bt, out.reshape(-1),
                                         pdb, ncols, nch, nt)


def _tiled(b: np.ndarray, extra: int = _TILE) -> np.ndarray:
    """``b`` repeated to ``b.size + extra`` entries (by doubling copies: ``np.resize``
    took 2.1 us for 256 + 64 entries, this 1.4)."""
    out = np.empty(b.size + extra, b.dtype)
    out[:b.size] = b
    k = b.size
    while k < out.size:
        m = min(k, out.size - k)
        out[k:k + m] = out[:m]
        k += m
    return out


def _untile_sum(pdb: np.ndarray, ncols: int) -> np.ndarray:
    """Fold per-chunk tiled bias gradients (``(chunks, ncols + tile)``) to ``(ncols,)``:
    the column sums, padded to whole rows of ``ncols`` and summed down (``np.add.at``
    over the tile took 4.0 us, this 2.3)."""
    tot = pdb.sum(axis=0)
    rows = -(-tot.size // ncols)
    padded = np.zeros(rows * ncols, tot.dtype)
    padded[:tot.size] = tot
    return padded.reshape(rows, ncols).sum(axis=0)


def _vec(a: np.ndarray) -> bool:
    """True where ``a`` goes through ``kernels._avx512``."""
    return (VEC_F64 and a.dtype == np.float64) or (VEC_F32 and a.dtype == np.float32)


def _flat_chunks(n: int) -> int:
    return n_chunks(n, min_rows=4096)


def _elementwise(kernel_2d, kernel_flat, *arrays: np.ndarray) -> None:
    """Run an elementwise kernel over flat C-contiguous arrays (the last one is the
    output): the bulk as a ``(n // 512, 512)`` view in chunks of rows, the last
    ``n % 512`` elements flat. Measured on float64 GELU backward: 80-82% of the triad
    this way, 62-64% as one flat ``prange`` loop (forward: 58-60% vs 55-57%)."""
    n = arrays[0].size
    m = n // _ROW
    if m:
        views = [a[:m * _ROW].reshape(m, _ROW) for a in arrays]
        kernel_2d(*views, n_chunks(m, min_rows=4))
    if n - m * _ROW:
        kernel_flat(*[a[m * _ROW:] for a in arrays])


def gelu(x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Exact GELU, ``x * Phi(x)``, elementwise; ``out`` may be ``x`` itself (in place).

    ``out`` may be strided (the result is copied into it); a reused C-contiguous ``out``
    is fastest (no page faults from a fresh allocation).
    """
    xc = _checks.float_array("x", x)
    if out is None:
        res = _checks.out_array("out", None, xc.shape, xc.dtype, like=xc, apart_from=xc)
    else:
        _checks.writable_target("out", out, xc)
        res = out
    flat = res.reshape(-1) if res.flags.c_contiguous else np.empty(xc.size, xc.dtype)
    if xc.size and _vec(xc):
        _gelu_vec(xc, xc, flat, fresh=out is None or not res.flags.c_contiguous)
    elif xc.size:
        _elementwise(_gelu_2d, _gelu, xc.reshape(-1), flat)
    if not res.flags.c_contiguous:
        res[...] = flat.reshape(res.shape)
    return res


def gelu_backward(dy: np.ndarray, x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Gradient of :func:`gelu`: ``dy * GELU'(x)`` (``out``: optional C-contiguous buffer)."""
    xc = _checks.float_array("x", x)
    dyc = _checks.float_array("dy", dy, dtype=xc.dtype)
    _checks.shape_is("dy", dyc, xc.shape)
    res = _checks.out_array("out", out, xc.shape, xc.dtype, like=xc,
                              apart_from=xc)
    if xc.size and _vec(xc):
        _gelu_vec(dyc, xc, res, backward=True, fresh=out is None)
    elif xc.size:
        _elementwise(_gelu_bwd_2d, _gelu_bwd, dyc.reshape(-1), xc.reshape(-1), res.reshape(-1))
    return res


def _act_code(act: str) -> int:
    if act not in ACTIVATIONS:
        raise KernelInputError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    return ACTIVATIONS.index(act)


@jit()
def _bias_gelu_rows(x, b, out, lo, hi):
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            out[i, j] = _act(x[i, j] + b[j], 2)


@jit()
def _bias_relu_rows(x, b, out, lo, hi):
    zero = x.dtype.type(0.0)  # a float64 0.0 would make the float32 loops scalar
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            out[i, j] = max(x[i, j] + b[j], zero)


@jit()
def _bias_rows(x, b, out, lo, hi):
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            out[i, j] = x[i, j] + b[j]


@jit(parallel=True)
def _bias_act(x, b, out, act, nchunks):
    """Chunks of rows, one small function per activation: LLVM inlines the math into
    each loop and vectorises it. Passing whole arrays, not row views, also avoids two
    threads bumping the same reference counts (atomics) once per row."""
    for c in prange(nchunks):
        lo, hi = chunk_bounds(x.shape[0], nchunks, c)
        if act == 2:
            _bias_gelu_rows(x, b, out, lo, hi)
        elif act == 1:
            _bias_relu_rows(x, b, out, lo, hi)
        else:
            _bias_rows(x, b, out, lo, hi)


@jit()
def _bias_gelu_bwd_rows(dy, x, b, dx, acc, lo, hi):
    """One loop: 0.43 -> 0.38 ns per element on one core in cache against a second loop
    that re-read the dx row for the bias gradient."""
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            v = dy[i, j] * _act_grad(x[i, j] + b[j], 2)
            dx[i, j] = v
            acc[j] += v


@jit()
def _bias_relu_bwd_rows(dy, x, b, dx, acc, lo, hi):
    zero = x.dtype.type(0.0)  # (see _bias_relu_rows)
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            g = dy[i, j] if x[i, j] + b[j] > zero else zero
            dx[i, j] = g
            acc[j] += g


@jit()
def _bias_bwd_rows(dy, dx, acc, lo, hi):
    for i in range(lo, hi):
        for j in range(dy.shape[1]):
            dx[i, j] = dy[i, j]
            acc[j] += dy[i, j]


@jit(parallel=True)
def _bias_act_bwd(dy, x, b, dx, pdb, act, nchunks):
    """dx and the bias gradient in one pass (dx is not re-read); ``pdb[c]`` per chunk."""
    for c in prange(nchunks):
        lo, hi = chunk_bounds(x.shape[0], nchunks, c)
        if act == 2:
            _bias_gelu_bwd_rows(dy, x, b, dx, pdb[c], lo, hi)
        elif act == 1:
            _bias_relu_bwd_rows(dy, x, b, dx, pdb[c], lo, hi)
        else:
            _bias_bwd_rows(dy, dx, pdb[c], lo, hi)


# the row kernels once more without ``parallel`` (``kernels._jit.serial_twin``), for calls
# of one chunk: 8 x 256 float32 bias + ReLU 3.8 -> 2.4 us a call (the parallel launch of
# one chunk was 1.4 of it), where PyTorch's ``relu(x + b)`` took 2.2
_bias_act_1 = serial_twin(_bias_act)
_bias_act_bwd_1 = serial_twin(_bias_act_bwd)

# Bias + ReLU / none do little per element (an add, a compare, the bias sum), so their
# loops over rows go parallel only from this many elements, and then in 4 chunks per
# thread, not by ``row_chunks`` (tuned on heavier rows: parallel from 8192 elements).
# Emerald Rapids host, 2 cores, in cache, float32, us, one chunk / ``row_chunks`` / 4 a
# thread, forward and backward: 32 x 256 2.6 / 3.7 and 4.8 / 7.8; 64 x 256 1.8 / 2.8 and
# 4.8 / 5.5 (the kernels alone); 1024 x 10 6.3 / 6.5 and 13.8 / 19.3 (two chunks) / 10.9;
# 128 x 256 backward 8.5 / 6.8; 256 x 256 20.2 / 11.5
LIGHT_PARALLEL_MIN = 1 << 15


def _light_chunks(rows: int, cols: int) -> int:
    """Chunks for the bias + ReLU / none loops over rows (see ``LIGHT_PARALLEL_MIN``)."""
    if rows * cols < LIGHT_PARALLEL_MIN:
        return 1
    return max(1, min(4 * num_threads(), rows))


# -- bias + ReLU and bias alone ("none") into a streamed output -------------------------
# Where the output is written with non-temporal stores (``stream_out``: large, and on
# Intel hosts a caller's ``out=``), the loops over rows above would read each output
# line before writing it. These kernels take the GELU kernels' layout instead: flat
# arrays in chunks, the bias tiled (``_tiled``) so that a block crossing into the next
# row reads it contiguously, blocks of ``_AB`` elements built in a per-chunk scratch and
# streamed out by ``copy64_nt`` from the first 64-byte aligned element of ``out`` (one
# ``sfence`` per chunk), their inputs asked for ``PREFETCH_BYTES`` ahead (``row_hint``,
# where ``ROW_HINTS``). The backward sums each chunk's bias gradient into its tiled row
# of ``pdb``. Intel Xeon (Emerald Rapids, 2 cores), 131072 x 256 into a reused ``out=``,
# A/B by rounds in one process, rows / these: bias + ReLU float32 1.54x, its backward
# 1.46x; float64 1.52x / 1.61x; bias alone 1.50-1.75x. Into a new output, which that
# host writes with plain stores (``NT_FRESH``), the same layout with plain stores ran
# 0.78-0.96x the rows' speed, so those keep the loops over rows.
# Bias + ReLU / none on rows of fewer features than these (forward, backward) take the
# flat kernels with plain stores: the loops over rows pay a row's start and end for a few
# elements. Zen 5 host, 2^18 elements in cache, A/B in one process, rows / flat time
# (medians), float32 forward / backward: 2 features 6.0 / 15.4x, 4 3.5 / 11.8x, 8 1.4 /
# 2.5x, 16 1.1 / 1.8x, 32 0.9 / 1.04x, 64 0.8 / 1.0x, 128-256 0.7-0.8x; float64: 2 2.8 /
# 6.0x, 4 1.9 / 2.9x, 8 1.2 / 1.8x, 16 0.85 / 1.4x, 32 0.8 / 1.05x, 64 1.05 / 0.95x
BIAS_FLAT_BELOW_FEATURES = 16
BIAS_FLAT_BWD_BELOW_FEATURES = 32
_AB = 512  # elements per block (2 / 4 KiB): at 64, the per-block work took as long as
# the arithmetic in cache (float32, 1 MiB: 44 us against 21 for a loop over rows)


@jit(inline=True)
def _act_span(dy, x, bt, dst, d0, acc, i, j, n, act, backward):
    """``dst[d0 + t]`` for ``t < n``: ``act(x[i + t] + bt[j + t])`` (``act`` 0 none, 1
    relu), or backward ``dy[i + t]`` times its derivative, also added to ``acc[j + t]``.
    Through slices: indexed from ``i`` and ``j``, the backward loop was not vectorised."""
    zero = x.dtype.type(0.0)  # (a float64 0.0 made the loop scalar)
    xs, bs, ds = x[i:i + n], bt[j:j + n], dst[d0:d0 + n]
    if backward:
        gs, accs = dy[i:i + n], acc[j:j + n]
        if act == 1:
            for t in range(n):
                v = gs[t] if xs[t] + bs[t] > zero else zero
                ds[t] = v
                accs[t] += v
        else:
            for t in range(n):
                ds[t] = gs[t]
                accs[t] += gs[t]
    elif act == 1:  # as _act, which would bring GELU's code in with it
        for t in range(n):
            ds[t] = max(xs[t] + bs[t], zero)
    else:
        for t in range(n):
            ds[t] = xs[t] + bs[t]


@jit(inline=True)
def _ask_block(a, i):
    """Ask for the ``_AB`` elements of ``a`` that start ``PREFETCH_BYTES`` past index
    ``i``, a line at a time (strides written out: numba's itemsize is not a constant
    to LLVM). ``kernels._prefetch.prefetch_ahead`` asks for the same lines from a loop
    with a run-time step: with it, ``bench_prefetch.py --only bias_act`` from memory gave
    the float32 forward's hints 1.01x against 1.21x for these (9 rounds each)."""
    k = i + PREFETCH_BYTES // a.itemsize
    last = a.size - 1
    if a.itemsize == 4:
        for q in range(0, _AB, 16):
            row_hint(a, min(k + q, last))
    else:
        for q in range(0, _AB, 8):
            row_hint(a, min(k + q, last))


@jit(inline=True)
def _stream_block(out, i, s):
    """``out[i:i + _AB] = s[:_AB]`` by non-temporal stores (``&out[i]`` 64-byte aligned)."""
    if out.itemsize == 4:
        for q in range(0, _AB, 16):
            copy64_nt(out, i + q, s, q)
    else:
        for q in range(0, _AB, 8):
            copy64_nt(out, i + q, s, q)


@jit()
def _bias_act_chunk(c, dy, x, bt, out, pdb, st, ncols, nchunks, act, backward, nt):
    """Chunk ``c`` of ``_bias_act_streamed`` / ``_bias_act_bwd_streamed`` (``backward`` a
    constant in each; ``act`` and ``nt`` run-time values). With ``nt``: the head up to
    ``out``'s first 64-byte boundary with plain stores, whole blocks through the scratch
    row ``st[c]``, then the tail with plain stores. Without: every block straight into
    ``out`` with plain stores (short rows, ``BIAS_FLAT_BELOW_FEATURES``)."""
    lo, hi = chunk_bounds(x.size, nchunks, c)
    acc = pdb[c]
    s = st[c]
    i = _head(out, lo, hi, nt)
    _act_span(dy, x, bt, out, lo, acc, lo, lo % ncols, i - lo, act, backward)
    j = i % ncols
    while i + _AB <= hi:
        if nt:
            if act != 0 or not backward:  # the backward of "none" does not read x
                _ask_block(x, i)
            if backward:
                _ask_block(dy, i)
            _act_span(dy, x, bt, s, 0, acc, i, j, _AB, act, backward)
            _stream_block(out, i, s)
        else:
            _act_span(dy, x, bt, out, i, acc, i, j, _AB, act, backward)
        i += _AB
        j += _AB
        if j >= ncols:
            j %= ncols
    _act_span(dy, x, bt, out, i, acc, i, j, hi - i, act, backward)
    if nt:
        sfence()


# ``act`` is a run-time value (one loop each for relu and none in the chunk): a kernel
# per pair took twice the compile time (8 compiles of about 2 s each)
@jit(parallel=True)
def _bias_act_streamed(dy, x, bt, out, pdb, st, ncols, nchunks, act, nt):
    for c in prange(nchunks):
        _bias_act_chunk(np.int64(c), dy, x, bt, out, pdb, st, ncols, nchunks, act, False, nt)


@jit(parallel=True)
def _bias_act_bwd_streamed(dy, x, bt, out, pdb, st, ncols, nchunks, act, nt):
    for c in prange(nchunks):
        _bias_act_chunk(np.int64(c), dy, x, bt, out, pdb, st, ncols, nchunks, act, True, nt)


def _bias_act_flat(code: int, dy, x, b, out, *, backward=False, nt=True):
    """Run the flat kernel for ``code`` (0 none, 1 relu) on C-contiguous 2-D ``x`` into
    ``out`` (``nt``: streamed); the backward returns the bias gradient."""
    nch = _flat_chunks(x.size)
    pdb = np.zeros((nch, b.size + _AB) if backward else (nch, 1), x.dtype)
    st = np.empty((nch, _AB), x.dtype)
    kernel = _bias_act_bwd_streamed if backward else _bias_act_streamed
    kernel(dy.reshape(-1), x.reshape(-1), _tiled(b, _AB), out.reshape(-1), pdb, st, b.size, nch,
           code, nt)
    return _untile_sum(pdb, b.size) if backward else None


def _bias_inputs(x: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xc = _checks.float_array("x", x, ndim=2)
    bc = _checks.float_array("b", b, ndim=1, dtype=xc.dtype)
    _checks.shape_is("b", bc, (xc.shape[1],))
    return xc, bc


def bias_act(
    x: np.ndarray, b: np.ndarray, act: str = "gelu", *, out: np.ndarray | None = None
) -> np.ndarray:
    """``act(x + b)`` for 2-D ``x`` and a per-column bias ``b``, one pass. act: none/relu/gelu."""
    code = _act_code(act)
    xc, bc = _bias_inputs(x, b)
    res = _checks.out_array("out", out, xc.shape, xc.dtype, like=xc,
                              apart_from=xc)
    nt = code < 2 and stream_out(res, out is None, xc)
    if xc.size and code < 2 and (nt or xc.shape[1] < BIAS_FLAT_BELOW_FEATURES):
        _bias_act_flat(code, xc, xc, bc, res, nt=nt)
    elif xc.size and code == 2 and _vec(xc):
        _gelu_vec(xc, xc, res, b=bc, fresh=out is None)
    elif xc.size:
        nch = _light_chunks(*xc.shape) if code < 2 else row_chunks(*xc.shape)
        pick_twin(_bias_act, _bias_act_1, nch)(xc, bc, res, code, nch)
    return res


def bias_act_backward(
    dy: np.ndarray, x: np.ndarray, b: np.ndarray, act: str = "gelu", *,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of :func:`bias_act` (``x`` is the pre-bias input): ``(dx, db)``.

    ``db`` is summed per chunk of rows in the input dtype, then across chunks.
    """
    code = _act_code(act)
    xc, bc = _bias_inputs(x, b)
    dyc = _checks.float_array("dy", dy, ndim=2, dtype=xc.dtype)
    _checks.shape_is("dy", dyc, xc.shape)
    dx = _checks.out_array("out", out, xc.shape, xc.dtype, like=xc,
                              apart_from=xc)
    nt = code < 2 and stream_out(dx, out is None, xc)
    if xc.size and code < 2 and (nt or xc.shape[1] < BIAS_FLAT_BWD_BELOW_FEATURES):
        return dx, _bias_act_flat(code, dyc, xc, bc, dx, backward=True, nt=nt)
    if xc.size and code == 2 and _vec(xc):
        pdb = np.zeros((_flat_chunks(xc.size), bc.size + _TILE), xc.dtype)
        _gelu_vec(dyc, xc, dx, b=bc, pdb=pdb, backward=True, fresh=out is None)
        return dx, _untile_sum(pdb, bc.size)
    nch = _light_chunks(*xc.shape) if code < 2 else row_chunks(*xc.shape)
    pdb = np.zeros((nch, xc.shape[1]), xc.dtype)
    if xc.size:
        pick_twin(_bias_act_bwd, _bias_act_bwd_1, nch)(dyc, xc, bc, dx, pdb, code, nch)
    return dx, pdb[0] if nch == 1 else pdb.sum(axis=0)
