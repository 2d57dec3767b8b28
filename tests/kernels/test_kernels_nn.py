"""softmax + cross-entropy, layer norm, GELU, bias + activation against NumPy references."""

from __future__ import annotations

import math
import platform
import re
from pathlib import Path

import numba
import numpy as np
import pytest

from kernels import _avx512, _checks, _jit, _simd, activations, empty_aligned, nn
from kernels.config import intel_host
from kernels.errors import KernelDtypeError, KernelInputError

_erf = np.vectorize(math.erf)


def ref_gelu(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def ref_gelu_grad(x):
    x = np.asarray(x, np.float64)
    return 0.5 * (1 + _erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def ref_xent(x, y):
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    p = np.exp(x - lse[:, None])
    p[np.arange(len(y)), y] -= 1
    return (lse - x[np.arange(len(y)), y]).mean(), p / len(y)


def ref_layer_norm(x, g, b, eps=1e-5):
    x = x.astype(np.float64)
    mu = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


# -- softmax + cross-entropy ------------------------------------------------------------

@pytest.fixture
def every_short_row(monkeypatch):
    """The short-row kernels take every row of up to 8 vectors, whatever the host's
    tuning leaves to the row loops (``nn.SHORT_MAX_VECTORS``: with AVX2 float32 softmax
    and layer norm forward rows go through the row loops)."""
    monkeypatch.setattr(nn, "SHORT_MAX_VECTORS", {
        kind: dict.fromkeys(limits, 8) for kind, limits in nn.SHORT_MAX_VECTORS.items()})


@pytest.fixture(params=["vector", "vector-nt", "portable"])
def xent_path(request, monkeypatch, every_short_row):
    """Run a softmax test through the vector kernels at the host's width (short rows in
    registers, blocks of rows; float64 rows through the AVX-512 exp pass where the CPU
    has it; "vector-nt": with non-temporal stores however small the output) and through
    the portable row loops."""
    vec = request.param != "portable"
    monkeypatch.setattr(nn, "VEC_F64", vec and _avx512.AVAILABLE)
    monkeypatch.setattr(nn, "VEC_SHORT", vec)
    monkeypatch.setattr(nn, "VEC_BLOCKS", vec)
    if request.param == "vector-nt":
        monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
        monkeypatch.setattr(nn, "SOFTMAX_STREAM", True)
    return request.param


def test_vector_paths_follow_the_cpus_flags():
    # the skips in this file rest on kernels._simd's view of the CPU: where numba targets
    # the host it must agree with the kernel's /proc/cpuinfo, so a broken check fails
    # here instead of quietly skipping the vector tests (or running none of the paths).
    # Where numba is told to target another CPU (the 256-bit run in a subprocess below),
    # the flags are the ones it is given: a named CPU without a feature list counts as
    # having none (a portable cache)
    import sys

    if numba.config.CPU_FEATURES:
        flags = {f[1:] for f in numba.config.CPU_FEATURES.split(",") if f.startswith("+")}
    elif numba.config.CPU_NAME not in (None, "", "host"):
        flags = set()
    elif sys.platform.startswith("linux"):
        flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                         if ln.startswith("flags")).split(":", 1)[1].split())
    else:  # no /proc/cpuinfo: LLVM's own reading of the host (the same names for these)
        import llvmlite.binding as llvm

        flags = {k for k, on in llvm.get_host_cpu_features().items() if on}
    avx2_fma = {"avx2", "fma"} <= flags
    assert _avx512.AVAILABLE == ("avx512f" in flags)
    assert _simd._host_has_avx2_fma() == avx2_fma
    assert (activations.VEC_F32 == activations.VEC_F64 == nn.VEC_SHORT == nn.VEC_BLOCKS
            == avx2_fma)
    assert _avx512.row_lanes(True) == (16 if "avx512f" in flags else 8)


def require_blocks():
    """The blocks of rows (softmax, layer norm) run where numba targets AVX2 and FMA;
    elsewhere (a CPU property no set-up can add) the library never takes them, which is
    checked before the test is skipped."""
    if not nn.VEC_BLOCKS:
        assert not _simd._host_has_avx2_fma()
        pytest.skip("no AVX2/FMA target: the blocks of rows are not used here")


def test_xent_matches_reference(dtype, tol, rng, xent_path):
    x = (5 * rng.standard_normal((50, 13))).astype(dtype)
    y = rng.integers(0, 13, 50)
    loss, g = nn.softmax_cross_entropy(x, y)
    rl, rg = ref_xent(x, y)
    assert g.dtype == dtype
    np.testing.assert_allclose(loss, rl, **tol)
    np.testing.assert_allclose(g, rg, **tol)
    loss_sum, _ = nn.softmax_cross_entropy(x, y, grad=False, reduction="sum")
    np.testing.assert_allclose(loss_sum, 50 * rl, **tol)
    out = np.empty_like(x)
    loss_sum, g2 = nn.softmax_cross_entropy(x, y, reduction="sum", grad_scale=0.25, out=out)
    assert g2 is out
    np.testing.assert_allclose(g2, rg * 50 * 0.25, **tol)


@numba.njit(parallel=True)
def _tiny_products(out):
    for i in numba.prange(out.size):
        out[i] = np.float32(1e-30) * np.float32(1e-10) * np.float32(i % 4 + 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [10, 20, 40, 100, 256])
def test_xent_flushes_subnormal_gradients_and_restores_the_fp_mode(dtype, c, rng, xent_path):
    # logits spread far apart (a confident model, a contrastive loss at logit scale 100):
    # most p * scale fall below the smallest normal. The kernels run with subnormals
    # flushed (an Intel core takes a microcode assist for each vector that makes one:
    # 10-25x slower), so those entries come out 0, every other entry as before, and the
    # caller's threads get their floating-point mode back
    # (rows enough for several chunks: Numba's worker threads flush too)
    x = (rng.standard_normal((2048, c)) * (100 if dtype == np.float32 else 1000)).astype(dtype)
    y = rng.integers(0, c, 2048)
    rl, rg = ref_xent(x, y)
    assert (np.abs(rg) < np.finfo(dtype).tiny).mean() > 0.3  # the case is real
    for out in (None, np.empty_like(x)):
        loss, g = nn.softmax_cross_entropy(x, y, out=out)
        np.testing.assert_allclose(loss, rl, rtol=1e-5 if dtype == np.float32 else 1e-12)
        # (p - 1 at a label where p is near 1: an absolute error of some ulp of 1 / 2048)
        np.testing.assert_allclose(g, rg, rtol=1e-5, atol=1e-8 if dtype == np.float32 else 1e-15)
        if _simd.NT_STORES:  # x86-64: MXCSR's flush-to-zero
            assert not ((g != 0) & (np.abs(g) < np.finfo(dtype).tiny)).any()
    assert np.float32(1e-30) * np.float32(1e-10) != 0  # this thread: subnormals again
    w = np.empty(64, np.float32)
    _tiny_products(w)  # and Numba's worker threads
    assert (w != 0).all()


def test_xent_is_stable_for_huge_logits_and_takes_strided_input(rng, xent_path):
    x = np.asfortranarray(rng.standard_normal((6, 4)) * 1e4)
    y = np.array([0, 1, 2, 3, 0, 1])
    loss, g = nn.softmax_cross_entropy(x, y)
    rl, rg = ref_xent(x, y)
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, rl, rtol=1e-12)
    np.testing.assert_allclose(g, rg, atol=1e-12)


