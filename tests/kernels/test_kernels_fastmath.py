"""The vectorisable exp and float64 erf/erfc/normal CDF used inside the kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kernels import _avx512, nn
from kernels._erf import erf_f64, erfc_f64, normal_parts
from kernels._fastmath import exp_fast, exp_nonpos, exp_softmax, row_max
from kernels._jit import numba


def _applied(fn):
    """``fn`` over an array (it is only callable from jitted code); a test helper, so
    nothing to cache."""

    @numba.njit(cache=False)
    def run(x, out):
        for i in range(x.size):
            out[i] = fn(x[i])

    return run


_exp_array = _applied(exp_fast)


@pytest.mark.parametrize("fn", [exp_nonpos, exp_softmax], ids=["exp_nonpos", "exp_softmax"])
def test_exp_of_nonpositive_is_within_two_ulp_below_tiny_as_documented(fn, dtype):
    # exp_nonpos flushes below the smallest normal (to 0 or a subnormal); softmax's exp
    # does not flush, it only stays at most about tiny there
    tiny = np.finfo(dtype).tiny
    x = np.concatenate([np.linspace(-800, 0, 40001), np.linspace(-3, 0, 10001),
                        np.log(tiny) + np.linspace(-1e-3, 1e-3, 101),
                        [np.nan, -np.inf, -0.0]]).astype(dtype)
    out = np.empty_like(x)
    _applied(fn)(x, out)
    ref = np.exp(x.astype(np.float64))
    normal = ref >= tiny
    assert np.max(np.abs(out[normal] - ref[normal]) / ref[normal]) <= 2 * np.finfo(dtype).eps
    assert np.isnan(out[-3]) and out[-1] == 1
    if fn is exp_nonpos:
        assert np.all(np.abs(out[~normal][:-3]) < tiny)  # flushed or subnormal
        assert out[-2] == 0
    else:
        assert np.all(out[~normal][:-3] <= 1.01 * tiny)
        assert out[-2] <= 1.01 * tiny


def require_avx512_exps():
    """The AVX-512 softmax exps run where numba targets AVX-512F; elsewhere (a CPU
    property no set-up can add) the library never takes them, which is checked before
    the test is skipped."""
    if not _avx512.AVAILABLE:
        assert not nn.VEC_F64 and _avx512.row_lanes(True) != 16
        pytest.skip("no AVX-512F target: the library does not use these exps here")


def test_avx512_softmax_exp_is_within_an_ulp_and_its_tail_sums_only_its_lanes():
    # softmax_exp_f64[_tail]: g = exp(x - mx), their sum and the max of x, 2^(k/16)
    # built from the table's bits by integer adds; w up to 60 above the shift too (a row
    # shifted by a logit other than its max), at most about tiny below the smallest
    # normal, NaN kept
    require_avx512_exps()
    tiny = np.finfo(np.float64).tiny
    w = np.concatenate([np.linspace(-760, 0, 40000), np.linspace(-1e-3, 60, 9936),
                        np.linspace(-2, 60, 40), np.log(tiny) + np.linspace(-1e-3, 1e-3, 96),
                        [np.nan, -np.inf, -0.0, 0.0, 709.0, -708.0, -745.0, -1e-300]])
    mx = 0.75
    x = w + mx
    g = np.full_like(x, -1.0)
    total, top = _softmax_exp_all(x, g, mx)
    ref = np.exp(x - mx)
    normal = ref >= tiny
    rel = np.abs(g[normal] - ref[normal]) / ref[normal]
    assert rel.max() <= 1.5 * np.finfo(np.float64).eps  # the old table exp: 2.1
    assert np.all((g[~normal] >= 0) & (g[~normal] <= 1.01 * tiny) | np.isnan(x[~normal]))
    assert np.isnan(g[-8]) and g[-6] == 1 and g[-5] == 1 and math.isnan(total)
    assert top == np.nanmax(x) or math.isnan(top)  # a NaN may win
    # the masked tail: n < 32 lanes written (as the whole blocks have them), summed and
    # in the max, the rest left alone and out of the max
    for n in (1, 7, 8, 9, 31):
        out = np.full(40, -1.0)
        xs = x[-144:-104].copy()  # w from -2 to 60
        xs[n:] = 1e300
        s, m = _softmax_exp_tail(xs, out, mx, n)
        np.testing.assert_array_equal(out[:n], g[-144:-144 + n])  # the same arithmetic
        assert (out[n:] == -1.0).all()
        assert s == pytest.approx(ref[-144:-144 + n].sum(), rel=1e-15)
        assert m == xs[:n].max()
    block = x[-144:-112].copy()  # w from -2 up
    total, top = _softmax_exp_all(block, np.empty(32), mx)
    assert top == block.max() and total == pytest.approx(np.exp(block - mx).sum(), rel=1e-15)


@numba.njit(cache=False, fastmath={"contract"})
def _softmax_exp_all(x, g, mx):  # whole blocks of 32 (x.size a multiple of 32)
    s, top = 0.0, -np.inf
    for j in range(0, x.size, _avx512.BLOCK):
        e, m = _avx512.softmax_exp_f64(x, g, j, j, mx, _avx512.BLOCK)
        s += e
        top = m if math.isnan(m) else max(top, m)
    return s, top


@numba.njit(cache=False, fastmath={"contract"})
def _softmax_exp_tail(x, g, mx, n):
    return _avx512.softmax_exp_f64_tail(x, g, 0, 0, mx, n)


def test_avx512_float32_softmax_exp_is_within_an_ulp():
    # the row and block kernels' float32 exp on 16 lanes: a 16-entry table in a
    # register, 2^(k/16) from its bits, a degree-3 polynomial; about tiny below the
    # smallest normal; NaN kept; exp(0) == 1
    require_avx512_exps()
    tiny = np.finfo(np.float32).tiny
    w = np.concatenate([np.linspace(-100, 0, 200000), np.linspace(-0.1, 0, 50000),
                        np.log(tiny) + np.linspace(-1e-3, 1e-3, 88),
                        [np.nan, -np.inf, -0.0, 0.0, -87.0, -1e-30, -1e-3, -0.5]])
    w = w.astype(np.float32)
    assert w.size % 16 == 0
    out = np.full_like(w, -1.0)
    _exp16_f32(w, out)
    ref = np.exp(w.astype(np.float64))
    normal = ref >= tiny
    rel = np.abs(out[normal] - ref[normal]) / ref[normal]
    assert rel.max() <= 1.5 * np.finfo(np.float32).eps
    assert np.all((out[~normal] >= 0) & (out[~normal] <= 1.01 * tiny) | np.isnan(w[~normal]))
    assert np.isnan(out[-8]) and out[-6] == 1 and out[-5] == 1


def _exp16_intrinsic():
    from llvmlite import ir

    from kernels._jit import intrinsic, types

    @intrinsic
    def exp16(typingctx, x, out, i):
        def codegen(context, builder, sig, args):
            vty = ir.VectorType(ir.FloatType(), 16)
            ptrs = [builder.bitcast(builder.gep(context.make_array(sig.args[k])(
                context, builder, args[k]).data, [args[2]]), vty.as_pointer()) for k in (0, 1)]
            w = builder.load(ptrs[0], align=4)
            builder.store(_avx512._exp_softmax_f32(builder, w), ptrs[1], align=4)
            return context.get_dummy_value()

        return types.none(x, out, i), codegen

    @numba.njit(cache=False)
    def run(x, out):
        for i in range(0, x.size, 16):
            exp16(x, out, i)

    return run


_exp16_f32 = _exp16_intrinsic()


def test_exp_fast_is_within_two_ulp_and_handles_the_edges(dtype):
    x = np.concatenate([np.linspace(-800, 800, 40001), np.linspace(-3, 3, 10001),
                        [np.nan, np.inf, -np.inf, 0.0]]).astype(dtype)
    out = np.empty_like(x)
    _exp_array(x, out)
    with np.errstate(all="ignore"):
        ref = np.exp(x.astype(np.float64))
        normal = (ref > np.finfo(dtype).tiny) & (ref < np.finfo(dtype).max)
        rel = np.abs(out[normal] - ref[normal]) / ref[normal]
        assert rel.max() <= 2 * np.finfo(dtype).eps
        over = x.astype(np.float64) > np.log(np.finfo(dtype).max) + 1e-3
        assert np.all(np.isinf(out[over]))
        assert np.all(out[x.astype(np.float64) < np.log(np.finfo(dtype).smallest_subnormal) - 1] == 0)
    assert np.isnan(out[-4]) and out[-3] == np.inf and out[-2] == 0 and out[-1] == 1


# -- float64 erf / erfc / normal CDF (kernels._erf) ----------------------------------

@numba.njit(cache=False)
def _erf_arrays(x, erf, erfc, cdf, pdf):
    for i in range(x.size):
        erf[i] = erf_f64(x[i])
        erfc[i] = erfc_f64(x[i])
        cdf[i], pdf[i] = normal_parts(x[i])


def _erf_points() -> np.ndarray:
    rng = np.random.default_rng(7)
    near = [np.linspace(c - 1e-3, c + 1e-3, 401) for c in (0.0, 0.5, 1.0, 4.0, 6.0)]
    tiny = np.logspace(-300, 0, 601)
    pos = np.concatenate([np.linspace(0, 30, 30001), tiny, 4 * np.abs(rng.standard_normal(5000)),
                          *near])
    return np.concatenate([pos, -pos])


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    ok = ref != 0
    return float(np.max(np.abs(a[ok] - ref[ok]) / np.abs(ref[ok])))


def test_erf_f64_matches_libm_to_a_few_ulp():
    x = _erf_points()
    out = [np.empty_like(x) for _ in range(4)]
    _erf_arrays(x, *out)
    erf, erfc, cdf, pdf = out
    eps = np.finfo(np.float64).eps
    assert _rel(erf, np.array([math.erf(v) for v in x])) <= 4 * eps
    ref_c = np.array([math.erfc(v) for v in x])
    normal = ref_c > 1e-300  # below, erfc is subnormal: absolute error only
    assert _rel(erfc[normal], ref_c[normal]) <= 8 * eps
    assert np.all(np.abs(erfc[~normal] - ref_c[~normal]) <= 1e-300)
    assert np.array_equal(np.signbit(erf), np.signbit(x))  # odd, and erf(-0.0) = -0.0
    # Phi(x) = erfc(-x / sqrt 2) / 2; the reference rounds x / sqrt 2, which costs it
    # up to x^2 ulp in the lower tail: allow that on top of a few ulp
    m = np.abs(x) <= 12
    ref_cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x[m]])
    assert np.all(np.abs(cdf[m] - ref_cdf) <= (8 + x[m] ** 2) * eps * ref_cdf)
    ref_pdf = np.exp(-0.5 * x[m] ** 2) / math.sqrt(2 * math.pi)  # rounds x^2 likewise
    assert np.all(np.abs(pdf[m] - ref_pdf) <= (8 + x[m] ** 2) * eps * ref_pdf)


def test_erf_f64_edges():
    x = np.array([np.inf, -np.inf, np.nan, 0.0, 40.0, -40.0])
    out = [np.empty_like(x) for _ in range(4)]
    _erf_arrays(x, *out)
    erf, erfc, cdf, pdf = out
    np.testing.assert_array_equal(erf[[0, 1, 3, 4, 5]], [1.0, -1.0, 0.0, 1.0, -1.0])
    np.testing.assert_array_equal(erfc[[0, 1, 3, 4, 5]], [0.0, 2.0, 1.0, 0.0, 2.0])
    np.testing.assert_array_equal(cdf[[0, 1, 3]], [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(pdf[[0, 1]], [0.0, 0.0])
    assert np.isnan(erf[2]) and np.isnan(erfc[2]) and np.isnan(cdf[2]) and np.isnan(pdf[2])


def test_row_max_on_bit_patterns(dtype, rng):
    ity = np.int32 if dtype == np.float32 else np.int64
    rows = [rng.standard_normal(37), -np.abs(rng.standard_normal(300)) - 1, np.array([-0.0, 0.0]),
            np.array([-np.inf, -5.0]), np.array([3.0, np.inf, -np.inf]), np.array([-2.5])]
    for row in rows:
        r = row.astype(dtype)
        assert row_max(r.view(ity)) == r.max()
