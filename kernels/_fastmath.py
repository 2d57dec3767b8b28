"""Vectorisable exp for the kernels (libm calls do not vectorise without SVML).

``exp_fast(x)``: Cody-Waite range reduction ``x = n ln2 + r`` (|r| <= ln2/2), a polynomial
for ``e^r`` (float32: Taylor, degree 7; float64: a Chebyshev fit of degree 11 from
``kernels._erf_fit``, evaluated in Estrin's scheme so its multiplications do not wait on
each other one by one: a few ulp either way) and ``2^n`` built
from its bit pattern in two halves (so subnormal results and the top of the range work),
all branch-free so LLVM emits SIMD code. Overflow gives inf, underflow 0, NaN stays NaN.
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba.core import cgutils

from kernels._jit import intrinsic, jit, overload, types

_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238  # ln2 split so n*LN2_HI is exact for |n| < 2**20
_LN2_LO = 1.9082149292705877e-10
# float32: ln2 split (8 + 24 bits) and the argument below which e**x is under 2**-126
LN2_HI_F32 = np.float32(0.693359375)
LN2_LO_F32 = np.float32(-2.12194440e-4)
EXP_MIN_F32 = np.float32(-87.3366)
_INV_FACT = tuple(1.0 / float(np.prod(np.arange(1, k + 1))) for k in range(8))
(F0, F1, F2, F3, F4, F5, F6, F7) = _INV_FACT
# e^r on |r| <= ln2/2, degree 11 (python -m kernels._erf_fit), max rel. error 2e-16
_EXP = (1.0, 1.0, 0.5000000000000019, 0.16666666666666702, 0.04166666666648808,
        0.008333333333309526, 0.0013888888952318045, 0.00019841269909219843,
        2.480148547921643e-05, 2.755722495611072e-06, 2.7632640675430235e-07,
        2.5114870219497476e-08)
(X0, X1, X2, X3, X4, X5, X6, X7, X8, X9, X10, X11) = _EXP


def _pow2_codegen(fbits: int, bias: int, ftype: ir.Type, itype: ir.IntType):
    def codegen(context, builder, signature, args):
        n = builder.fptosi(args[0], ir.IntType(32))  # packed on AVX2 for f32 and f64
        e = builder.add(n, ir.Constant(ir.IntType(32), bias))
        if itype.width != 32:
            e = builder.zext(e, itype)
        e = builder.shl(e, ir.Constant(itype, fbits))
        return builder.bitcast(e, ftype)

    return codegen


@intrinsic
def _pow2i(typingctx, n):
    """2**n for an integer-valued float n in the normal exponent range (bit tricks)."""
    if n == types.float64:
        return types.float64(types.float64), _pow2_codegen(52, 1023, ir.DoubleType(),
                                                            ir.IntType(64))
    if n == types.float32:
        return types.float32(types.float32), _pow2_codegen(23, 127, ir.FloatType(),
                                                            ir.IntType(32))
    return None


@jit(fastmath={"contract"}, inline=True)
def _exp_poly_f64(r):
    """e^r for |r| <= ln2/2 (Estrin: depth 5 instead of Horner's 11)."""
    r2 = r * r
    r4 = r2 * r2
    a = (X0 + X1 * r) + (X2 + X3 * r) * r2
    b = (X4 + X5 * r) + (X6 + X7 * r) * r2
    c = (X8 + X9 * r) + (X10 + X11 * r) * r2
    return a + (b + c * r4) * r4


# 'contract' (FMA) only: reassociating p * 2^h * 2^(n-h) into p * 2^n would overflow.
@jit(fastmath={"contract"})
def exp_f64(x):
    """e**x to about 2 ulp (float64), vectorisable."""
    xc = min(max(x, -746.0), 710.0)
    n = np.floor(xc * _LOG2E + 0.5)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = _exp_poly_f64(r)
    h = np.floor(n * 0.5)
    res = p * _pow2i(h) * _pow2i(n - h)  # two halves: no overflow of the exponent field
    res = np.inf if x > 709.782712893384 else res
    res = 0.0 if x < -745.2 else res
    return x if np.isnan(x) else res


@jit(fastmath={"contract"})
def exp_f32(x):
    """e**x for float32 to about 2 ulp, in float32 arithmetic (8 lanes on AVX2)."""
    xc = min(max(x, np.float32(-104.0)), np.float32(89.0))
    n = np.floor(xc * np.float32(_LOG2E) + np.float32(0.5))
    r = (xc - n * LN2_HI_F32) - n * LN2_LO_F32
    p = ((((((np.float32(F7) * r + np.float32(F6)) * r + np.float32(F5)) * r + np.float32(F4))
           * r + np.float32(F3)) * r + np.float32(F2)) * r + np.float32(F1)) * r + np.float32(F0)
    h = np.floor(n * np.float32(0.5))
    res = p * _pow2i(h) * _pow2i(n - h)
    res = np.float32(np.inf) if x > np.float32(88.72283) else res
    res = np.float32(0.0) if x < np.float32(-103.97) else res
    return x if np.isnan(x) else res


# For x <= 0 (softmax's x - max, GELU's -x^2/2): no overflow branch and one 2^n instead
# of two halves; results below the smallest normal flush to 0 (absolute error < 3e-308).
@jit(fastmath={"contract"})
def exp_softmax_f64(x):
    """e**x for float64 x <= 0, results below 2.2e-308 not flushed; NaN stays NaN. ``n``
    rounded by adding ``ROUND_F64`` and ``2^n`` shifted out of the sum's bits (as
    ``exp_softmax_f32`` does), instead of ``floor(x log2e + 0.5)`` and a conversion to
    integers: the same ``n`` but where ``x log2e`` lies within rounding of a half-integer
    (2 million inputs on [-708, 0] gave the same bits), and 1.12x on a softmax row's
    exp loop (Zen 2 host, L1: 1.48 -> 1.32 ns per element; AVX2 converts 4 doubles to
    32-bit integers only, then widens them)."""
    xc = max(x, -708.3965)  # e**-708.3965 ~ 2**-1022; numba's max keeps a NaN first argument
    t = xc * _LOG2E + ROUND_F64
    n = t - ROUND_F64
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    return _exp_poly_f64(r) * pow2_of_rounded(t)


@jit(fastmath={"contract"})
def exp_nonpos_f64(x):
    """e**x for x <= 0 to about 2 ulp (float64), vectorisable; NaN stays NaN; results
    below the smallest normal flushed to 0."""
    return 0.0 if x < -708.3965 else exp_softmax_f64(x)


@jit(fastmath={"contract"})
def exp_nonpos_f32(x):
    """e**x for float32 x <= 0 to about 2 ulp, in float32 arithmetic; NaN stays NaN."""
    xc = max(x, EXP_MIN_F32)  # e**-87.3366 ~ 2**-126
    n = np.floor(xc * np.float32(_LOG2E) + np.float32(0.5))
    r = (xc - n * LN2_HI_F32) - n * LN2_LO_F32
    p = ((((((np.float32(F7) * r + np.float32(F6)) * r + np.float32(F5)) * r + np.float32(F4))
           * r + np.float32(F3)) * r + np.float32(F2)) * r + np.float32(F1)) * r + np.float32(F0)
    res = p * _pow2i(n)
    return np.float32(0.0) if x < EXP_MIN_F32 else res


# Softmax only: e**x for x <= 0 where anything below the smallest normal may come out as
# about 1.2e-38 (float32) / 2.2e-308 (float64) instead of 0, which a softmax sum and its
# scaled row absorb (the absolute error is below those values): no underflow select, and
# in float32 a degree-5 polynomial on |r| <= ln2/2 with its constant fixed at 1 (so
# exp(0) == 1), fitted for the least maximum relative error (``kernels._erf_fit.
# fit_exp_rel``: 9.2e-8 in exact arithmetic, 1.7e-7 evaluated in float32)
# instead of the degree-7 Taylor series. One multiply-add fewer than the degree-6 fit
# it replaces: float32 softmax 76% -> 80% of an 83-85 GB/s triad (8 processes, A/B).
_EXP5_F32 = (1.0, 0.9999997072079899, 0.4999914965556638, 0.16667636294586302,
             0.04189791273510623, 0.008290296947133007)
(G0, G1, G2, G3, G4, G5) = (np.float32(c) for c in _EXP5_F32)


# n = round(x log2 e) by adding ROUND_F32: the sum's low mantissa bits then hold n + 127
# (2^22 is a multiple of 2^9), so shifting its bits 23 places up is 2^n, for n in [-126,
# 128): no floor, no float-to-int conversion, no bias added (three vector operations of
# about sixteen fewer than floor and _pow2i). Exact inputs to the shift need the sum
# rounded once: this function's fastmath is "contract" only, so (t - ROUND_F32) is not
# folded back into x log2 e.
ROUND_F32 = np.float32(1.5 * 2.0 ** 23 + 127)
ROUND_F64 = 1.5 * 2.0 ** 52 + 1023  # the same for float64: n + 1023 in the low 11 bits


# the inline-asm constraint of a vector register (floats and vectors of them)
_REG = {"x86_64": "v", "amd64": "v", "aarch64": "w", "arm64": "w"}.get(
    platform.machine().lower())


def hidden(builder, v):
    """``v`` (a float or a float vector), hidden from the optimiser by an empty inline
    asm, so it cannot fold the code that made ``v`` into the code that uses it."""
    if _REG is None:
        return v
    asm = ir.InlineAsm(ir.FunctionType(v.type, [v.type]), "", f"={_REG},0")
    return builder.call(asm, [v])


@intrinsic
def opaque(typingctx, x):
    """``x``, hidden from the optimiser (``hidden``): fast-math cannot rewrite the
    expression that made it into the code that uses it (a loop's ``g[j] * (a / b)``
    became ``(a * g[j]) * (1 / b)``: two multiplies per element and three roundings)."""
    if x not in (types.float32, types.float64):
        return None

    def codegen(context, builder, signature, args):
        return hidden(builder, args[0])

    return x(x), codegen


@intrinsic
def pow2_of_rounded(typingctx, t):
    """2**n from ``t = n + ROUND_F32`` (float32: its bits shifted 23 places up) or
    ``t = n + ROUND_F64`` (float64: 52 places)."""
    if t not in (types.float32, types.float64):
        return None
    bits, ftype = (32, ir.FloatType()) if t == types.float32 else (64, ir.DoubleType())

    def codegen(context, builder, signature, args):
        ity = ir.IntType(bits)
        shifted = builder.shl(builder.bitcast(args[0], ity),
                              ir.Constant(ity, 23 if bits == 32 else 52))
        return builder.bitcast(shifted, ftype)

    return t(t), codegen


@jit(fastmath={"contract"})
def exp_softmax_f32(x):
    """e**x for float32 x <= 0 (any x < 88 works), results below 1.2e-38 not flushed
    (see above); NaN stays NaN."""
    xc = max(x, EXP_MIN_F32)
    t = xc * np.float32(_LOG2E) + ROUND_F32
    n = t - ROUND_F32
    r = (xc - n * LN2_HI_F32) - n * LN2_LO_F32
    p = ((((G5 * r + G4) * r + G3) * r + G2) * r + G1) * r + G0
    return p * pow2_of_rounded(t)


def _by_dtype(name: str, f32, f64, doc: str):
    """A function callable only from jitted code, inlined there: ``f32`` for a float32
    argument, else ``f64`` on the argument cast to float64."""

    def stub(x):  # pragma: no cover - replaced by the overload inside jitted code
        raise NotImplementedError(f"{name} is only callable from jitted code")

    stub.__name__ = stub.__qualname__ = name
    stub.__doc__ = doc

    @overload(stub, inline="always")
    def _impl(x):
        if x == types.float32:
            return lambda x: f32(x)
        return lambda x: f64(np.float64(x))

    return stub


exp_softmax = _by_dtype("exp_softmax", exp_softmax_f32, exp_softmax_f64,
                        "``exp_nonpos`` for softmax (see ``exp_softmax_f32``).")
exp_nonpos = _by_dtype("exp_nonpos", exp_nonpos_f32, exp_nonpos_f64,
                       "``exp_fast`` for arguments known to be <= 0.")
exp_fast = _by_dtype("exp_fast", exp_f32, exp_f64, "e**x, vectorisable (float32 in float32).")


def _bitcast_codegen(ftype: ir.Type):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ftype)

    return codegen