def test_xent_nan_logits_give_nan_loss_and_empty_is_defined(xent_path):
    x = np.array([[0.0, np.nan], [1.0, 2.0]])
    loss, _ = nn.softmax_cross_entropy(x, np.array([0, 1]))
    assert math.isnan(loss)
    loss, g = nn.softmax_cross_entropy(np.zeros((0, 3)), np.zeros(0, np.int64), reduction="sum")
    assert loss == 0.0 and g.shape == (0, 3)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_xent_long_rows_shift_by_the_first_logit_or_redo_against_the_max(dt, rng):
    # the row loops take exp(x - x[0]) and keep it unless the row's max is more than
    # nn.SHIFT_MAX above x[0] (then the exps would overflow, or wrap in 2^n's bits): each
    # row here sits on one side of that line or on the line, and must match the float64
    # reference either way; a -inf first logit and a max far above must redo too
    c = 300  # past the short rows and blocks: the row loops on every host
    gaps = [0.0, 5.0, 59.0, nn.SHIFT_MAX, 61.0, 87.0, 95.0, 200.0, 1e4]
    x = rng.standard_normal((len(gaps) + 2, c))
    for i, gap in enumerate(gaps):
        x[i, 0] = 0.0
        x[i, 1 + i] = gap
    x[-2, 0] = -np.inf
    x[-1, 0] = -1e4
    y = rng.integers(0, c, len(x))
    y[3] = 4  # the label on the max, p close to 1
    xs = x.astype(dt)
    loss, g = nn.softmax_cross_entropy(xs, y)
    rl, rg = ref_xent(xs, y)
    tol = dict(rtol=1e-5, atol=1e-8) if dt == np.float32 else dict(rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(loss, rl, **tol)
    np.testing.assert_allclose(g, rg, **tol)
    alone, none = nn.softmax_cross_entropy(xs, y, grad=False)
    assert none is None
    np.testing.assert_allclose(alone, rl, **tol)


def test_xent_rows_after_a_wide_row_take_their_max_first_for_the_same_bits(dtype, rng,
                                                                          xent_path):
    # after a row whose max was more than SHIFT_MAX above its first logit, the row loops
    # take the next row's max before its exps and pick the shift by the same rule: each
    # row's gradient must be bit for bit what it gets alone (where it never follows a
    # wide row), on either side of the line, and the loss the reference's
    c = 300  # the row loops on every host
    x = rng.standard_normal((14, c))
    x[1:4] *= 100  # logits at CLIP's scale: every such row needs its max
    for i, gap in zip((4, 6, 8, 10), (nn.SHIFT_MAX, 61.0, 5.0, 1e4)):
        x[i, 0], x[i, 7] = 0.0, gap
    x[5] *= 100
    x[11, 0] = -np.inf
    xs = x.astype(dtype)
    y = rng.integers(0, c, len(x))
    out = empty_aligned(xs.shape, dtype)
    loss, g = nn.softmax_cross_entropy(xs, y, reduction="sum", grad_scale=1.0, out=out)
    for i in range(len(x)):
        _, gi = nn.softmax_cross_entropy(xs[i:i + 1], y[i:i + 1], reduction="sum",
                                         grad_scale=1.0)
        np.testing.assert_array_equal(g[i], gi[0], err_msg=f"row {i}")
    rl, rg = ref_xent(xs, y)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(loss / len(x), rl, **tol)
    np.testing.assert_allclose(g / len(x), rg, **tol)


def test_xent_float32_special_rows_follow_float64(rng):
    # float32 takes the row max with a vector float max (no NaN semantics): a NaN, +inf
    # or all -inf row still gives NaN in its own row only, -inf entries (masking) give
    # at most the smallest normal (the softmax exp does not flush), and a huge spread
    # underflows like float64
    x = 4 * rng.standard_normal((7, 37))
    x[1, 3] = np.nan
    x[2, -1] = np.inf
    x[3, :] = -np.inf
    x[4, 0] = 80.0
    x[5, ::2] = -np.inf
    y = np.array([0, 1, 2, 3, 0, 1, 5])
    l32, g32 = nn.softmax_cross_entropy(x.astype(np.float32), y, reduction="sum")
    l64, g64 = nn.softmax_cross_entropy(x, y, reduction="sum")
    assert math.isnan(l32) and math.isnan(l64)
    bad = np.isnan(g64).any(axis=1)
    assert bad.tolist() == [False, True, True, True, False, False, False]
    assert np.isnan(g32[bad]).any(axis=1).all()
    np.testing.assert_allclose(g32[~bad], g64[~bad], rtol=1e-5, atol=1e-6)
    assert (np.abs(g32[5, ::2]) <= np.finfo(np.float32).tiny).all()
    for rows in ([0], [4, 5, 6]):
        a, _ = nn.softmax_cross_entropy(x[rows].astype(np.float32), y[rows])
        b, _ = nn.softmax_cross_entropy(x[rows], y[rows])
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("c", [1, 7, 8, 9, 10, 16, 17, 24, 31, 32, 33, 40, 41, 48, 49, 64, 65,
                               70, 256])
def test_xent_float64_paths_agree_at_every_width_and_special_row(c, rng, monkeypatch,
                                                                 every_short_row):
    # the short rows (and with AVX-512 the exp pass, 32 classes per call and a masked
    # tail); rows with NaN, +-inf, huge spreads (exp underflow to 0) and a lone class must
    # match the portable path, and the sum must never see the masked-off lanes
    x = 4 * rng.standard_normal((8, c))
    x[1, 0] = np.nan
    x[2, -1] = np.inf
    x[3, :] = -np.inf
    x[4, 0] = 800.0  # everything else underflows
    y = rng.integers(0, c, 8)
    res = {}
    monkeypatch.setattr(nn, "VEC_BLOCKS", False)  # blocks of rows: their own test below
    for flag in (True, False):
        monkeypatch.setattr(nn, "VEC_F64", flag and _avx512.AVAILABLE)
        monkeypatch.setattr(nn, "VEC_SHORT", flag)
        res[flag] = (nn.softmax_cross_entropy(x, y, reduction="sum", out=np.empty_like(x)),
                     nn.softmax_cross_entropy(x[5:], y[5:]))
    for (lv, gv), (lp, gp) in zip(res[True], res[False]):
        np.testing.assert_allclose(lv, lp, rtol=1e-14, equal_nan=True)
        # the label's entry is p - 1: where p is near 1 its absolute error is a few ulp
        # of 1 (the vector paths shift by the max, the portable one by the first logit)
        np.testing.assert_allclose(gv, gp, rtol=1e-13, atol=1e-15, equal_nan=True)
    assert math.isnan(res[True][0][0]) and np.isfinite(res[True][1][0])
    monkeypatch.setattr(nn, "VEC_SHORT", True)
    _assert_loss_alone_matches(x, y, res[True], rtol=1e-14)


@pytest.mark.parametrize("dt, vectors", [(np.float32, 17 / 16), (np.float32, 4),
                                         (np.float32, 100 / 16), (np.float32, 8),
                                         (np.float64, 9 / 8), (np.float64, 6)])
def test_xent_rows_held_in_registers_give_the_same_bits_in_pairs(dt, vectors, rng,
                                                                  monkeypatch):
    # _softmax_xent_short takes two rows per call, side by side (nn.SHORT_PAIRS): each
    # row must come out as it does alone, bit for bit, in every chunk (odd row counts:
    # a chunk's last row goes alone) and for the special rows, into an out= that is
    # streamed (whole vectors) or not, and without a gradient; nothing is written past
    # the output. Rows of 17 / 64 / 100 / 128 float32 and 9 / 48 float64 classes with
    # AVX-512, half that at 256 bits (where softmax otherwise keeps them in the row
    # loops: SHORT_MAX_VECTORS)
    c = math.ceil(vectors * nn._lanes(dt))
    monkeypatch.setitem(nn.SHORT_MAX_VECTORS, "softmax", dict.fromkeys(
        nn.SHORT_MAX_VECTORS["softmax"], 8))
    seen = []
    kernel = nn._softmax_xent_short
    monkeypatch.setattr(nn, "_softmax_xent_short", lambda *a: (seen.append(a[-2]), kernel(*a))[1])
    monkeypatch.setattr(nn, "VEC_BLOCKS", False)  # (the fewest classes: not in blocks)
    monkeypatch.setattr(nn, "NT_MIN_BYTES", 0)  # streamed at this size too
    monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
    n = 4099
    x = (3 * rng.standard_normal((n, c))).astype(dt)
    x[5, 1] = np.nan
    x[6, -1] = np.inf
    x[7, :] = -np.inf
    x[8, 0] = 800.0
    y = rng.integers(0, c, n)
    res = {}
    for pairs in (True, False):
        monkeypatch.setattr(nn, "SHORT_PAIRS", pairs)
        out = empty_aligned((n + 1, c), dt)  # a row past the output, to see it unwritten
        out[n] = 7.0
        loss, g = nn.softmax_cross_entropy(x, y, out=out[:n])
        assert (out[n] == 7.0).all() and np.isnan(loss)
        # (the losses of the rows after the special ones, a NaN row's being NaN)
        res[pairs] = (g.copy(), nn.softmax_cross_entropy(x[9:], y[9:])[0],
                      nn.softmax_cross_entropy(x[10:], y[10:], grad=False)[0],
                      nn.softmax_cross_entropy(x[1:], y[1:], reduction="sum")[1])
    assert np.isfinite(res[True][1]) and np.isfinite(res[True][2])
    assert seen == [True] * 4 + [False] * 4  # (the rows held in registers: these)
    for a, b in zip(res[True], res[False]):
        np.testing.assert_array_equal(a, b)
    want = nn.softmax_cross_entropy(x[9:].astype(np.float64), y[9:])[1] * ((n - 9) / n)
    np.testing.assert_allclose(res[True][0][9:], want, rtol=2e-5 if dt == np.float32 else 1e-12,
                               atol=1e-9 if dt == np.float32 else 1e-16)


@pytest.mark.parametrize("dt, c", [(np.float64, 3), (np.float64, 8), (np.float64, 13),
                                   (np.float64, 64), (np.float64, 264), (np.float64, 1000),
                                   (np.float64, 1001), (np.float32, 16), (np.float32, 21),
                                   (np.float32, 272), (np.float32, 1024), (np.float32, 1040),
                                   (np.float32, 1000)])
def test_xent_streamed_rows_match_plain_stores_bit_for_bit(dt, c, rng, monkeypatch):
    # large aligned gradients: exps into a scratch row, scaled on their way out
    # (the next row prefetched meanwhile on some hosts; rows that are not whole lines,
    # float32 1000 classes, store the lines they share with their neighbours plainly).
    # The values must be the plain stores' exactly, special rows included, and nothing
    # written past the output; an unaligned output, rows under a line (float64 3) or
    # rows past 4 KiB (1040) take the plain stores (float64 too where there is no
    # AVX-512 exp pass: 1000 classes then).
    # Every row size the kernels can stream is streamed here (the host's window of row
    # sizes: the next test).
    x = (4 * rng.standard_normal((37, c))).astype(dt)
    x[1, 0] = np.nan
    x[2, -1] = np.inf
    x[3, :] = -np.inf
    x[4, 0] = 80.0  # everything else underflows in float32 (and 800 in float64)
    x[5, 0] = 800.0 if dt == np.float64 else 80.0
    y = rng.integers(0, c, 37)
    monkeypatch.setattr(nn, "VEC_BLOCKS", False)
    monkeypatch.setattr(nn, "VEC_SHORT", False)
    monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
    monkeypatch.setattr(nn, "NT_MIN_BYTES", 0)  # (the row loops' hint: large inputs)
    monkeypatch.setattr(nn, "SOFTMAX_STREAM_ROWS", ((64, 4096), (64, 1 << 62)))
    name = "_softmax_xent_f64_vec" if dt == np.float64 and nn.VEC_F64 else "_softmax_xent"
    seen = []
    kernel = getattr(nn, name)
    at = -2 if name == "_softmax_xent" else -1  # its nt flag (then the hint's distance)
    monkeypatch.setattr(nn, name, lambda *a: (seen.append(a[at]), kernel(*a))[1])
    res = {}
    for stream in (True, False):
        monkeypatch.setattr(nn, "SOFTMAX_STREAM", stream)
        padded = empty_aligned((x.size + 16,), dt)
        padded[x.size:] = 7.0
        aligned = padded[:x.size].reshape(x.shape)
        off = np.empty(x.size + 1, dt)[1:].reshape(x.shape)  # off a line
        res[stream] = [nn.softmax_cross_entropy(x, y, out=o, reduction="sum")
                       for o in (aligned, off)]
        assert (padded[x.size:] == 7.0).all()
    capped = name == "_softmax_xent" and c * x.itemsize > 4096
    assert seen == [c * x.itemsize >= 64 and not capped, False, False, False]
    seen.clear()  # a fresh gradient (no out=) is written with plain stores
    monkeypatch.setattr(nn, "SOFTMAX_STREAM", True)
    nn.softmax_cross_entropy(x, y)
    assert seen == [False]
    for (lv, gv), (lp, gp) in zip(res[True], res[False]):
        assert np.array_equal(lv, lp, equal_nan=True)
        assert np.array_equal(gv, gp, equal_nan=True)
    finite = np.isfinite(x).all(axis=1)
    _, ref = ref_xent(x[finite], y[finite])  # the mean's gradient: times the rows
    tol = 1e-12 if dt == np.float64 else 1e-5
    np.testing.assert_allclose(res[True][0][1][finite], ref * finite.sum(), rtol=tol,
                               atol=tol * 1e-3)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_xent_streams_rows_in_the_hosts_window_of_sizes(dt, rng, monkeypatch):
    # which long rows are streamed: those from the window's smallest to its largest
    # size (nn.SOFTMAX_STREAM_ROWS, by host; a window set here), for the portable kernel
    # and the float64 AVX-512 one (where the CPU has it), the values those of the plain
    # stores
    vec64 = dt == np.float64 and nn.VEC_F64
    monkeypatch.setattr(nn, "VEC_BLOCKS", False)
    monkeypatch.setattr(nn, "VEC_SHORT", False)
    monkeypatch.setattr(nn, "SOFTMAX_STREAM_ROWS", ((1024, 2048), (2048, 4096)))
    monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
    name = "_softmax_xent_f64_vec" if vec64 else "_softmax_xent"
    seen = []
    kernel = getattr(nn, name)
    at = -2 if name == "_softmax_xent" else -1  # its nt flag (then the hint's distance)
    monkeypatch.setattr(nn, name, lambda *a: (seen.append(a[at]), kernel(*a))[1])
    lo, hi = nn.SOFTMAX_STREAM_ROWS[vec64]
    item = np.dtype(dt).itemsize
    for row_bytes in (lo - 64, lo, hi, hi + 64):
        c = row_bytes // item
        x = rng.standard_normal((9, c)).astype(dt)
        y = rng.integers(0, c, 9)
        g = empty_aligned(x.shape, dt)
        monkeypatch.setattr(nn, "SOFTMAX_STREAM", False)
        _, want = nn.softmax_cross_entropy(x, y, out=empty_aligned(x.shape, dt))
        seen.clear()
        monkeypatch.setattr(nn, "SOFTMAX_STREAM", True)
        nn.softmax_cross_entropy(x, y, out=g)
        assert seen == [lo <= row_bytes <= hi], row_bytes
        assert np.array_equal(g, want)


def _assert_loss_alone_matches(x, y, with_grad, rtol):
    # grad=False (the loss alone) runs the same row kernel without its stores: the same
    # losses ((sum over all rows, NaN), mean over rows 5:), the input left as it was
    before = x.copy()
    alone = (nn.softmax_cross_entropy(x, y, grad=False, reduction="sum"),
             nn.softmax_cross_entropy(x[5:], y[5:], grad=False))
    assert np.array_equal(x, before, equal_nan=True)
    for (la, none), (lg, _) in zip(alone, with_grad):
        assert none is None
        np.testing.assert_allclose(la, lg, rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("c", [1, 5, 10, 15, 16, 17, 31, 32, 33, 40, 48, 63, 64, 65, 80, 96, 97,
                               100, 128, 129])
def test_xent_float32_short_rows_match_the_long_row_kernel(c, rng, monkeypatch,
                                                           every_short_row):
    # rows of up to 8 vectors (128 float32 classes; not 5) are held in registers: full
    # vectors with plain loads and stores, the partial one masked, the ones past the row
    # not touched; an exp as close as the long-row kernel's, so only ulps of it and the
    # order of the sum
    # differs. Special rows stay in their row.
    x = (4 * rng.standard_normal((9, c))).astype(np.float32)
    x[1, 0] = np.nan
    x[2, -1] = np.inf
    x[3, :] = -np.inf
    x[4, 0] = 80.0  # the rest lands near float32's smallest normal, not flushed
    y = rng.integers(0, c, 9)
    y[6] = c - 1  # the label in the last lane
    res = {}
    monkeypatch.setattr(nn, "VEC_BLOCKS", False)  # blocks of rows: their own test below
    for flag in (True, False):
        monkeypatch.setattr(nn, "VEC_SHORT", flag)
        out = np.full_like(x, 7.0)
        res[flag] = (nn.softmax_cross_entropy(x, y, reduction="sum", out=out),
                     nn.softmax_cross_entropy(x[5:], y[5:]))
    for (lv, gv), (lp, gp) in zip(res[True], res[False]):
        np.testing.assert_allclose(lv, lp, rtol=2e-6, equal_nan=True)
        np.testing.assert_allclose(gv, gp, rtol=2e-6, atol=1e-12, equal_nan=True)
    assert math.isnan(res[True][0][0]) and np.isfinite(res[True][1][0])
    monkeypatch.setattr(nn, "VEC_SHORT", True)
    _assert_loss_alone_matches(x, y, res[True], rtol=2e-6)
    g = res[True][0][1]
    assert np.isnan(g[[1, 2, 3]]).any(axis=1).all() and not np.isnan(g[[0, 4, 5, 6, 7, 8]]).any()
    rl, rg = ref_xent(x[5:].astype(np.float64), y[5:])
    np.testing.assert_allclose(res[True][1][0], rl, rtol=1e-5)
    np.testing.assert_allclose(res[True][1][1], rg, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_xent_blocks_of_rows_match_the_row_kernel(dt, rng, monkeypatch):
    # rows of few classes go 16 (float32) or 8 (float64) at a time through one block
    # transposed in registers, the rows after the last whole block through the row
    # kernel: every class count the blocks take (and one past), special rows inside a
    # block, labels in the first and last column, nothing written past the output, and
    # the loss without a gradient. 5 blocks: with few classes two per call, so special
    # rows sit in the second block of a call and the first of the next, and the fifth
    # block goes through the row kernel. Every input counts as large here, so the blocks
    # take all the class counts they take from memory (up to 2 L), and the row kernel
    # one past them (L: the host's lanes, 8 / 4 with AVX2, where the blocks take up to
    # 4 L classes)
    monkeypatch.setattr(nn, "NT_MIN_BYTES", 0)
    lanes = nn._lanes(dt)
    n = 5 * lanes + 5
    special = [lanes + 1, lanes + 2, lanes + 3]
    most = max(2 * lanes, nn.BLOCK_MAX_CLASSES[np.dtype(dt).itemsize, lanes])
    assert most <= _avx512.block_max_count(lanes, np.dtype(dt).itemsize)
    # each side of every boundary between the kernels' cases (each count compiles its own
    # kernel): half a vector or less, spread over the lanes (_avx512.spread_columns),
    # whole vectors, two blocks per call or one, and the largest count the blocks take
    pair = _avx512.SOFTMAX_PAIR_MAX_CLASSES[np.dtype(dt).itemsize, lanes]
    half = lanes // 2
    counts = {2, 3, half, half + 1, pair, pair + 1, lanes - 1, lanes, lanes + 1, lanes + 2,
              lanes + half, 2 * lanes - 1, 2 * lanes, 2 * lanes + 1, 3 * lanes - 1,
              3 * lanes, most - 1, most, most + 1}
    for c in sorted(c for c in counts if 2 <= c <= most + 1):
        x = (4 * rng.standard_normal((n, c))).astype(dt)
        x[special[0], 0] = np.nan
        x[special[1], -1] = np.inf
        x[special[2], :] = -np.inf
        x[2 * lanes, 0] = 80.0  # the rest of its row underflows
        y = rng.integers(0, c, n)
        y[:2] = [c - 1, 0]
        finite = np.delete(np.arange(n), special)
        res = {}
        for flag in (True, False):
            monkeypatch.setattr(nn, "VEC_BLOCKS", flag)
            big = np.full(n * c + 64, 7.0, dt)
            out = big[:n * c].reshape(n, c)
            res[flag] = (nn.softmax_cross_entropy(x, y, reduction="sum", out=out),
                         nn.softmax_cross_entropy(x[finite], y[finite], grad_scale=0.5))
            assert (big[n * c:] == 7.0).all(), c
        rtol = 2e-6 if dt == np.float32 else 1e-13
        for (lb, gb), (lr, gr) in zip(res[True], res[False]):
            np.testing.assert_allclose(lb, lr, rtol=rtol, equal_nan=True, err_msg=f"c={c}")
            # absolute: the label's entry cancels (e/s - 1), and the sums' order differs
            np.testing.assert_allclose(gb, gr, rtol=rtol, atol=rtol * np.nanmax(np.abs(gr)),
                                       equal_nan=True, err_msg=f"c={c}")
        g = res[True][0][1]
        assert math.isnan(res[True][0][0]) and np.isnan(g[special]).any(axis=1).all()
        # the loss alone (nothing stored) is the same loss
        monkeypatch.setattr(nn, "VEC_BLOCKS", True)
        xf = x[finite]
        before = xf.copy()
        loss, none = nn.softmax_cross_entropy(xf, y[finite], grad=False)
        assert none is None and np.array_equal(xf, before)
        np.testing.assert_allclose(loss, res[True][1][0], rtol=rtol, err_msg=f"c={c}")
        assert not np.isnan(g[finite]).any()
        rl, rg = ref_xent(x[finite].astype(np.float64), y[finite])
        np.testing.assert_allclose(res[True][1][0], rl, rtol=1e-5)
        np.testing.assert_allclose(res[True][1][1], rg * len(finite) * 0.5, rtol=1e-4, atol=1e-7)



@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_block_columns_hold_each_row_once_and_each_lane_once(lanes):
    # the blocks' columns (kernels._avx512.row_lane_classes): column j takes one element
    # of every row, each from a different lane of the row layout (so blends and one
    # permute gather it), and across the c columns every element of every row once
    for c in range(1, 4 * lanes + 1):
        cols = _avx512.row_lane_classes(c, lanes)
        assert len(cols) == c
        for j, col in enumerate(cols):
            assert len(col) == lanes and all(0 <= t < c for t in col), (c, j)
            assert len({(r * c + t) % lanes for r, t in enumerate(col)}) == lanes, (c, j)
        for r in range(lanes):
            assert sorted(col[r] for col in cols) == list(range(c)), (c, r)
    assert _avx512.spread_columns(10, 16) and not _avx512.spread_columns(8, 16)
    assert not _avx512.spread_columns(16, 16) and _avx512.spread_columns(5, 8)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_xent_blocks_and_rows_with_non_temporal_stores_match(dt, rng, monkeypatch,
                                                             every_short_row):
    # large aligned gradients leave the blocks, and the short rows that are whole
    # vectors, with non-temporal stores (forced on here for small ones): the same values
    # as plain stores, and nothing written past the output
    import kernels

    lanes = nn._lanes(dt)
    for c in (10, lanes, 2 * lanes, 4 * lanes, 8 * lanes):
        x = (3 * rng.standard_normal((101, c))).astype(dt)
        y = rng.integers(0, c, 101)
        monkeypatch.setattr(_simd, "NT_MIN_BYTES", 1 << 62)
        want_loss, want = nn.softmax_cross_entropy(x, y, out=kernels.empty_aligned(x.shape, dt))
        monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
        big = kernels.empty_aligned((x.size + 64,), dt)
        big[:] = 7.0
        out = big[:x.size].reshape(x.shape)
        loss, got = nn.softmax_cross_entropy(x, y, out=out)
        assert got is out and loss == want_loss, c
        np.testing.assert_array_equal(got, want, err_msg=f"c={c}")
        assert (big[x.size:] == 7.0).all()

def test_xent_short_rows_write_nothing_past_the_output(every_short_row):
    # the row kernel stores whole vectors where a row has them and masks the rest: the
    # memory right after the last row of ``out`` keeps its contents
    for dt, c in ((np.float32, 10), (np.float64, 10), (np.float32, 33), (np.float64, 17),
                  (np.float32, 100), (np.float64, 50)):
        x = np.arange(4 * c, dtype=dt).reshape(4, c) / 7
        y = np.array([0, c - 1, 3, 1])
        big = np.full(4 * c + 64, -5.0, dt)
        view = big[:4 * c].reshape(4, c)
        _, g = nn.softmax_cross_entropy(x, y, out=view)
        assert g is view and (big[4 * c:] == -5.0).all()
        np.testing.assert_allclose(g, ref_xent(x.astype(np.float64), y)[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n", [0, 1, 7, 31, 32, 33, 1000, 100003])
def test_log_sum_of_row_sums_equals_numpys_sum_of_logs(n, rng):
    # the blocks' and short rows' loss takes one log over all the row sums (or block
    # products, up to c^L <= 2^77), rescaling its running products by exact powers of 2
    p = np.exp(rng.random(n) * 77 * np.log(2))
    p[:n // 3] = 2.0 ** 77  # the largest a block product can be: 32 products overflow
    want = float(np.log(p).sum())
    assert nn._log_sum(p) == pytest.approx(want, rel=1e-13, abs=1e-12)
    if n >= 33:
        for bad, expect in ((np.nan, np.isnan), (0.0, lambda v: v == -np.inf),
                            (np.inf, lambda v: v == np.inf)):
            q = p.copy()
            q[n // 2] = bad
            assert expect(nn._log_sum(q)), bad


def test_xent_refuses_bad_labels_and_dtypes():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(KernelInputError, match=r"labels must be in \[0, 3\)"):
        nn.softmax_cross_entropy(x, np.array([0, 3]))
    for bad in (np.array([-1, 0]), np.array([0, np.iinfo(np.int64).min]),
                np.array([2**63 + 5, 0], np.uint64)):  # wraps to a negative int64
        with pytest.raises(KernelInputError, match=r"labels must be in \[0, 3\), got values in"):
            nn.softmax_cross_entropy(x, bad)
    with pytest.raises(KernelDtypeError, match="labels must be an integer"):
        nn.softmax_cross_entropy(x, np.array([0.0, 1.0]))
    with pytest.raises(KernelDtypeError, match="logits has dtype int64"):
        nn.softmax_cross_entropy(np.zeros((2, 3), np.int64), np.array([0, 1]))


# -- layer norm -------------------------------------------------------------------------

def test_layer_norm_forward(dtype, tol, rng):
    x = (3 + 2 * rng.standard_normal((33, 24))).astype(dtype)
    g, b = rng.standard_normal(24).astype(dtype), rng.standard_normal(24).astype(dtype)
    y, mu, _ = nn.layer_norm(x, g, b)
    np.testing.assert_allclose(y, ref_layer_norm(x, g, b), rtol=tol["rtol"] * 5, atol=tol["atol"] * 5)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(axis=1), **tol)


@pytest.mark.parametrize("d", [3, 10, 20, 300])
def test_layer_norm_float32_statistics_as_close_as_float64_sums(d, rng):
    # with a large offset (1000 +- 0.01) the mean is within an ulp and rstd is not
    # biased by the rounding of the float32 mean the deviations are taken from: rows of
    # few features go through blocks (ln_block) whose sums run in float32, the mean
    # corrected by the mean of x - mean (before, float64 sums without that correction
    # put rstd 1e-5 to 4e-5 off here); long rows (300) sum in float64 from x[0]. (Rows
    # held in registers, 27-128 features, still take their deviations from the rounded
    # mean: 1e-5 off here, far below the inputs' own float32 resolution at this offset,
    # 6e-5 of 1000 against a spread of 0.01.) 4096 rows: whole blocks
    x = (1000 + 0.01 * rng.standard_normal((4096, d))).astype(np.float32)
    y, mu, rstd = nn.layer_norm(x, np.ones(d, np.float32), np.zeros(d, np.float32))
    x64 = x.astype(np.float64)
    m, v = x64.mean(axis=1), x64.var(axis=1)
    assert np.abs(mu - m).max() <= np.spacing(np.float32(1000))
    np.testing.assert_allclose(rstd, 1 / np.sqrt(v + 1e-5), rtol=1e-6)
    xs = x[:, ::-1].copy()  # the same rows, features in another order: the same mean
    np.testing.assert_allclose(nn.layer_norm(xs, np.ones(d, np.float32),
                                             np.zeros(d, np.float32))[1], mu, rtol=0,
                               atol=np.spacing(np.float32(1000)))


def test_layer_norm_backward_matches_finite_differences(rng):
    x, dy = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    g, b = rng.standard_normal(6), rng.standard_normal(6)

    def f(x_, g_, b_):
        return float((nn.layer_norm(x_, g_, b_)[0] * dy).sum())

    _, mu, rstd = nn.layer_norm(x, g, b)
    dx, dg, db = nn.layer_norm_backward(dy, x, g, mu, rstd)
    for arr, grad in ((x, dx), (g, dg), (b, db)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + 1e-6
            up = f(x, g, b)
            arr[idx] = old - 1e-6
            down = f(x, g, b)
            arr[idx] = old
            num[idx] = (up - down) / 2e-6
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("d", [40, 300])
def test_layer_norm_backward_float32_agrees_with_float64(d, rng):
    # 40 features: rows in registers; 300: the row kernel, whose float32 dgamma/dbeta
    # shares move into float64 every LN_BWD_ROW_PARTIAL rows (300 rows: chunks of 150)
    x, dy = rng.standard_normal((300, d)), rng.standard_normal((300, d))
    g, b = rng.standard_normal(d), rng.standard_normal(d)
    outs = []
    for dt in (np.float32, np.float64):
        args = [a.astype(dt) for a in (x, g, b)]
        _, mu, rstd = nn.layer_norm(*args)
        outs.append(nn.layer_norm_backward(dy.astype(dt), args[0], args[1], mu, rstd))
    for a32, a64 in zip(*outs):
        assert a32.dtype == np.float32
        np.testing.assert_allclose(a32, a64, rtol=1e-4, atol=1e-4)


def test_layer_norm_nan_row_stays_in_its_row_and_empty_works():
    x = np.array([[1.0, np.nan, 3.0], [1.0, 2.0, 3.0]])
    y, _, _ = nn.layer_norm(x, np.ones(3), np.zeros(3))
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()
    y, mu, _ = nn.layer_norm(np.zeros((0, 3)), np.ones(3), np.zeros(3))
    assert y.shape == (0, 3) and mu.shape == (0,)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_few_wide_rows_split_over_threads_give_the_same_bits(dt, rng, monkeypatch):
    # rows that need no per-chunk sums are chunked by elements (kernels._chunks.
    # row_chunks): 4 rows of 3000 now run as 4 chunks, not one; each row's result must
    # not depend on which chunk or thread computed it (12 rows: layer norm keeps calls
    # under LN_FWD_ONE_CHUNK_ELEMENTS in one chunk)
    from kernels import _chunks

    assert _chunks.row_chunks(4, 3000) == min(4, 4 * _chunks.num_threads())
    assert _chunks.row_chunks(16, 256) == 1 and _chunks.row_chunks(0, 256) == 1
    assert 12 * 3000 >= nn.LN_FWD_ONE_CHUNK_ELEMENTS
    x = rng.standard_normal((12, 3000)).astype(dt)
    lab = rng.integers(0, 3000, 12)
    g, b = rng.standard_normal(3000).astype(dt), rng.standard_normal(3000).astype(dt)
    runs = []
    monkeypatch.setattr(_jit, "SERIAL_TWINS", False)  # one chunk of the parallel kernels too
    # as shipped, then one chunk (bias + ReLU: its own floor, activations._light_chunks)
    assert activations._light_chunks(12, 3000) > 1
    for elements, light in ((_chunks.ROW_CHUNK_ELEMENTS, activations.LIGHT_PARALLEL_MIN),
                            (1 << 30, 1 << 30)):
        monkeypatch.setattr(_chunks, "ROW_CHUNK_ELEMENTS", elements)
        monkeypatch.setattr(activations, "LIGHT_PARALLEL_MIN", light)
        loss, grad = nn.softmax_cross_entropy(x, lab)
        y, mu, rs = nn.layer_norm(x, g, b)
        runs.append((loss, grad, y, mu, rs, nn.bias_act(x, b, "relu")))
    for got, want in zip(*runs):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("n, d", [(0, 3), (4, 0), (1, 5), (9, 10), (3, 256), (16, 100),
                                  (17, 100), (2, 1100)])
def test_layer_norm_backward_sums_have_the_input_dtype_at_every_size(n, d, dt, rng):
    # the sums of a single chunk of rows are taken as they are (no reduction over
    # chunks), and no rows or no features give zeros: each case in the input's dtype.
    # float32 rows of 17-1023 features in calls of 16 rows or fewer once gave dgamma,
    # dbeta of 0 (the float32 shares were never moved into the sums)
    x = rng.standard_normal((n, d)).astype(dt)
    dy = rng.standard_normal((n, d)).astype(dt)
    g = rng.standard_normal(d).astype(dt)
    _, mu, rs = nn.layer_norm(x, g, g)
    dx, dg, db = nn.layer_norm_backward(dy, x, g, mu, rs)
    assert dx.shape == (n, d) and dg.shape == db.shape == (d,)
    assert dx.dtype == dg.dtype == db.dtype == dt
    mu_ref = x.mean(axis=1, keepdims=True) if d else np.zeros((n, 1), dt)
    xhat = (x - mu_ref) / np.sqrt(((x - mu_ref) ** 2).sum(axis=1, keepdims=True) / max(d, 1)
                                  + 1e-5)
    tol = 1e-4 if dt == np.float32 else 1e-10
    np.testing.assert_allclose(dg, (dy * xhat).sum(axis=0), rtol=tol, atol=tol)
    np.testing.assert_allclose(db, dy.sum(axis=0), rtol=tol, atol=tol)


def test_layer_norm_backward_short_float32_rows_shares_in_float32_or_widened(rng, monkeypatch):
    # float32 rows held in registers (ln_bwd_row) add their dgamma/dbeta shares in
    # float32, moved into the float64 sums every LN_BWD_SHORT_PARTIAL rows and at each
    # chunk's end; 0 widens every vector's shares into the float64 sums instead. dx is
    # the same bit for bit, the sums agree to float32 rounding (301 rows: 4 chunks)
    for d in (16, 40, 64, 100, 128):
        x = (1 + 2 * rng.standard_normal((301, d))).astype(np.float32)
        dy = rng.standard_normal((301, d)).astype(np.float32)
        g = rng.standard_normal(d).astype(np.float32)
        _, mu, rs = nn.layer_norm(x, g, g)
        res = {}
        for every in (16, 3, 0):
            monkeypatch.setattr(nn, "LN_BWD_SHORT_PARTIAL", every)
            res[every] = nn.layer_norm_backward(dy, x, g, mu, rs)
        for every in (16, 3):
            np.testing.assert_array_equal(res[every][0], res[0][0], err_msg=f"dx, d={d}")
            for k in (1, 2):
                np.testing.assert_allclose(res[every][k], res[0][k], rtol=1e-6,
                                           atol=1e-6 * np.abs(res[0][k]).max(),
                                           err_msg=f"sums, d={d}, every {every}")
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        xhat = (x64 - mu[:, None]) * rs[:, None]
        np.testing.assert_allclose(res[16][1], (dy64 * xhat).sum(axis=0), rtol=1e-5,
                                   atol=1e-5 * np.abs(dy64 * xhat).sum(axis=0).max())
        np.testing.assert_allclose(res[16][2], dy64.sum(axis=0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(37, 64), (5, 8), (9, 200)])
def test_layer_norm_float64_non_temporal_rows_match(shape, rng, monkeypatch):
    # rows built in a scratch row and streamed out with non-temporal stores (float64,
    # every row 64-byte aligned: d = 8, 64, 200 here; forced on for these small arrays)
    import kernels

    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    g, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    y0, mean, rstd = nn.layer_norm(x, g, b)
    dx0, dg0, db0 = nn.layer_norm_backward(dy, x, g, mean, rstd)
    monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
    for out in (None, kernels.empty_aligned(shape), np.empty(shape)):  # last: maybe not aligned
        y1, _, _ = nn.layer_norm(x, g, b, out=out)
        dx1, dg1, db1 = nn.layer_norm_backward(dy, x, g, mean, rstd, out=out if out is None
                                               else np.empty_like(y1))
        np.testing.assert_allclose(y1, y0, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(dx1, dx0, rtol=1e-14, atol=1e-15)
        np.testing.assert_array_equal(dg1, dg0)
        np.testing.assert_array_equal(db1, db0)
    np.testing.assert_allclose(y0, ref_layer_norm(x, g, b), rtol=1e-11, atol=1e-12)
    assert kernels.empty_aligned(shape).ctypes.data % 64 == 0
    for off in range(0, 64, 8):  # like=: the same offset within a cache line as the model
        model = np.empty(x.size + 8)[off // 8:][: x.size]
        got = kernels.empty_aligned(shape, np.float32, like=model)
        assert got.ctypes.data % 64 == model.ctypes.data % 64 and got.shape == shape
        assert got.flags.c_contiguous and got.flags.writeable and got.dtype == np.float32
    # apart_from=: a large output starts half a page past the input modulo 4 KiB (at the
    # input's offset in a line with like=, else on a line); a small one ignores it
    src = np.empty(_checks.APART_MIN_BYTES // 4 + 8, np.float32)[3:]
    for like in (None, src):
        got = kernels.empty_aligned((src.size,), np.float32, like=like, apart_from=src)
        assert 2048 <= (got.ctypes.data - src.ctypes.data) % 4096 < 2048 + 64
        assert got.ctypes.data % 64 == (0 if like is None else src.ctypes.data % 64)
        assert got.shape == src.shape and got.flags.c_contiguous and got.flags.writeable
    small = kernels.empty_aligned((16,), np.float32, apart_from=src)
    assert small.ctypes.data % 64 == 0 and small.shape == (16,)
    big = np.ones((_checks.APART_MIN_BYTES // 1024, 256), np.float32)  # a fresh output:
    assert 2048 <= (nn.layer_norm(big, big[0], big[0])[0].ctypes.data  # half a page off
                    - big.ctypes.data) % 4096 < 2112
    strided = np.empty((6, 10))[1:, ::3]  # data_address: the first element, also of a view
    assert _checks.data_address(strided) == strided.ctypes.data


def test_small_new_outputs_are_placed_only_where_a_kernel_could_stream_them(rng, monkeypatch):
    # a kernel's own output under ALIGN_MIN_BYTES is a plain np.empty (placing it cost more
    # than it saved); where NT_MIN_BYTES is lowered, as the streamed-path tests do, every
    # new output is placed again, so those tests still reach the streamed code
    x = rng.standard_normal((8, 256)).astype(np.float32)
    g = np.ones(256, np.float32)
    want = nn.layer_norm(x, g, g)[0]
    plain = [nn.layer_norm(x, g, g)[0] for _ in range(16)] + [activations.gelu(x)]
    assert all(a.base is None for a in plain)  # np.empty's own (a placed one is a view)
    monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
    placed = [nn.layer_norm(x, g, g)[0] for _ in range(16)]
    placed += [activations.gelu(x), nn.layer_norm_backward(x, x, g, g[:8], g[:8])[0]]
    assert all(a.base is not None for a in placed)
    assert all(a.ctypes.data % 64 == 0 for a in placed[:16] + placed[17:])
    assert placed[16].ctypes.data % 64 == x.ctypes.data % 64  # GELU's: like=x
    for a in plain[:16] + placed[:16]:
        np.testing.assert_array_equal(a, want)
    assert _checks._streamed_from() == 0


def test_gelu_writes_plainly_into_an_out_just_ahead_of_its_input(rng, monkeypatch):
    # NT_AHEAD_SLOW_BYTES (the Zen 2 host's): an output 1-127 bytes ahead of the input
    # modulo 4 KiB is not streamed; the results are the same either way
    monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
    x = rng.standard_normal(3000)
    want = activations.gelu(x)
    for slow in (128, 0):
        monkeypatch.setattr(_simd, "NT_AHEAD_SLOW_BYTES", slow)
        for rel in (0, 16, 48, 120, 128, 2048, 4088):
            out = _checks.empty_placed(x, rel, 4096)
            streamed = _simd.NT_STORES and not (slow and 0 < rel < slow)
            assert _simd.stream_out(out, src=x) == streamed, (slow, rel)
            assert _simd.stream_out(out) == _simd.NT_STORES  # no input named: not checked
            np.testing.assert_array_equal(activations.gelu(x, out=out), want)


def _ln_both(x, g, b, dy, out=None, dout=None):
    y, mu, rstd = nn.layer_norm(x, g, b, out=out)
    return (y.copy(), mu, rstd) + nn.layer_norm_backward(dy, x, g, mu, rstd, out=dout)


def _ln_widths(dt) -> list[int]:
    """Each side of every boundary between the layer norm kernels' cases at the host's
    width: 1-3 features, half a vector, 1, 2, 4 and 8 vectors (the short-row kernels),
    and the largest rows the forward and backward blocks take."""
    lanes = nn._lanes(dt)
    key = np.dtype(dt).itemsize, lanes
    edges = {1, 2, 3, lanes // 2, lanes, 2 * lanes, 4 * lanes, 8 * lanes,
             nn.LN_BLOCK_MAX_FEATURES[key], nn.LN_BWD_BLOCK_MAX_FEATURES[key]}
    return sorted({w + k for w in edges for k in (-1, 0, 1) if 1 <= w + k <= 8 * lanes + 1})


@pytest.mark.parametrize("dt, rtol", [(np.float32, 2e-5), (np.float64, 1e-12)])
def test_layer_norm_short_rows_match_the_long_row_kernel(dt, rtol, rng, monkeypatch,
                                                         every_short_row):
    # rows of up to 8 vectors are held in registers (kernels._avx512.ln_row and
    # ln_bwd_row): whole, partial and absent vectors, partial ones loaded and stored
    # whole inside a chunk and masked at its end (301 rows: 4 chunks of 75-76); rows of
    # few features also go L at a time through blocks transposed in registers (ln_block,
    # ln_bwd_block; L = 16 / 8 lanes with AVX-512, 8 / 4 with AVX2; 301 rows: the last
    # 13 / 5 or 5 / 1 through the row kernels). The widths: each side of every boundary
    # between the kernels' cases at the host's width (each width compiles its own block
    # kernels; an AVX-512 host runs the 256-bit ones again in
    # test_row_and_block_kernels_at_256_bits_where_the_cpu_has_avx512)
    for d in _ln_widths(dt):
        x = (2 + 3 * rng.standard_normal((301, d))).astype(dt)
        dy = rng.standard_normal((301, d)).astype(dt)
        g, b = rng.standard_normal(d).astype(dt), rng.standard_normal(d).astype(dt)
        res = {}
        for short, blocks in ((False, False), (True, False), (True, True)):
            monkeypatch.setattr(nn, "VEC_SHORT", short)
            monkeypatch.setattr(nn, "VEC_BLOCKS", blocks)
            res[short, blocks] = _ln_both(x, g, b, dy)
        long_res = res[False, False]
        # dx's size: that of its terms (at d = 1 the long kernel's dx is rounding noise)
        dx_scale = np.abs(dy * g * long_res[2][:, None].astype(np.float64)).max()
        for way in ((True, False), (True, True)):
            for name, got, want in zip(("y", "mean", "rstd", "dx", "dgamma", "dbeta"),
                                       res[way], long_res):
                assert got.dtype == dt, name
                scale = dx_scale if name == "dx" else np.abs(want.astype(np.float64)).max()
                np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale,
                                           err_msg=f"{name}, d={d}, short/blocks={way}")
        np.testing.assert_allclose(res[True, True][0], ref_layer_norm(x, g, b),
                                   rtol=100 * rtol, atol=100 * rtol)


_LN_TWINS = ("_ln_fwd_1", "_ln_fwd_one_pass_1", "_ln_fwd_rows4_1", "_ln_fwd_short_1",
             "_ln_fwd_blocks_1", "_ln_bwd_1", "_ln_bwd_wide_1", "_ln_bwd_short_1",
             "_ln_bwd_blocks_1")


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_layer_norm_calls_of_one_chunk_run_serial_twins(rng, monkeypatch, dt):
    # a call too small to split over threads (fewer than 2 x 4096 elements forward, 128
    # rows backward) runs the kernels' serial twins (kernels._jit.serial_twin: no parallel
    # launch), on every path: blocks of rows (3 features), short rows in registers, four
    # rows at a time (float32, 20), the row loops (256) and wide rows (1500, 3000). The
    # same code compiled apart: LLVM may order a fast-math sum differently there (as it
    # may between a fresh compile and the cached copy of one kernel), so the outputs
    # agree to a few ulps of their scale, not always bit for bit
    for name in _LN_TWINS:  # the same code, compiled apart and cached in files of its own
        twin, kernel = getattr(nn, name), getattr(nn, name[:-2])
        assert twin.py_func.__code__ is kernel.py_func.__code__
        assert kernel.targetoptions["parallel"] and not twin.targetoptions["parallel"]
        assert twin._cache._cache_file._index_name != kernel._cache._cache_file._index_name
    calls: list[str] = []

    def counted(name):
        kernel = getattr(nn, name)

        def call(*args):
            calls.append(name)
            return kernel(*args)
        return call

    for name in _LN_TWINS:
        monkeypatch.setattr(nn, name, counted(name))
    ulps = 8 * np.finfo(dt).eps
    for n, d in ((37, 3), (21, 20), (30, 40), (20, 256), (5, 1500), (2, 3000)):
        x = (1 + 2 * rng.standard_normal((n, d))).astype(dt)
        dy = rng.standard_normal((n, d)).astype(dt)
        g, b = rng.standard_normal(d).astype(dt), rng.standard_normal(d).astype(dt)
        y, mean, rstd = nn.layer_norm(x, g, b)
        res = {}
        for twins in (True, False):
            monkeypatch.setattr(_jit, "SERIAL_TWINS", twins)
            del calls[:]
            res[twins] = nn.layer_norm(x, g, b) + nn.layer_norm_backward(dy, x, g, mean, rstd)
            assert bool(calls) == twins, (d, twins, calls)
        dx_scale = np.abs(dy * g * rstd[:, None].astype(np.float64)).max()
        for name, got, want in zip(("y", "mean", "rstd", "dx", "dgamma", "dbeta"),
                                   res[True], res[False]):
            assert got.dtype == dt
            scale = dx_scale if name == "dx" else np.abs(want.astype(np.float64)).max()
            np.testing.assert_allclose(got, want, rtol=ulps, atol=ulps * scale,
                                       err_msg=f"{name}, {n} x {d}")
    # a larger call splits over threads and runs the parallel kernels
    x = rng.standard_normal((256, 256)).astype(dt)
    monkeypatch.setattr(_jit, "SERIAL_TWINS", True)
    del calls[:]
    _ln_both(x, x[0], x[1], x)
    assert calls == []


def test_layer_norm_float32_short_rows_four_at_a_time_match_one_at_a_time(rng, monkeypatch):
    # rows of up to LN_FWD_ROWS4_MAX float32 features without the AVX-512 short-row
    # kernels: four rows per loop (_ln_fwd_rows4), the same operations as the one-pass
    # row kernel, so the same bits; row counts leave 1-3 rows over in every chunk, and
    # NaN / inf / constant rows sit at each position of a group of four
    monkeypatch.setattr(nn, "VEC_SHORT", False)
    four = nn.LN_FWD_ROWS4_MAX
    assert four >= 32
    for d in (1, 3, 10, 32):
        for n in (1, 7, 1003):
            x = (2 + 3 * rng.standard_normal((n, d))).astype(np.float32)
            if n > 8:
                x[4, 0] = np.nan
                x[5, -1] = np.inf
                x[6] = 5.0
                x[7, 0] = -np.inf
            g, b = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(
                np.float32)
            res = {}
            for limit in (four, 0):
                monkeypatch.setattr(nn, "LN_FWD_ROWS4_MAX", limit)
                res[limit] = [a.copy() for a in nn.layer_norm(x, g, b)]
            for got, want in zip(res[four], res[0]):
                np.testing.assert_array_equal(got, want)
            keep = [i for i in range(n) if np.isfinite(x[i]).all()]
            np.testing.assert_allclose(res[four][0][keep], ref_layer_norm(x[keep], g, b),
                                       rtol=1e-4, atol=1e-4)
            if n > 8 and d > 1:
                y = res[four][0]
                assert np.isnan(y[[4, 5, 7]]).all() and (y[6] == b).all()


def test_layer_norm_float32_one_pass_statistics_match_two_passes(rng, monkeypatch):
    # float32 rows past the short-row kernels take their mean and variance from one pass
    # (float64 sums shifted by the row's first element): the same outputs as two passes
    # up to a float32 rounding, also for a large offset against a small spread, an
    # outlier first element, a constant row, and NaN / inf rows (which stay in their row)
    for d in (129, 256, 1000, 4096):
        x = (2 + 3 * rng.standard_normal((40, d))).astype(np.float32)
        x[1] = 1e4 + rng.standard_normal(d)  # mean / std = 1e4
        x[2, 0] = 1e3  # x[0] an outlier: (x0 - mean)^2 close to d var
        x[3] = 5.0  # variance 0
        x[4, 7] = np.nan
        x[5, 3] = np.inf
        x[6] = 1e7 + np.round(3 * rng.standard_normal(d))  # mean^2 / var = 1e13
        g, b = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
        res = {}
        for one in (True, False):
            monkeypatch.setattr(nn, "LN_FWD_ONE_PASS", one)
            res[one] = [a.copy() for a in nn.layer_norm(x, g, b)]
        for got, want, name in zip(res[True], res[False], ("y", "mean", "rstd")):
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.nanmax(np.abs(
                want[np.isfinite(want)])), equal_nan=True, err_msg=f"{name}, d={d}")
        y = res[True][0]
        assert np.isnan(y[4]).all() and np.isnan(y[5]).all()
        assert np.isfinite(np.delete(y, [4, 5], axis=0)).all()
        assert (y[3] == b).all()  # a constant row is beta
        # against float64 (rows 1 and 6 aside: x - mean in float32 there is off by half
        # an ulp of the mean, in either kernel)
        keep = [0, 2, 3, *range(7, 40)]
        np.testing.assert_allclose(y[keep], ref_layer_norm(x[keep], g, b), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("dt, widths", [(np.float32, [1023, 1024, 1500, 4096]),
                                       (np.float64, [511, 512, 700, 2048])])
def test_layer_norm_backward_wide_rows_match_the_row_kernel_and_float64(dt, widths, rng,
                                                                       monkeypatch):
    # rows of 4 KiB or more take their own backward kernel (a read-only first pass;
    # float32 dgamma/dbeta shares summed over 32 rows before float64): the same results
    # as the row kernel up to rounding, close to a float64 reference, in place as well;
    # 150 rows: chunks of 75 rows, so a chunk moves its float32 sums mid-way and ends
    # (two rows per pass at 4096 float32 features) on a row of its own
    for d in widths:
        x = (1 + 2 * rng.standard_normal((150, d))).astype(dt)
        dy = rng.standard_normal((150, d)).astype(dt)
        g = rng.standard_normal(d).astype(dt)
        _, mu, rstd = nn.layer_norm(x, g, g)
        res = {}
        for wide in (True, False):
            monkeypatch.setattr(nn, "LN_BWD_WIDE_BYTES", 4096 if wide else 1 << 62)
            res[wide] = nn.layer_norm_backward(dy, x, g, mu, rstd)
        rtol = 2e-5 if dt == np.float32 else 1e-12
        for got, want, name in zip(res[True], res[False], ("dx", "dgamma", "dbeta")):
            assert got.dtype == dt, name
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(),
                                       err_msg=f"{name}, d={d}")
        # float64 reference from the definition
        x64, dy64, g64 = (a.astype(np.float64) for a in (x, dy, g))
        xh = (x64 - mu.astype(np.float64)[:, None]) * rstd.astype(np.float64)[:, None]
        gy = dy64 * g64
        dx_ref = rstd.astype(np.float64)[:, None] * (
            gy - gy.mean(axis=1, keepdims=True) - xh * (gy * xh).mean(axis=1, keepdims=True))
        ref = (dx_ref, (dy64 * xh).sum(axis=0), dy64.sum(axis=0))
        for got, want, name in zip(res[True], ref, ("dx", "dgamma", "dbeta")):
            np.testing.assert_allclose(got, want, rtol=50 * rtol,
                                       atol=50 * rtol * np.abs(want).max(),
                                       err_msg=f"{name} vs float64, d={d}")
        monkeypatch.setattr(nn, "LN_BWD_WIDE_BYTES", 4096)
        dyc = dy.copy()
        dx_in, dg_in, db_in = nn.layer_norm_backward(dyc, x, g, mu, rstd, out=dyc)
        assert dx_in is dyc
        np.testing.assert_array_equal(dx_in, res[True][0])
        np.testing.assert_array_equal(dg_in, res[True][1])


@pytest.mark.parametrize("dt, widths", [(np.float32, [1040, 2048, 8192]),
                                       (np.float64, [512, 1000, 4096])])
def test_layer_norm_backward_groups_of_wide_rows_match_row_by_row(dt, widths, rng,
                                                                    monkeypatch):
    # streamed wide rows go in groups (the second pass in column tiles, the next group
    # asked for meanwhile): dgamma and dbeta bit for bit as row by row, dx within
    # rounding, with groups
    # cut short at each chunk's end (2 chunks of 37 rows), a last tile narrower than the
    # others (1000 float64 / 1040 float32 features) and float32 shares moved every 32
    # rows; and nothing written past the output
    import kernels

    monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
    for d in widths:
        n = 74
        assert nn._ln_bwd_group(d * np.dtype(dt).itemsize) > 1, d
        x = (1 + 2 * rng.standard_normal((n, d))).astype(dt)
        dy = rng.standard_normal((n, d)).astype(dt)
        g = rng.standard_normal(d).astype(dt)
        _, mu, rstd = nn.layer_norm(x, g, g)
        res = {}
        for most in (1, nn.LN_BWD_GROUP_MAX):
            monkeypatch.setattr(nn, "LN_BWD_GROUP_MAX", most)
            big = kernels.empty_aligned((n * d + 64,), dt)
            big[:] = 7.0
            res[most] = nn.layer_norm_backward(dy, x, g, mu, rstd,
                                               out=big[: n * d].reshape(n, d))
            assert (big[n * d:] == 7.0).all(), d
        grouped, single = res[nn.LN_BWD_GROUP_MAX], res[1]
        assert np.abs(single[0]).max() > 0.1
        # dx within rounding: each row's two sums, compiled into another loop, can
        # round differently (a row in ten at 1000 float64 features, by 1 ulp)
        np.testing.assert_allclose(grouped[0], single[0], rtol=0, err_msg=f"dx, d={d}",
                                   atol=8 * np.finfo(dt).eps * np.abs(single[0]).max())
        for k, name in ((1, "dgamma"), (2, "dbeta")):
            np.testing.assert_array_equal(grouped[k], single[k], err_msg=f"{name}, d={d}")


def test_layer_norm_backward_of_very_wide_float32_rows_pipelined(rng, monkeypatch):
    # float32 rows of 64-96 KiB streamed out take each row's sums while the row before
    # is written: the same results as row by row within rounding (dgamma, dbeta bit for
    # bit), close to a float64 reference, the same bits however the rows are chunked
    # (a chunk's first row sums as the others; one chunk, or a chunk per row), and
    # nothing written past the output
    import kernels

    monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
    d = 16400  # 65600 bytes: 1025 lines
    n = 9
    x = (1 + 2 * rng.standard_normal((n, d))).astype(np.float32)
    dy = rng.standard_normal((n, d)).astype(np.float32)
    g = rng.standard_normal(d).astype(np.float32)
    _, mu, rstd = nn.layer_norm(x, g, g)
    assert nn._in(d * 4, nn.LN_BWD_NEXT_F32_BYTES)
    shipped_span, shipped_chunks = nn.LN_BWD_NEXT_F32_BYTES, nn.n_chunks
    res = {}
    for key, span, chunks in (("rows", (1 << 62, 1 << 62), shipped_chunks),
                              ("pipe", shipped_span, shipped_chunks),
                              ("one chunk", shipped_span, lambda n, **kw: 1),
                              ("a chunk per row", shipped_span, lambda n, **kw: max(n, 1))):
        monkeypatch.setattr(nn, "LN_BWD_NEXT_F32_BYTES", span)
        monkeypatch.setattr(nn, "n_chunks", chunks)
        big = kernels.empty_aligned((n * d + 64,), np.float32)
        big[:] = 7.0
        res[key] = nn.layer_norm_backward(dy, x, g, mu, rstd, out=big[: n * d].reshape(n, d))
        assert (big[n * d:] == 7.0).all(), key
    rows, pipe = res["rows"], res["pipe"]
    np.testing.assert_allclose(pipe[0], rows[0], rtol=0,
                               atol=16 * np.finfo(np.float32).eps * np.abs(rows[0]).max())
    for k in (1, 2):
        np.testing.assert_array_equal(pipe[k], rows[k])
    for key in ("one chunk", "a chunk per row"):
        np.testing.assert_array_equal(res[key][0], pipe[0], err_msg=key)
    x64, dy64, g64 = (a.astype(np.float64) for a in (x, dy, g))
    xh = (x64 - mu.astype(np.float64)[:, None]) * rstd.astype(np.float64)[:, None]
    gy = dy64 * g64
    dx_ref = rstd.astype(np.float64)[:, None] * (
        gy - gy.mean(axis=1, keepdims=True) - xh * (gy * xh).mean(axis=1, keepdims=True))
    np.testing.assert_allclose(pipe[0], dx_ref, rtol=0, atol=1e-5 * np.abs(dx_ref).max())


@pytest.mark.parametrize("dt, widths", [(np.float32, [32, 48, 64, 128, 192, 256, 300, 512, 1024,
                                                        1500, 2048, 4096]),
                                       (np.float64, [150, 256, 512, 700, 1024])])
def test_layer_norm_streamed_rows_match_plain_stores(dt, widths, rng, monkeypatch):
    # large outputs whose rows are whole cache lines are streamed out (float64 rows past
    # the short-row kernels, float32 rows of 256 bytes or more forward, in registers
    # (64, 128 features) or not, and of 512 bytes or more backward, 128 on an Intel
    # host, ``nn.LN_BWD_NT_F32_BYTES``), each row written while a later row's inputs are
    # prefetched: the same values as plain stores (bit for bit but the wide backward,
    # whose streamed rows take their multiply-adds in another order, and float32
    # dgamma/dbeta of rows of 8 KiB, two rows per pass only with plain stores), in
    # place, into an unaligned output (plain stores then), and nothing written past the
    # output
    import kernels

    # (backward: 128 features and up stream here, from 32 on an Intel host)
    assert nn.LN_BWD_NT_F32_BYTES == (128 if intel_host() else 512)

    def same(got, want, exact, name):
        if exact:
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:  # a few ulps of the largest terms: dx = r (dy g - a - xhat b) cancels
            np.testing.assert_allclose(got, want, rtol=0, err_msg=f"{name}, d={d}",
                                       atol=64 * np.finfo(dt).eps * np.abs(want).max())

    for d in widths:
        n = 70  # 2 chunks of 35: the last row of a chunk prefetches the other's first
        wide = d * np.dtype(dt).itemsize >= nn.LN_BWD_WIDE_BYTES
        x = (1 + 2 * rng.standard_normal((n, d))).astype(dt)
        dy = rng.standard_normal((n, d)).astype(dt)
        g, b = rng.standard_normal(d).astype(dt), rng.standard_normal(d).astype(dt)
        res = {}
        for nt in (False, True):
            monkeypatch.setattr(_simd, "NT_MIN_BYTES", 1 << 62 if nt is False else 0)
            big = kernels.empty_aligned((n * d + 64,), dt)
            big[:] = 7.0
            y, mu, rstd = nn.layer_norm(x, g, b, out=big[: n * d].reshape(n, d))
            dbig = kernels.empty_aligned((n * d + 64,), dt)
            dbig[:] = 7.0
            grads = nn.layer_norm_backward(dy, x, g, mu, rstd,
                                           out=dbig[: n * d].reshape(n, d))
            assert (big[n * d:] == 7.0).all() and (dbig[n * d:] == 7.0).all(), d
            res[nt] = [a.copy() for a in (y, mu, rstd, *grads)]
            xc, dyc = x.copy(), dy.copy()
            np.testing.assert_array_equal(nn.layer_norm(xc, g, b, out=xc)[0], y)
            same(nn.layer_norm_backward(dyc, x, g, mu, rstd, out=dyc)[0], grads[0],
                 not wide, "dx in place")
            odd = np.empty(n * d + 1, dt)[1:].reshape(n, d)  # 4 or 8 bytes off a line
            np.testing.assert_array_equal(nn.layer_norm(x, g, b, out=odd)[0], y)
        for k, name in enumerate(("y", "mean", "rstd", "dx", "dgamma", "dbeta")):
            same(res[True][k], res[False][k], k < 3 or (k == 3 and not wide), name)
        np.testing.assert_allclose(res[True][0], ref_layer_norm(x, g, b),
                                   rtol=1e-4 if dt == np.float32 else 1e-11,
                                   atol=1e-4 if dt == np.float32 else 1e-11)


@numba.njit
def _ln_blocks_both_ways(x, y1, y2, g, b, m1, r1, m2, r2, nblocks, feats):
    for k in range(nblocks):  # one block at a time ...
        _avx512.ln_block(x, y1, g, b, m1, r1, k, 1e-5, False, feats)
    for k in range(nblocks):  # ... and every block's statistics before any output
        _avx512.ln_block_stats(x, y2, g, b, m2, r2, k, 1e-5, False, feats)
    for k in range(nblocks):
        _avx512.ln_block_apply(x, y2, g, b, m2, r2, k, 1e-5, False, feats)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_layer_norm_blocks_split_into_statistics_and_outputs_match_whole_blocks(dt, rng):
    # ln_block_stats + ln_block_apply (the grouped forward, LN_BLOCK_SPLIT_MAX_FEATURES)
    # against ln_block: the statistics bit for bit, the outputs within an ulp or two
    # (LLVM may contract the two ways' arithmetic differently), nothing written past
    # the blocks; and the public call, which groups blocks 16 at a time, against the
    # reference over several groups and a partial one (13 x 16 + 5 blocks, 3 rows more)
    require_blocks()
    lanes = nn._lanes(dt)
    for d in (2, 10, 12, nn.LN_BLOCK_MAX_FEATURES[np.dtype(dt).itemsize, lanes]):
        nb = 5
        x = (3 + 2 * rng.standard_normal(nb * lanes * d)).astype(dt)
        g = np.tile(rng.standard_normal(d).astype(dt), lanes)
        b = np.tile(rng.standard_normal(d).astype(dt), lanes)
        y1, y2 = np.full(x.size + 8, 7.0, dt), np.full(x.size + 8, 7.0, dt)
        m1, r1, m2, r2 = (np.full(nb * lanes + 8, 7.0, dt) for _ in range(4))
        _ln_blocks_both_ways(x, y1, y2, g, b, m1, r1, m2, r2, nb, (0,) * d)
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_array_equal(r1, r2)
        assert (y2[x.size:] == 7.0).all() and (m2[nb * lanes:] == 7.0).all()
        np.testing.assert_allclose(y2, y1, rtol=0, atol=4 * np.finfo(dt).eps * np.abs(y1).max())
        n = (13 * 16 + 5) * lanes + 3
        xs = (1 + rng.standard_normal((n, d))).astype(dt)
        gs, bs = rng.standard_normal(d).astype(dt), rng.standard_normal(d).astype(dt)
        y, mu, rstd = nn.layer_norm(xs, gs, bs)
        tol = 1e-4 if dt == np.float32 else 1e-11
        np.testing.assert_allclose(y, ref_layer_norm(xs, gs, bs), rtol=tol, atol=tol)
        np.testing.assert_allclose(mu, xs.astype(np.float64).mean(axis=1), rtol=tol, atol=tol)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_layer_norm_blocks_with_non_temporal_stores_match_plain_stores(dt, rng, monkeypatch):
    # large aligned outputs leave the blocks of rows (ln_block, ln_bwd_block) with
    # non-temporal stores (forced on here for small ones): the same values bit for bit
    # as plain stores, in place too, and nothing written past the output. 301 rows: the
    # last ones through the row kernels
    import kernels

    require_blocks()
    key = np.dtype(dt).itemsize, nn._lanes(dt)
    chosen = []
    monkeypatch.setattr(nn, "_ln_blocks_nt", lambda out, f=nn._ln_blocks_nt: chosen.append(
        f(out)) or chosen[-1])
    for d in sorted({2, 10, nn.LN_BWD_BLOCK_MAX_FEATURES[key], nn.LN_BLOCK_MAX_FEATURES[key]}):
        x = (1 + 2 * rng.standard_normal((301, d))).astype(dt)
        dy = rng.standard_normal((301, d)).astype(dt)
        g, b = rng.standard_normal(d).astype(dt), rng.standard_normal(d).astype(dt)
        res = {}
        for nt in (False, True):
            monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0 if nt else 1 << 62)
            chosen.clear()
            big = kernels.empty_aligned((x.size + 64,), dt)
            big[:] = 7.0
            dbig = kernels.empty_aligned((x.size + 64,), dt)
            dbig[:] = 7.0
            y, mu, rstd = nn.layer_norm(x, g, b, out=big[:x.size].reshape(x.shape))
            grads = nn.layer_norm_backward(dy, x, g, mu, rstd,
                                           out=dbig[:x.size].reshape(x.shape))
            assert (big[x.size:] == 7.0).all() and (dbig[x.size:] == 7.0).all(), d
            assert chosen and all(c == nt for c in chosen), (d, nt, chosen)
            res[nt] = [a.copy() for a in (y, mu, rstd, *grads)]
            xc, dyc = x.copy(), dy.copy()  # in place
            np.testing.assert_array_equal(nn.layer_norm(xc, g, b, out=xc)[0], y)
            np.testing.assert_array_equal(
                nn.layer_norm_backward(dyc, x, g, mu, rstd, out=dyc)[0], grads[0])
        for k, name in enumerate(("y", "mean", "rstd", "dx", "dgamma", "dbeta")):
            np.testing.assert_array_equal(res[True][k], res[False][k], err_msg=f"{name}, d={d}")


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_layer_norm_short_rows_in_place_and_nothing_written_past_the_output(dt, rng,
                                                                           every_short_row):
    # in place (out=x, out=dy) the rows may not spill into the next row, which is still
    # input; a view into a bigger buffer keeps everything after its last row (3 and 10
    # features: blocks of rows, then the row kernel for the last rows)
    for d in (3, 10, 17, 40):
        x = rng.standard_normal((150, d)).astype(dt)
        dy = rng.standard_normal((150, d)).astype(dt)
        g, b = rng.standard_normal(d).astype(dt), rng.standard_normal(d).astype(dt)
        want = _ln_both(x, g, b, dy)
        xi, dyi = x.copy(), dy.copy()
        y, mu, rstd = nn.layer_norm(xi, g, b, out=xi)
        assert y is xi
        np.testing.assert_array_equal(y, want[0])
        dx, _, _ = nn.layer_norm_backward(dyi, x, g, mu, rstd, out=dyi)
        assert dx is dyi
        np.testing.assert_array_equal(dx, want[3])
        big = np.full(x.size + 64, -5.0, dt)
        dbig = np.full(x.size + 64, -5.0, dt)
        got = _ln_both(x, g, b, dy, out=big[:x.size].reshape(x.shape),
                       dout=dbig[:x.size].reshape(x.shape))
        assert (big[x.size:] == -5.0).all() and (dbig[x.size:] == -5.0).all()
        for a, w in zip(got, want):
            np.testing.assert_array_equal(a, w)


def test_layer_norm_short_rows_keep_nan_and_inf_in_their_row(every_short_row):
    # a partial vector read whole brings in the next row's lanes: they must not reach
    # this row's sums (float32 rows of 5 features: 3 rows per vector with AVX-512)
    for dt in (np.float32, np.float64):
        x = np.tile(np.arange(5, dtype=dt), (200, 1))
        x[50, 2] = np.nan
        x[51, 0] = np.inf
        dy = np.ones_like(x)
        dy[100, 1] = np.nan
        y, mu, rstd, dx, _, _ = _ln_both(x, np.ones(5, dt), np.zeros(5, dt), dy)
        bad = np.zeros(200, bool)
        bad[[50, 51]] = True
        assert np.isnan(y[bad]).all() and np.isfinite(y[~bad]).all()
        assert np.isfinite(mu[~bad]).all() and np.isfinite(rstd[~bad]).all()
        bad[100] = True
        assert np.isnan(dx[bad]).all() and np.isfinite(dx[~bad]).all()
        np.testing.assert_allclose(y[0], (np.arange(5) - 2) / np.sqrt(2 + 1e-5), rtol=1e-6)


def test_layer_norm_refuses_mismatched_gamma():
    with pytest.raises(KernelInputError, match=r"gamma must have shape \(3,\)"):
        nn.layer_norm(np.zeros((2, 3)), np.ones(4), np.zeros(3))
    with pytest.raises(KernelDtypeError, match="beta has dtype float32"):
        nn.layer_norm(np.zeros((2, 3)), np.ones(3), np.zeros(3, np.float32))


@pytest.mark.parametrize("d", [10, 300])
def test_layer_norm_statistics_into_callers_buffers(d, rng):
    # mean_out / rstd_out: the statistics land in the caller's buffers (returned as
    # such), the same values as fresh ones; a wrong shape, dtype, layout or a buffer
    # that overlaps another is refused before anything is written
    x = rng.standard_normal((37, d)).astype(np.float32)
    g, b = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    y0, mu0, rs0 = nn.layer_norm(x, g, b)
    mu, rs = np.full(37, 9.0, np.float32), np.full(37, 9.0, np.float32)
    y, mu1, rs1 = nn.layer_norm(x, g, b, mean_out=mu, rstd_out=rs)
    assert mu1 is mu and rs1 is rs
    np.testing.assert_array_equal(mu, mu0)
    np.testing.assert_array_equal(rs, rs0)
    np.testing.assert_array_equal(y, y0)
    out = np.full_like(x, 5.0)
    for kwargs, err, match in [
        (dict(mean_out=np.empty(36, np.float32)), KernelInputError, r"mean_out must have shape"),
        (dict(rstd_out=np.empty(37)), KernelDtypeError, "rstd_out must be a float32 array"),
        (dict(mean_out=np.empty(74, np.float32)[::2]), KernelInputError, "C-contiguous"),
        (dict(mean_out=mu, rstd_out=mu), KernelInputError, "buffers of their own"),
        (dict(mean_out=out.reshape(-1)[:37], out=out), KernelInputError, "their own"),
    ]:
        before = (mu.copy(), out.copy())
        with pytest.raises(err, match=match):
            nn.layer_norm(x, g, b, **kwargs)
        assert np.array_equal(mu, before[0]) and np.array_equal(out, before[1])

# -- GELU, bias + activation -----------------------------------------------------------

def test_gelu_matches_erf_reference(dtype, tol, rng, gelu_path):
    x = np.concatenate([np.linspace(-12, 12, 2001), 3 * rng.standard_normal(500)]).astype(dtype)
    np.testing.assert_allclose(nn.gelu(x), ref_gelu(x), **tol)
    np.testing.assert_allclose(nn.gelu_backward(np.ones_like(x), x), ref_gelu_grad(x), **tol)


def test_gelu_float64_is_accurate_in_the_tails(rng, gelu_path):
    # reference through erfc, so the lower tail is not lost to 1 + erf cancellation;
    # it rounds x / sqrt 2, which costs it up to x^2 ulp there (allowed for below)
    # with the float64 central pieces' boundaries (j * 0.3125 with AVX-512, j * 5 / 128
    # without) and the 4.99 switch, +-1 ulp
    edges = np.array(sorted({j * 0.3125 for j in range(17)} | {j * 5 / 128 for j in range(129)}
                            | {4.99}))
    edges = np.concatenate([edges, np.nextafter(edges, 0), np.nextafter(edges, 9)])
    x = np.concatenate([np.linspace(-30, 30, 6001), np.linspace(-1e-3, 1e-3, 201),
                        3 * rng.standard_normal(2000), edges, -edges])
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x])
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    bound = (16 + x * x) * np.finfo(np.float64).eps
    # the derivative cdf + x pdf crosses 0 near x = -0.75: scale by its terms' size
    cases = ((nn.gelu(x), x * cdf, np.abs(x * cdf)),
             (nn.gelu_backward(np.ones_like(x), x), cdf + x * pdf, cdf + np.abs(x * pdf)),
             (nn.bias_act(x[None, :], np.zeros(x.size)), x * cdf, np.abs(x * cdf)))
    for got, ref, size in cases:
        ref = ref.reshape(got.shape)
        ok = np.abs(got - ref) <= (bound * size).reshape(got.shape) + 1e-300
        assert ok.all(), (x[~ok.ravel()][:5], got[~ok][:5], ref[~ok][:5])


def test_gelu_backward_float32_mills_ratio_form():
    # float32 GELU' = 1 - phi(a) (R(a) - a) above 0, phi(a) (R(a) - a) below, R fitted:
    # within 2.5e-7 of the exact derivative everywhere, and the special values hold
    x = np.concatenate([np.linspace(-15, 15, 60001), [-0.0, 1e-40, -1e-40]])
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x])
    ref = cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    x32 = x.astype(np.float32)
    got = nn.gelu_backward(np.ones_like(x32), x32)
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() < 2.5e-7
    special = np.array([np.inf, -np.inf, np.nan, 3e38, -3e38], np.float32)
    got = nn.gelu_backward(np.ones_like(special), special)
    # below about -13.2, where GELU' is under 1e-37 in size, the exp does not flush:
    # the result stays within 1e-37 of 0 instead of being 0
    np.testing.assert_allclose(got, [1.0, 0.0, np.nan, 1.0, 0.0], rtol=0, atol=1e-37)
    dx, db = nn.bias_act_backward(np.full((2, 5), 2, np.float32), special[None, :].repeat(2, 0),
                                  np.zeros(5, np.float32))
    np.testing.assert_array_equal(dx, 2 * got[None, :].repeat(2, 0))
    np.testing.assert_array_equal(db, 2 * dx[0])


def test_gelu_float32_is_accurate_in_the_tails_and_at_special_values(gelu_path):
    # float32 on AVX-512: 16 pieces of degree 6 for a = |x| < 5.99, 0 past it (AVX2: 4
    # pieces of degree 8, the derivative's of degree 10); the
    # portable path: a rational erf (and Mills' ratio for the derivative). Forward:
    # within 3e-7 relative where x >= 0 and 2e-5 below, plus |x| Phi(-5.99) < 7e-9 for
    # the cut-off (the portable path: 8e-7 absolute); the derivative within 1.5e-7 (2.5e-7). -3e38 once gave -9e30 (the portable
    # path's erf is clamped at t = -4, where its float32 value is not -1)
    x = np.concatenate([np.linspace(-15, 15, 60001), [5.99, -5.99, 6.0, -6.0, 1e-40, -1e-40]])
    x = x.astype(np.float32).astype(np.float64)
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x])
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    x32 = x.astype(np.float32)
    got = nn.gelu(x32).astype(np.float64)
    ref = x * cdf
    bound = np.where(x >= 0, 3e-7, 2e-5) * np.abs(ref) + 7e-9
    if gelu_path == "portable":  # 1 + erf cancels below 0: x ulp(1) / 2, up to 6e-7
        bound = 3e-7 * np.abs(ref) + 8e-7
    assert (np.abs(got - ref) <= bound).all(), x[np.abs(got - ref) > bound][:5]
    ref_grad = cdf + x * pdf
    got_grad = nn.gelu_backward(np.ones_like(x32), x32).astype(np.float64)
    assert np.abs(got_grad - ref_grad).max() < (2.5e-7 if gelu_path == "portable" else 1.5e-7)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 3e38, -3e38], np.float32)
    with np.errstate(invalid="ignore"):
        want = special * np.array([np.nan, 1, 0, 0.5, 0.5, 1, 0], np.float32)
    got = nn.gelu(special)
    np.testing.assert_array_equal(got, want)  # -inf * 0: NaN, as torch and float64 give
    assert np.signbit(got[3]) and not np.signbit(got[4])
    np.testing.assert_allclose(nn.gelu_backward(np.ones_like(special), special),
                               [np.nan, 1, 0, 0.5, 0.5, 1, 0], rtol=0, atol=1e-37)


@pytest.mark.parametrize("ncols", [1, 7, 16, 45, 64, 100, 130])
def test_gelu_float32_vector_path_is_the_same_at_every_length_and_position(
        vec_gelu, ncols, rng, monkeypatch):
    # the float32 vector path does 64 elements per call and a masked tail, after an
    # aligned head with non-temporal stores: every length and position gives each value
    # the same result, with or without them; against float64, to float32 accuracy
    x = (4 * rng.standard_normal((9, ncols))).astype(np.float32)
    b = rng.standard_normal(ncols).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    runs = {}
    for nt in (False, True):
        monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0 if nt else 1 << 62)
        dx, db = nn.bias_act_backward(dy, x, b)
        runs[nt] = {"gelu": nn.gelu(x), "grad": nn.gelu_backward(dy, x),
                    "bias": nn.bias_act(x, b), "bias_grad": dx, "db": db,
                    "flat": [nn.gelu(x.ravel()[k:n]) for k in (0, 1, 5)
                             for n in range(k + 1, min(x.size, k + 140))]}
    z = x.astype(np.float64) + b
    wants = {"gelu": ref_gelu(x), "grad": dy * ref_gelu_grad(x), "bias": ref_gelu(z),
             "bias_grad": dy * ref_gelu_grad(z), "db": (dy * ref_gelu_grad(z)).sum(axis=0)}
    for key, want in wants.items():
        np.testing.assert_allclose(runs[False][key], want, rtol=1e-6,
                                   atol=1e-6 if key == "db" else 2e-7, err_msg=key)
        if key != "db":  # db: other block boundaries after the aligned head
            np.testing.assert_array_equal(runs[True][key], runs[False][key], err_msg=key)
    for got, got_nt in zip(runs[False]["flat"], runs[True]["flat"]):
        np.testing.assert_array_equal(got_nt, got)
    k = 0
    for start in (0, 1, 5):
        for n in range(start + 1, min(x.size, start + 140)):
            np.testing.assert_array_equal(runs[False]["flat"][k],
                                          runs[False]["gelu"].ravel()[start:n])
            k += 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_streams_into_fresh_outputs_only_where_nt_fresh(vec_gelu, dtype, rng,
                                                             monkeypatch):
    # a large output the call allocates itself is streamed only where _simd.NT_FRESH (off
    # on the Intel host: plain stores into just-zeroed pages were faster); a caller's
    # out= is streamed either way; all four entry points give the same values each way
    monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
    # (where out= lands against x modulo 4 KiB: test_gelu_writes_plainly_into_an_out_...)
    monkeypatch.setattr(_simd, "NT_AHEAD_SLOW_BYTES", 0)
    seen = []

    def recorder(fn):
        def run(*args):
            seen.append(args[-1])  # the kernels' last argument: nt
            return fn(*args)
        return run

    for table in ("_GELU_VEC", "_GELU_STAGED"):
        monkeypatch.setattr(activations, table,
                            {k: recorder(f) for k, f in getattr(activations, table).items()})
    x = (3 * rng.standard_normal((40, 96))).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    b = rng.standard_normal(96).astype(dtype)
    calls = {"gelu": lambda o: nn.gelu(x, out=o),
             "grad": lambda o: nn.gelu_backward(dy, x, out=o),
             "bias": lambda o: nn.bias_act(x, b, out=o),
             "bias_grad": lambda o: nn.bias_act_backward(dy, x, b, out=o)[0]}
    results = {}
    for fresh_nt in (False, True):
        monkeypatch.setattr(_simd, "NT_FRESH", fresh_nt)
        for key, call in calls.items():
            seen.clear()
            results[key, fresh_nt, None] = call(None)
            assert seen == [fresh_nt], (key, fresh_nt)
            seen.clear()
            out = empty_aligned(x.shape, dtype, like=x)
            assert call(out) is out
            assert seen == [True], key
            results[key, fresh_nt, "out"] = out
    for key in calls:
        want = results[key, False, None]
        for got in (results[key, True, None], results[key, False, "out"]):
            np.testing.assert_array_equal(got, want, err_msg=key)


