"""Vectorisable exp for the kernels (libm calls do not vectorise without SVML).

``exp_fast(x)``: Cody-Waite range reduction ``x = n ln2 + r`` (|r| <= ln2/2), a Taylor
polynomial for ``e^r`` (degree 7 in float32, 13 in float64: a few ulp) and ``2^n`` built
from its bit pattern in two halves (so subnormal results and the top of the range work),
all branch-free so LLVM emits SIMD code. Overflow gives inf, underflow 0, NaN stays NaN.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from kernels._jit import intrinsic, jit, overload, types

_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238  # ln2 split so n*LN2_HI is exact for |n| < 2**20
_LN2_LO = 1.9082149292705877e-10
_INV_FACT = tuple(1.0 / float(np.prod(np.arange(1, k + 1))) for k in range(14))
(F0, F1, F2, F3, F4, F5, F6, F7, F8, F9, F10, F11, F12, F13) = _INV_FACT


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


# 'contract' (FMA) only: reassociating p * 2^h * 2^(n-h) into p * 2^n would overflow.
@jit(fastmath={"contract"})
def exp_f64(x):
    """e**x to about 2 ulp (float64), vectorisable."""
    xc = min(max(x, -746.0), 710.0)
    n = np.floor(xc * _LOG2E + 0.5)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = (((((((((((((F13 * r + F12) * r + F11) * r + F10) * r + F9) * r + F8) * r + F7) * r
                 + F6) * r + F5) * r + F4) * r + F3) * r + F2) * r + F1) * r + F0)
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
    r = (xc - n * np.float32(0.693359375)) - n * np.float32(-2.12194440e-4)
    p = ((((((np.float32(F7) * r + np.float32(F6)) * r + np.float32(F5)) * r + np.float32(F4))
           * r + np.float32(F3)) * r + np.float32(F2)) * r + np.float32(F1)) * r + np.float32(F0)
    h = np.floor(n * np.float32(0.5))
    res = p * _pow2i(h) * _pow2i(n - h)
    res = np.float32(np.inf) if x > np.float32(88.72283) else res
    res = np.float32(0.0) if x < np.float32(-103.97) else res
    return x if np.isnan(x) else res


def exp_fast(x):  # pragma: no cover - replaced by the overload inside jitted code
    """Dispatch on the input type inside jitted code (float32 -> exp_f32, else exp_f64)."""
    raise NotImplementedError("exp_fast is only callable from jitted code")


@overload(exp_fast, inline="always")
def _exp_fast_overload(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    return lambda x: exp_f64(np.float64(x))


@jit()
def row_max(row):
    """Max of a row with eight running maxima: LLVM will not vectorise a float max
    reduction without 'nnan', and NaN must still reach the loss (it does, through exp)."""
    c = row.size
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    j = 0
    while j + 8 <= c:
        m0, m1 = max(m0, row[j]), max(m1, row[j + 1])
        m2, m3 = max(m2, row[j + 2]), max(m3, row[j + 3])
        m4, m5 = max(m4, row[j + 4]), max(m5, row[j + 5])
        m6, m7 = max(m6, row[j + 6]), max(m7, row[j + 7])
        j += 8
    for jj in range(j, c):
        m0 = max(m0, row[jj])
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@jit()
def row_absmax(row):
    """max |row[j]| with eight running maxima (vectorises like :func:`row_max`)."""
    c = row.size
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = abs(row[0])
    j = 0
    while j + 8 <= c:
        m0, m1 = max(m0, abs(row[j])), max(m1, abs(row[j + 1]))
        m2, m3 = max(m2, abs(row[j + 2])), max(m3, abs(row[j + 3]))
        m4, m5 = max(m4, abs(row[j + 4])), max(m5, abs(row[j + 5]))
        m6, m7 = max(m6, abs(row[j + 6])), max(m7, abs(row[j + 7]))
        j += 8
    for jj in range(j, c):
        m0 = max(m0, abs(row[jj]))
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