@intrinsic
def bits_to_float(typingctx, i):
    """The float whose bit pattern is ``i`` (int32 -> float32, int64 -> float64)."""
    if i == types.int32:
        return types.float32(types.int32), _bitcast_codegen(ir.FloatType())
    if i == types.int64:
        return types.float64(types.int64), _bitcast_codegen(ir.DoubleType())
    return None


def _order_key(b):  # pragma: no cover - replaced by the overload inside jitted code
    """Map a float's bit pattern to an int of the same width ordered like the floats."""
    raise NotImplementedError


@overload(_order_key, inline="always")
def _order_key_overload(b):
    # numba widens int32 arithmetic to int64; cast back so float32 rows keep 16 lanes
    if b == types.int32:
        return lambda b: np.int32(b ^ ((b >> 31) & 0x7FFFFFFF))
    return lambda b: b ^ ((b >> 63) & 0x7FFFFFFFFFFFFFFF)


@jit()
def row_max(rbits):
    """Max of a float row given as its bit patterns (the row viewed as int32/int64).

    ``b ^ ((b >> 31) & 0x7FFFFFFF)`` (float32; 63 bits for float64) maps float order onto
    signed-int order, and an integer max vectorises with no fast-math NaN flags (a float
    max reduction does not). A NaN in the row may or may not win; either way it still
    reaches the caller's sum through ``exp(x - max)``, which is all softmax needs.
    """
    m = _order_key(rbits[0])
    for j in range(rbits.size):
        m = max(m, _order_key(rbits[j]))
    return bits_to_float(_order_key(m))  # the map is its own inverse



@intrinsic
def _maxnum_nnan(typingctx, a, b):
    """``llvm.maxnum`` marked "no NaNs": LLVM turns a loop of these into a vector max
    reduction (a plain select-based max does not vectorise without that flag)."""
    if not (a == b and a in (types.float32, types.float64)):
        return None

    def codegen(context, builder, signature, args):
        ft = context.get_value_type(signature.args[0])
        name = "llvm.maxnum.f32" if signature.args[0] == types.float32 else "llvm.maxnum.f64"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ft, [ft, ft]), name)
        call = builder.call(fn, list(args), fastmath=("nnan", "nsz"))
        return call

    return a(a, b), codegen


@jit()
def row_max_float(row):
    """Max of a float row as one ``vmaxps``/``vmaxpd`` per vector instead of the four
    operations of ``row_max``'s order key. A NaN in the row makes the result one of
    the row's values or NaN, and the caller's ``exp(x - max)`` carries the NaN itself
    into the sum, which is all softmax needs."""
    m = row[0]
    for j in range(row.size):
        m = _maxnum_nnan(m, row[j])
    return m