def test_gelu_in_place_strided_nan_and_empty(rng, gelu_path):
    base = rng.standard_normal((5, 8))
    view = base[:, 1::2]
    expect = ref_gelu(view)
    out = nn.gelu(view, out=view)
    assert out is view
    np.testing.assert_allclose(base[:, 1::2], expect, rtol=1e-12)
    assert np.isnan(nn.gelu(np.array([np.nan], np.float32))[0])
    assert nn.gelu(np.zeros((0, 4))).shape == (0, 4)


@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_bias_act_forward_and_backward(act, dtype, tol, rng, gelu_path):
    x = rng.standard_normal((70, 9)).astype(dtype)
    b = rng.standard_normal(9).astype(dtype)
    dy = rng.standard_normal((70, 9)).astype(dtype)
    z = x.astype(np.float64) + b
    fwd = {"none": z, "relu": np.maximum(z, 0), "gelu": ref_gelu(z)}[act]
    grad = {"none": np.ones_like(z), "relu": (z > 0) * 1.0, "gelu": ref_gelu_grad(z)}[act]
    np.testing.assert_allclose(nn.bias_act(x, b, act), fwd, **tol)
    dx, db = nn.bias_act_backward(dy, x, b, act)
    np.testing.assert_allclose(dx, dy * grad, **tol)
    np.testing.assert_allclose(db, (dy * grad).sum(axis=0), rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


@pytest.mark.parametrize("act", ["none", "relu"])
@pytest.mark.parametrize("ncols", [1, 7, 16, 31, 256, 300, 1000])
def test_bias_act_flat_kernels_match_the_row_loops(act, ncols, dtype, tol, rng, monkeypatch):
    # an output written with non-temporal stores (stream_out) takes the flat kernels
    # (tiled bias, blocks of _AB through a scratch); with NT_MIN_BYTES at 0 every size
    # does, so heads, whole blocks, tails, several chunks and an output off its 64-byte
    # line all run here, against the loops over rows that the other outputs take. Rows
    # of few features take the flat kernels with plain stores whatever the output
    # (BIAS_FLAT_BELOW_FEATURES forward, BIAS_FLAT_BWD_BELOW_FEATURES backward).
    flat = (activations.BIAS_FLAT_BELOW_FEATURES, activations.BIAS_FLAT_BWD_BELOW_FEATURES)
    short = (ncols < flat[0]) + (ncols < flat[1])  # calls of the flat kernels unstreamed
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 3e38, -3e38, 1e-42], dtype)
    seen = []

    def recorder(fn):
        def run(*args):
            seen.append(fn)
            return fn(*args)
        return run

    for name in ("_bias_act_streamed", "_bias_act_bwd_streamed"):
        monkeypatch.setattr(activations, name, recorder(getattr(activations, name)))
    for rows in (1, 3, 40, 9000 // ncols + 1):
        x = (3 * rng.standard_normal((rows, ncols))).astype(dtype)
        x.ravel()[:special.size] = special[:x.size]
        b = rng.standard_normal(ncols).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        dy.ravel()[-3:] = [np.inf, np.nan, -1.0][:dy.size]
        atol = 4 * np.finfo(dtype).eps * rows * 5  # the bias gradient: summed in another order
        monkeypatch.setattr(_simd, "NT_MIN_BYTES", 1 << 40)
        monkeypatch.setattr(activations, "BIAS_FLAT_BELOW_FEATURES", 0)
        monkeypatch.setattr(activations, "BIAS_FLAT_BWD_BELOW_FEATURES", 0)
        seen.clear()
        want = {"fwd": nn.bias_act(x, b, act), "bwd": nn.bias_act_backward(dy, x, b, act)}
        assert seen == []
        monkeypatch.setattr(activations, "BIAS_FLAT_BELOW_FEATURES", flat[0])
        monkeypatch.setattr(activations, "BIAS_FLAT_BWD_BELOW_FEATURES", flat[1])
        seen.clear()  # unstreamed: short rows flat with plain stores, the rest by rows
        dx, db = nn.bias_act_backward(dy, x, b, act)
        np.testing.assert_array_equal(nn.bias_act(x, b, act), want["fwd"])
        np.testing.assert_array_equal(dx, want["bwd"][0])
        np.testing.assert_allclose(db, want["bwd"][1], rtol=tol["rtol"], atol=atol)
        assert len(seen) == short
        monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
        for nt_fresh in (False, True):  # new outputs: streamed where NT_FRESH
            monkeypatch.setattr(_simd, "NT_FRESH", nt_fresh)
            seen.clear()
            fwd = nn.bias_act(x, b, act)
            dx, db = nn.bias_act_backward(dy, x, b, act)
            assert len(seen) == (2 if nt_fresh else short)
            np.testing.assert_array_equal(fwd, want["fwd"])
            np.testing.assert_array_equal(dx, want["bwd"][0])
            np.testing.assert_allclose(db, want["bwd"][1], rtol=tol["rtol"], atol=atol)
        # into out=, one element past a 64-byte line (the head is written plainly)
        buf = np.empty(x.size + 1, dtype)
        out = buf[1:].reshape(x.shape)
        seen.clear()
        assert nn.bias_act(x, b, act, out=out) is out
        dx2, db2 = nn.bias_act_backward(dy, x, b, act, out=np.empty_like(x))
        assert len(seen) == 2
        np.testing.assert_array_equal(out, want["fwd"])
        np.testing.assert_array_equal(dx2, want["bwd"][0])
        np.testing.assert_allclose(db2, want["bwd"][1], rtol=tol["rtol"], atol=atol)
        inplace = x.copy()  # in place: each block is read before it is streamed back
        assert nn.bias_act(inplace, b, act, out=inplace) is inplace
        np.testing.assert_array_equal(inplace, want["fwd"])


@pytest.mark.parametrize("ncols", [1, 7, 32, 45, 64, 100])
def test_gelu_float64_paths_agree_at_every_length_and_special_value(vec_gelu, ncols, rng,
                                                                     monkeypatch):
    # the vector path does 32 elements per call and a masked tail: every length, every
    # position of a value inside a block, and the special values must match the portable
    # path to a few ulp (NaN, +-inf, -0, huge, subnormal, past the underflow point)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e308, -1e308, 5e-324, -40.0,
                        -38.5, 38.5, -8.3, 8.3])
    x = 4 * rng.standard_normal((9, ncols))
    x.ravel()[: special.size] = special[: x.size]
    b = rng.standard_normal(ncols)
    dy = rng.standard_normal(x.shape)
    got, want, got_nt = {}, {}, {}
    for flag, store in ((True, got), (False, want), ("nt", got_nt)):
        monkeypatch.setattr(activations, "VEC_F64", bool(flag))
        if flag == "nt":  # non-temporal stores, with their aligned head, at every size
            monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
        store["gelu"] = nn.gelu(x)
        store["grad"] = nn.gelu_backward(dy, x)
        store["bias"] = nn.bias_act(x, b)
        store["bias_grad"], store["db"] = nn.bias_act_backward(dy, x, b)
        store["flat"] = [nn.gelu(x.ravel()[:n]) for n in range(1, 70)]
    for key in ("gelu", "grad", "bias", "bias_grad", "db"):
        # atol: the derivative crosses 0 near x = -0.75, where rel. differences grow
        np.testing.assert_allclose(got[key], want[key], rtol=1e-14, atol=1e-15,
                                   equal_nan=True, err_msg=key)
        if key == "db":  # blocks start elsewhere after the aligned head: another grouping
            np.testing.assert_allclose(got_nt[key], got[key], rtol=1e-14, atol=1e-15)
        else:
            np.testing.assert_array_equal(got_nt[key], got[key], err_msg=key)
    for g, w, n in zip(got["flat"], want["flat"], got_nt["flat"]):
        np.testing.assert_array_equal(n, g)
        np.testing.assert_allclose(g, w, rtol=1e-14, atol=1e-300, equal_nan=True)
        np.testing.assert_array_equal(g, got["gelu"].ravel()[: g.size])  # same value anywhere


def test_gelu_float64_lanes_past_the_central_pieces_are_finished_wherever_they_are(
        vec_gelu, rng, monkeypatch):
    # float64, both directions: |z| < 4.99 by the central pieces; other lanes (and NaN)
    # are put aside and finished in batches, more than one batch per chunk here (half
    # the lanes of x are wide), in place too. Each value must not depend on its
    # neighbours: the same x shifted by a few places gives the same values, bit for bit
    # (and with one lane in 32 past 4.99: nearly every block has one put aside)
    wide = 8 * rng.standard_normal((300, 96))
    wide[::7, 3] = np.nan
    wide[5, :] = np.inf
    wide[6, :] = -np.inf
    sparse = 0.5 * rng.standard_normal((300, 96))
    sparse.ravel()[::32] = 7.0
    for x in (wide, sparse):
        _check_put_aside(x, rng, monkeypatch)
    assert np.sum(np.abs(wide) >= 4.99) > 2 * activations._PEND * 8  # batches per chunk
    assert np.sum(np.abs(sparse) >= 4.99) / 8 > activations._PEND  # batches per chunk


def _check_put_aside(x, rng, monkeypatch):
    b = rng.standard_normal(x.shape[1])
    dy = rng.standard_normal(x.shape)

    def run():
        dx, db = nn.bias_act_backward(dy, x, b)
        return {"gelu": nn.gelu(x), "bias": nn.bias_act(x, b),
                "grad": nn.gelu_backward(dy, x), "bias_grad": dx, "db": db}

    monkeypatch.setattr(activations, "VEC_F64", False)
    want = run()
    monkeypatch.setattr(activations, "VEC_F64", True)
    by_nt = {}
    for nt in (False, True):
        monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0 if nt else 1 << 62)
        got = by_nt[nt] = run()
        for key in want:
            # the derivative crosses 0 near x = -0.75: atol for its relative differences
            np.testing.assert_allclose(got[key], want[key], rtol=1e-14, atol=1e-15,
                                       equal_nan=True, err_msg=key)
        for shift in (1, 5, 31):
            flat = np.roll(x.ravel(), shift)
            np.testing.assert_array_equal(np.roll(nn.gelu(flat), -shift), got["gelu"].ravel())
            back = nn.gelu_backward(np.roll(dy.ravel(), shift), flat)
            np.testing.assert_array_equal(np.roll(back, -shift), got["grad"].ravel())
        inplace = x.copy()
        assert nn.gelu(inplace, out=inplace) is inplace
        np.testing.assert_array_equal(inplace, got["gelu"])
        inplace = x.copy()
        assert nn.bias_act(inplace, b, out=inplace) is inplace
        np.testing.assert_array_equal(inplace, got["bias"])
        inplace = dy.copy()
        assert nn.gelu_backward(inplace, x, out=inplace) is inplace
        np.testing.assert_array_equal(inplace, got["grad"])
    # streamed, both directions stage their blocks with lanes put aside (_finish_staged):
    # the same values bit for bit; db, a sum, only in another order
    for key in want:
        if key != "db":
            np.testing.assert_array_equal(by_nt[True][key], by_nt[False][key], err_msg=key)


def _loops_with(asm: str, needle: str) -> list[list[str]]:
    """The innermost loops of ``asm`` (LLVM's AT&T text) that hold ``needle``: the lines
    from a label to a jump back to it, with no other such loop inside."""
    lines = asm.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines)
              if (m := re.match(r"\s*(\.LBB\w+):", ln))}
    spans = {(labels[m.group(1)], j) for j, ln in enumerate(lines)
             if (m := re.search(r"\bj\w+\s+(\.LBB\w+)", ln))
             and labels.get(m.group(1), j + 1) < j}
    spans = {(lo, hi) for lo, hi in spans if any(needle in ln for ln in lines[lo:hi + 1])}
    inner = [(lo, hi) for lo, hi in spans
             if not any((lo, hi) != (a, b) and lo <= a and b <= hi for a, b in spans)]
    return [lines[lo:hi + 1] for lo, hi in sorted(inner)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gelu_streaming_loops_store_nothing_to_the_stack(vec_gelu, dtype, monkeypatch):
    # a value spilled to the stack inside the non-temporal loop made these kernels 3.6x
    # slower at 10 of every 256 stack positions (where the spill slot straddled a page
    # boundary: docs/kernels.md); float64 z is read again from memory instead. Compiled
    # here afresh. With AVX2 the kernels do spill on its 16 registers: there every
    # 256-bit slot (of the plain GELU and the bias + GELU backward, the fewest and the
    # most registers: CI time) must be 32-byte aligned in a realigned frame, so none can
    # straddle a page
    spilling = not _avx512.AVAILABLE
    x = np.linspace(-6, 6, 4096).reshape(16, 256).astype(dtype)
    b = np.linspace(-1, 1, 256).astype(dtype)
    pdb = np.zeros((1, 256 + activations._TILE), dtype)
    out = np.empty_like(x).reshape(-1)
    for bias, backward in activations._GELU_VEC:
        if spilling and bias != backward:  # CI time: GELU and bias + GELU backward only
            continue
        # the streaming kernel, its chunk function (where the loops are) compiled afresh too
        for chunk in ("_gelu_chunk", "_gelu_chunk_staged"):
            monkeypatch.setattr(activations, chunk,
                                _jit.fresh_copy(getattr(activations, chunk)))
        fresh = _jit.fresh_copy(activations._kernel(np.dtype(dtype), bias, backward, True))
        bt = activations._tiled(b) if bias else x.reshape(-1)
        fresh(x.reshape(-1), x.reshape(-1), bt, out, pdb, 256 if bias else x.size + 1, 1, True)
        asm = fresh.inspect_asm(fresh.signatures[0])
        loops = _loops_with(asm, "vmovntpd" if dtype == np.float64 else "vmovntps")
        assert loops, (bias, backward)
        if spilling:
            bodies = {name: v for name, v in _zmm_stack_slots(asm, "ymm").items()
                      if "_gelu_chunk" in name or ("parfor_gufunc" in name
                                                   and not name.startswith("__gufunc__"))}
            assert any(slots for _, slots in bodies.values()), bodies.keys()
            for name, (realigned, slots) in bodies.items():
                assert realigned or not slots, name
                assert [s for s in slots if s[0] != "rsp" or s[1] % 32] == [], name
            continue
        spills = [ln.strip() for loop in loops for ln in loop
                  if re.search(r"^\s*v?mov\w*\s+%\w+, -?\w*\(%rsp\)", ln)]
        assert spills == [], (bias, backward, spills[:5])


def _zmm_stack_slots(asm: str, reg: str = "zmm") -> dict[str, tuple[bool, list[tuple[str, int]]]]:
    """Per function of ``asm``: whether its prologue aligns the stack pointer to 64 bytes,
    and the (base register, offset) of each of its 512-bit (``reg="ymm"``: 256-bit) loads
    and stores on the stack (not broadcasts: they read one element)."""
    parts = re.split(r"^\s*\.type\s+(\S+),@function", asm, flags=re.M)
    slots = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        whole = "\n".join(ln for ln in body.splitlines() if "broadcast" not in ln)
        found = re.finditer(rf"%{reg}\d+, (-?\d*)\(%(r[sb]p)\)|\s(-?\d*)\(%(r[sb]p)\), %{reg}",
                            whole)
        slots[name] = ("andq\t$-64, %rsp" in body,
                       [(m[2] or m[4], int(m[1] or m[3] or 0)) for m in found])
    return slots


@pytest.mark.parametrize("dtype,c", [(np.float32, 10), (np.float64, 10), (np.float64, 4),
                                     (np.float64, 64)])
def test_softmax_kernels_spill_only_to_aligned_slots(dtype, c):
    # a 512-bit register spilled to a 16-byte aligned slot whose half straddled a 4 KiB
    # page boundary made these kernels up to 2.7x slower at some stack positions (in the
    # non-temporal loops: docs/kernels.md); the intrinsics now give the parfor body a
    # 64-byte aligned frame. Compiled here afresh (block kernel; 64 float64 classes: the
    # 8-vector short rows, 32 with AVX2); its gradient must still be right. With AVX2 the
    # 256-bit slots must be 32-byte aligned
    rng = np.random.default_rng(3)
    lanes = nn._lanes(dtype)
    c = min(c, 8 * lanes)
    n = 8 * lanes
    x = rng.standard_normal((n, c)).astype(dtype)
    y = rng.integers(0, c, n)
    g = empty_aligned(x.shape, dtype)
    sums, gaps = np.zeros(n), np.zeros(n)
    scale = dtype(1.0 / n)
    if c <= nn.BLOCK_MAX_CLASSES[np.dtype(dtype).itemsize, lanes]:
        per = nn.softmax_blocks_per_call(c, lanes, np.dtype(dtype).itemsize)
        fresh = _jit.fresh_copy(nn._softmax_xent_blocks)
        fresh(x.reshape(-1), y, g.reshape(-1), sums, gaps, n // lanes // per, 1, scale, True,
              True, (0,) * c, per)
    else:
        fresh = _jit.fresh_copy(nn._softmax_xent_short)
        fresh(x, x.reshape(-1), y, g.reshape(-1), sums, gaps, scale, True, c % lanes == 0, 1,
              nn._short_vectors(c, x.dtype), True, 0)  # non-temporal stores: whole vectors
    want = nn.softmax_cross_entropy(x.astype(np.float64), y)[1]
    np.testing.assert_allclose(g, want, rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=1e-7 if dtype == np.float32 else 1e-14)
    reg, width = ("zmm", 64) if _avx512.AVAILABLE else ("ymm", 32)
    bodies = {name: v for name, v in _zmm_stack_slots(fresh.inspect_asm(fresh.signatures[0]),
                                                      reg).items()
              if "parfor_gufunc" in name and not name.startswith("__gufunc__")}
    assert bodies
    for name, (realigned, slots) in bodies.items():
        assert realigned, name
        assert [s for s in slots if s[0] != "rsp" or s[1] % width] == [], name


def test_layer_norm_backward_streaming_loop_takes_no_references(monkeypatch):
    # _stream_row once looped over a tuple of arrays to prefetch them: numba left an NRT
    # incref/decref pair per array in each 64-byte step of the float64 streaming loop
    # (1.8x slower in cache at 256 features)
    monkeypatch.setattr(nn, "stream_out", lambda out: True)
    x = np.linspace(-3, 3, 64 * 256).reshape(64, 256)
    g = np.linspace(0.5, 1.5, 256)
    _, mu, rstd = nn.layer_norm(x, g, g)
    nch = 1
    pg, pb = np.zeros((nch, 256)), np.zeros((nch, 256))
    dx = empty_aligned(x.shape, np.float64)
    work = empty_aligned((nch, 3, 256), np.float64)
    # the loop is in the chunk function: compiled afresh too, and the kernel against it
    monkeypatch.setattr(nn, "_ln_bwd_chunk", _jit.fresh_copy(nn._ln_bwd_chunk))
    fresh = _jit.fresh_copy(nn._ln_bwd)
    fresh(x, x, g, mu, rstd, dx, pg, pb, nch, dx.reshape(-1), work, True, pg, pb, -1,
          np.float64(0))
    np.testing.assert_allclose(dx, nn.layer_norm_backward(x, x, g, mu, rstd)[0], rtol=1e-12,
                               atol=1e-12)
    loops = _loops_with(fresh.inspect_asm(fresh.signatures[0]), "vmovntpd")
    assert loops
    assert not [ln for loop in loops for ln in loop if "NRT_" in ln]


@pytest.mark.parametrize("act", ["relu", "none"])
def test_bias_act_rows_calls_of_one_chunk_run_serial_twins(act, dtype, tol, rng, monkeypatch):
    # bias + ReLU / none into a new output on few rows: one chunk, so the loops over rows
    # run as their serial twins (no parallel launch); more rows split over the threads,
    # from LIGHT_PARALLEL_MIN elements (these loops do little per element)
    names = ("_bias_act", "_bias_act_1", "_bias_act_bwd", "_bias_act_bwd_1")
    for name in names[1::2]:
        twin, kernel = getattr(activations, name), getattr(activations, name[:-2])
        assert twin.py_func.__code__ is kernel.py_func.__code__
        assert kernel.targetoptions["parallel"] and not twin.targetoptions["parallel"]
    calls: list[str] = []
    for name in names:
        real = getattr(activations, name)
        monkeypatch.setattr(activations, name,
                            lambda *a, real=real, name=name: calls.append(name) or real(*a))
    # 64 x 256: under LIGHT_PARALLEL_MIN, so still one chunk (row_chunks would split it)
    assert 64 * 256 < activations.LIGHT_PARALLEL_MIN <= 1024 * 256
    for rows, want in ((8, ["_bias_act_1", "_bias_act_bwd_1"]),
                       (64, ["_bias_act_1", "_bias_act_bwd_1"]),
                       (1024, ["_bias_act", "_bias_act_bwd"])):
        x = rng.standard_normal((rows, 256)).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        b = rng.standard_normal(256).astype(dtype)
        del calls[:]
        y = nn.bias_act(x, b, act)
        dx, db = nn.bias_act_backward(dy, x, b, act)
        assert calls == want, (rows, calls)
        z = x.astype(np.float64) + b
        slope = (z > 0) if act == "relu" else np.ones_like(z)
        np.testing.assert_allclose(y, z * slope, **tol)
        np.testing.assert_allclose(dx, dy * slope, **tol)
        np.testing.assert_allclose(db, (dy * slope).sum(axis=0), rtol=tol["rtol"] * 50,
                                   atol=tol["atol"] * rows)
        assert db.shape == (256,) and db.dtype == dtype


def test_bias_act_refuses_unknown_activation_and_wrong_bias():
    with pytest.raises(KernelInputError, match="act must be one of"):
        nn.bias_act(np.zeros((2, 3)), np.zeros(3), "tanh")
    with pytest.raises(KernelInputError, match=r"b must have shape \(3,\)"):
        nn.bias_act(np.zeros((2, 3)), np.zeros(2))


_COMPRESS_HASHES = (
    "import hashlib, numpy as np\n"
    "from kernels import _avx512, _simd, compress, nn\n"
    "_simd.VECTOR_COMPRESS = {flag}\n"
    "rng = np.random.default_rng(3)\n"
    "x = 8 * rng.standard_normal((300, 96)); x[::7, 3] = np.nan\n"
    "b = rng.standard_normal(96)\n"
    "g = rng.standard_normal(1 << 17).astype(np.float32)\n"
    "r = rng.standard_normal(1 << 17).astype(np.float32)\n"
    "out = list(compress.topk_sparsify(g, r, 1000)) + [r]\n"
    "if _avx512.AVAILABLE:  # AVX2's float64 GELU packs its lanes without a compress\n"
    "    dx, db = nn.bias_act_backward(x, x, b)\n"
    "    out += [nn.gelu(x), nn.gelu_backward(x, x), nn.bias_act(x, b), dx, db]\n"
    "for a in out:\n"
    "    print(hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest())\n")


def _compress_both_ways(folder):
    return [(["-c", _COMPRESS_HASHES.format(flag=flag)],
             {"HPCGW_NUMBA_CACHE_DIR": str(folder / name)})
            for flag, name in ((False, "old"), (True, "new"))]


@pytest.mark.background(commands=_compress_both_ways)
def test_vector_compress_falls_back_on_an_older_llvm(background):
    # llvm.experimental.vector.compress arrived in LLVM 19: with an older llvmlite (as in
    # Debian 12's numba, which the Python image carries) the process would abort when it
    # links. There the put-aside lanes of float64 GELU and the sparsification's
    # candidates go through llvm.masked.compressstore; run that path, in a fresh
    # cache, against the default one (two subprocesses, started in the background)
    _, (old, new) = background
    assert old.returncode == 0 and new.returncode == 0, old.stderr + new.stderr
    assert len(old.stdout.split()) >= 3
    assert old.stdout == new.stdout


def _generic_target(folder):
    code = ("import math, numpy as np\n"
            "from kernels import _avx512, nn\n"
            "x = np.linspace(-10, 10, 1001)\n"
            "ref = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x])\n"
            "assert np.allclose(nn.gelu(x), ref, rtol=1e-13, atol=1e-300)\n"
            "print(_avx512.AVAILABLE)\n")
    return [(["-c", code], {"NUMBA_CPU_NAME": "generic",
                            "HPCGW_NUMBA_CACHE_DIR": str(folder / "cache")})]


@pytest.mark.background(commands=_generic_target)
def test_float64_gelu_for_a_generic_cpu_target_takes_the_portable_path(background):
    # an image that carries a cache built for NUMBA_CPU_NAME=generic must not compile the
    # AVX-512 or AVX2 intrinsics (they would not even select there); the portable path runs
    _, [done] = background
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


_COMPILE_ONLY = """
import json, re, sys
import numba, numpy as np
from numba.core.registry import CPUDispatcher
from kernels import _avx512, _jit, _simd, activations, empty_aligned, nn
assert _avx512.AVAILABLE
nt_min, nt_slow = _simd.NT_MIN_BYTES, _simd.NT_AHEAD_SLOW_BYTES
_jit.SERIAL_TWINS = False  # small calls too go to the parallel kernels (the twins would run)
wrapped, compiled = {}, {}

class CompileOnly:  # compiles a parallel kernel for its arguments, never runs it
    def __init__(self, name, disp):
        self.name = name
        wrapped[name] = disp
    def __call__(self, *args):
        sig = tuple(numba.typeof(a) for a in args)
        wrapped[self.name].compile(sig)
        compiled.setdefault(self.name, []).append(sig)

def top(v):
    return isinstance(v, CPUDispatcher) and v.targetoptions.get("parallel")

for mod in (activations, nn):
    for k, v in list(vars(mod).items()):
        if top(v):
            setattr(mod, k, CompileOnly(k, v))
        elif isinstance(v, dict):  # the GELU kernels by (bias, backward)
            for kk, vv in list(v.items()):
                if top(vv):
                    v[kk] = CompileOnly(f"{k}{list(kk)}", vv)
rng = np.random.default_rng(0)
for dt in (np.float32, np.float64):
    x = rng.standard_normal((64, 256)).astype(dt)
    b = rng.standard_normal(256).astype(dt)
    activations.gelu(x)
    activations.gelu_backward(x, x)
    activations.bias_act(x, b, "gelu")
    activations.bias_act_backward(x, x, b, "gelu")
    _simd.NT_MIN_BYTES = _simd.NT_AHEAD_SLOW_BYTES = 0  # streamed: float64 takes _GELU_STAGED
    xo = empty_aligned(x.shape, dt, like=x)
    activations.gelu(x, out=xo)
    activations.gelu_backward(x, x, out=xo)
    activations.bias_act(x, b, "gelu", out=xo)
    activations.bias_act_backward(x, x, b, "gelu", out=xo)
    _simd.NT_MIN_BYTES, _simd.NT_AHEAD_SLOW_BYTES = nt_min, nt_slow
    for c in (10, 64, 256):
        xc = rng.standard_normal((64, c)).astype(dt)
        g = np.ones(c, dt)
        nn.softmax_cross_entropy(xc, rng.integers(0, c, 64))
        nn.layer_norm(xc, g, g)
        nn.layer_norm_backward(xc, xc, g, np.zeros(64, dt), np.ones(64, dt))
json.dump({k: sum(len(re.findall("%zmm", wrapped[k].inspect_asm(s))) for s in sigs)
           for k, sigs in compiled.items()}, open(sys.argv[1], "w"))
"""


_AVX512_FEATURES = ("+avx512f,+avx512dq,+avx512bw,+avx512vl,+avx512cd,+avx2,+avx,+fma,+f16c,"
                    "+bmi,+bmi2,+lzcnt,+popcnt,+sse4.2,+sse4.1,+ssse3,+sse3,+cx16,+movbe")


def _compile_for_avx512(folder):
    return [(["-W", "ignore", "-c", _COMPILE_ONLY, str(folder / "zmm.json")],
             {"HPCGW_NUMBA_CACHE_DIR": str(folder / "cache"),
              "NUMBA_CPU_NAME": "skylake-avx512", "NUMBA_CPU_FEATURES": _AVX512_FEATURES})]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="AVX-512 is an x86-64 instruction set")
@pytest.mark.background(commands=_compile_for_avx512)
def test_avx512_kernels_compile_to_512_bit_code(background):
    # On a CPU without AVX-512 the vector paths cannot run, but they can be built: a
    # subprocess (started in the background) targets an AVX-512 CPU (NUMBA_CPU_NAME /
    # NUMBA_CPU_FEATURES, an empty cache folder), replaces every parallel kernel of
    # kernels.activations and kernels.nn by a stand-in that compiles it for its arguments
    # without running it, and drives the public calls through each AVX-512 path. Every
    # one must compile (intrinsics typed, LLVM lowered) into code that uses 512-bit
    # registers.
    import json

    folder, [done] = background
    assert done.returncode == 0, done.stderr[-3000:]
    zmm = json.loads((folder / "zmm.json").read_text())
    vector_paths = [f"{table}[{bias}, {backward}]" for table in ("_GELU_VEC", "_GELU_STAGED")
                    for bias in (False, True) for backward in (False, True)] + [
                    "_softmax_xent_blocks", "_softmax_xent_short", "_softmax_xent_f64_vec",
                    "_ln_fwd_blocks", "_ln_fwd_short", "_ln_bwd_blocks", "_ln_bwd_short"]
    for name in vector_paths:
        assert zmm.get(name, 0) > 100, (name, zmm)


_AVX2_FEATURES = ("+avx2,+avx,+fma,+f16c,+bmi,+bmi2,+lzcnt,+popcnt,+sse4.2,+sse4.1,+ssse3,"
                  "+sse3,+cx16,+movbe,-avx512f")


def _at_256_bits(folder):
    # the tests of this file that run the row and block kernels and GELU, in a fresh
    # interpreter compiling for an AVX2 CPU into an empty cache folder; not the tests that
    # start background checks of their own (those compile for a target they name)
    import os

    if platform.machine().lower() not in ("x86_64", "amd64") or not (
            _avx512.AVAILABLE or os.environ.get("HPCGW_TEST_AVX2_AGAIN")):
        return []
    return [(["-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "not background",
              "-k", "(xent or layer_norm or block or softmax or gelu or bias_act) "
              "and not at_256_bits"],
             {"HPCGW_NUMBA_CACHE_DIR": str(folder / "cache"), "NUMBA_CPU_NAME": "haswell",
              "NUMBA_CPU_FEATURES": _AVX2_FEATURES, "HPCGW_TEST_AVX2_AGAIN": ""})]


@pytest.mark.background(commands=_at_256_bits)
def test_row_and_block_kernels_at_256_bits_where_the_cpu_has_avx512(background):
    # the softmax and layer norm row and block kernels and GELU take the CPU's vector
    # width: 256 bits with AVX2 (8 float32 / 4 float64 lanes, other permutes, exps and
    # GELU pieces, float64's from memory, other tuning). On an AVX-512 host the tests of
    # this file run them at 512 bits; here the same tests run again in a subprocess that
    # compiles for an AVX2 CPU (started in the background: about 4 minutes of compiling
    # and testing, which overlaps the integration tests), so both widths are checked
    # wherever CI runs. On an AVX2 host they already ran at 256 bits
    # (HPCGW_TEST_AVX2_AGAIN=1 runs them anyway)
    import os

    _, done = background
    if platform.machine().lower() not in ("x86_64", "amd64"):
        # no AVX2 to target: nothing was started, and only the portable paths run here
        assert done == []
        assert not (nn.VEC_BLOCKS or nn.VEC_SHORT or activations.VEC_F32
                    or activations.VEC_F64 or _avx512.AVAILABLE)
        return
    if not _avx512.AVAILABLE and not os.environ.get("HPCGW_TEST_AVX2_AGAIN"):
        # an AVX2 host: the tests above ran these kernels at 256 bits in this process
        # (test_avx512_kernels_compile_to_512_bit_code builds the 512-bit ones); check
        # that they really were the vector paths at that width, not the portable loops
        assert done == []
        assert nn.VEC_BLOCKS and nn.VEC_SHORT and activations.VEC_F32 and activations.VEC_F64
        assert (_avx512.row_lanes(True), _avx512.row_lanes(False)) == (8, 4)
        assert nn._lanes(np.float32) == 8 and nn.BLOCK_MAX_CLASSES[4, 8] >= 10
        return
    [run] = done
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "and GELU at 256 bits tested" in run.stdout, run.stdout[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
    # at 256 bits every vector path exists, so none of these tests may skip (the guarded
    # skips of the vec_gelu fixture / require_blocks are for CPUs without AVX2 and FMA only)
    assert " skipped" not in run.stdout, run.stdout[-2000:]
