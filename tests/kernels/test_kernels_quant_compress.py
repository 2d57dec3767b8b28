"""int8 per-channel quantisation and top-k sparsification against NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.testing.require import require
from kernels import _simd, compress, quant
from kernels.compress import ErrorFeedback, densify, topk_sparsify
from kernels.errors import KernelDtypeError, KernelInputError
from kernels.quant import dequantize_int8, quantize_int8


def ref_quantize(w):
    w2 = w.reshape(w.shape[0], -1).astype(np.float64)
    amax = np.abs(w2).max(axis=1)
    scale = np.where(amax > 0, amax / 127, 1.0)
    q = np.clip(np.rint(w2 / scale[:, None]), -127, 127).astype(np.int8)
    return q.reshape(w.shape), scale


def test_quantize_matches_reference_and_round_trips(dtype, rng):
    w = rng.standard_normal((9, 4, 5)).astype(dtype)
    w[3] = 0.0  # an all-zero channel
    q, scale = quantize_int8(w)
    rq, rscale = ref_quantize(w)
    assert q.dtype == np.int8 and q.shape == w.shape and scale.dtype == dtype
    np.testing.assert_allclose(scale, rscale, rtol=1e-6)
    # the kernel multiplies by 1/scale; allow a one-step difference only at .5 boundaries
    assert np.abs(q.astype(int) - rq).max() <= 1
    assert (q == rq).mean() > 0.999
    back = dequantize_int8(q, scale, dtype)
    assert back.dtype == dtype
    assert np.all(np.abs(back - w) <= 0.5 * scale[:, None, None] * (1 + 1e-5))
    assert np.abs(q).max() == 127 and (q[3] == 0).all()


@pytest.mark.parametrize("d", [64, 127, 200, 1029])
def test_quantize_wide_rows_64_at_a_time_equal_the_element_loop(d, dtype, rng):
    # rows of 64 or more go 64 elements per vector step (kernels._simd.quant_store), the
    # rest one by one: both must give exactly w * (1 / scale) rounded half to even
    w = (rng.standard_normal((5, d)) * 3).astype(dtype)
    w[1] = 0.0
    ties = np.array([2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.7, -1.7, 126.5, -126.5], dtype)
    for row in (2, 3):  # max |w| = 127 makes scale 1 exactly: the ties stay ties
        w[row] = np.clip(w[row], -100, 100)
        w[row, 0] = 127.0
        w[row, 1:11] = ties  # inside the first vector step
        w[row, -10:] = ties  # in the last step or the element loop
    out = np.empty(w.size + 1, np.int8)[1:].reshape(w.shape)  # not aligned
    q, scale = quantize_int8(w, out=out)
    amax = np.abs(w).max(axis=1).astype(np.float64)
    want_scale = np.where(amax > 0, amax / 127.0, 1.0).astype(dtype)
    # fast-math: / 127 may be * (1 / 127), an ulp off
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6 if dtype == np.float32 else 1e-15)
    inv = (np.dtype(dtype).type(1) / scale)[:, None]
    want = np.clip(np.rint(w * inv), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(q, want)
    for row in (2, 3):
        assert q[row, 1:11].tolist() == [2, 4, -2, -4, 0, 0, 2, -2, 126, -126]
        assert q[row, -10:].tolist() == [2, 4, -2, -4, 0, 0, 2, -2, 126, -126]
    assert not q[1].any() and scale[1] == 1.0


@pytest.mark.parametrize("n", [37, 3000])  # 3000 rows: the parallel kernel from 3 columns
@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 15, 16, 17, 33, 63, 65, 100])
@pytest.mark.parametrize("masked", [True, False])
def test_quantize_row_tails_in_masked_vectors_equal_the_element_loop(n, d, masked, dtype, rng,
                                                                     monkeypatch):
    # a row's last piece under 64 elements (or a whole row under 64) goes out as masked
    # vectors, a 512-bit register's worth each (kernels._simd.quant_store_part, with
    # AVX-512: quant.MASKED_TAIL), else one element at a time; the masked loads and
    # stores must touch the piece only: codes of the next row, and the byte past the
    # array, stay as they were
    if masked and not quant.MASKED_TAIL:
        assert not _simd._host_has_avx512()  # a CPU property: the library never takes it
        pytest.skip("masked byte stores need AVX-512")
    monkeypatch.setattr(quant, "MASKED_TAIL", masked)
    w = (rng.standard_normal((n, d)) * 3).astype(dtype)
    w[5] = 0.0
    ties = np.resize(np.array([2.5, -3.5, 0.5, -0.5, 126.5, -1.7], dtype), d)
    w[6] = ties
    w[6, 0] = 127.0  # scale 1 exactly: the ties stay ties
    buf = np.full(w.size + 1, 99, np.int8)
    q, scale = quantize_int8(w, out=buf[:-1].reshape(w.shape))
    assert buf[-1] == 99
    inv = (np.dtype(dtype).type(1) / scale)[:, None]
    np.testing.assert_array_equal(q, np.clip(np.rint(w * inv), -127, 127).astype(np.int8))
    assert not q[5].any() and scale[5] == 1.0 and scale[6] == 1.0
    np.testing.assert_array_equal(q[6, 1:], np.rint(ties[1:]).astype(np.int8))
    back = dequantize_int8(q, scale, dtype)
    np.testing.assert_array_equal(back, q.astype(dtype) * scale[:, None])


@pytest.mark.parametrize("n", [12, 20000])  # the serial twin and the parallel kernel
def test_quantize_rows_of_one_element_equal_the_row_kernel(n, dtype, rng):
    # rows of one element (a 1-D array, or shape (n, 1)) go through one elementwise loop
    # (quant._quantize_flat), not the row kernel: the same codes and scales bit for bit,
    # zeros, -0.0, subnormals and the largest finite value included, and NaN/inf refused
    # with the channel named
    fi = np.finfo(dtype)
    w = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(dtype)
    special = np.array([0.0, -0.0, fi.smallest_subnormal, -fi.smallest_subnormal, fi.max,
                        -fi.max, fi.tiny, 127.0, -0.5], dtype)
    w[:special.size] = special
    q, scale = quantize_int8(w)
    ity, mask, inf_bits = quant._BITS[np.dtype(dtype)]
    w2 = w.reshape(-1, 1)
    rq = np.empty(w2.shape, np.int8)
    rs = np.empty(n, dtype)
    bad = np.zeros(n, np.bool_)
    quant._quantize_1(w2, w2.view(ity), rq, rs, rs.view(ity), bad, ity(mask), ity(inf_bits),
                      0, False)
    np.testing.assert_array_equal(q, rq.reshape(-1))
    np.testing.assert_array_equal(scale.view(ity), rs.view(ity))
    assert q[:9].tolist() == [0, 0, 127, -127, 127, -127, 127, 127, -127]
    assert quantize_int8(w2)[0].shape == (n, 1)
    for v, row in ((np.nan, 3), (-np.inf, n - 1)):
        bad = w2.copy()
        bad[row] = v
        with pytest.raises(KernelInputError, match=rf"NaN or inf in channel\(s\) \[{row}\]"):
            quantize_int8(bad)


@pytest.mark.parametrize("shape", [(20000,), (20000, 1), (3, 1), (5, 7), (300, 40)])
def test_dequantize_rows_of_one_element_and_small_arrays(shape, dtype, rng):
    # rows of one element (a 1-D array: each element its own channel) as one
    # elementwise loop; arrays under two chunks on the calling thread (serial twins)
    w = rng.standard_normal(shape).astype(dtype)
    q, scale = quantize_int8(w)
    back = dequantize_int8(q, scale, dtype)
    want = q.reshape(shape[0], -1).astype(dtype) * scale[:, None]
    np.testing.assert_array_equal(back, want.reshape(shape))
    out = np.empty(shape, dtype)
    assert dequantize_int8(q, scale, dtype, out=out) is out
    np.testing.assert_array_equal(out, back)


def test_quantize_strided_1d_and_empty(rng):
    w = rng.standard_normal((6, 10))
    np.testing.assert_array_equal(quantize_int8(w[:, ::3])[0], quantize_int8(w[:, ::3].copy())[0])
    q, s = quantize_int8(np.array([2.0, -1.0]))  # 1-D: each element is a channel
    assert q.tolist() == [127, -127] and s.tolist() == [2 / 127, 1 / 127]
    q, s = quantize_int8(np.zeros((0, 3), np.float32))
    assert q.shape == (0, 3) and s.shape == (0,)
    assert dequantize_int8(q, s).shape == (0, 3)


def test_quantize_out_buffer_and_nan_anywhere(dtype, rng):
    w = rng.standard_normal((7, 37)).astype(dtype)
    out = np.empty(w.shape, np.int8)
    q, scale = quantize_int8(w, out=out)
    assert q is out
    np.testing.assert_array_equal(q, quantize_int8(w)[0])
    for c, j, v in ((0, 0, np.nan), (3, 36, -np.nan), (6, 17, np.inf), (2, 5, -np.inf)):
        bad = w.copy()
        bad[c, j] = v
        with pytest.raises(KernelInputError, match=rf"channel\(s\) \[{c}\]"):
            quantize_int8(bad)
    with pytest.raises(KernelDtypeError, match="out must be an int8"):
        quantize_int8(w, out=np.empty(w.shape, np.int16))


@pytest.mark.parametrize("d", [1, 15, 17, 64, 1024, 1000])
def test_dequantize_non_temporal_path_equals_plain(d, dtype, rng, monkeypatch):
    # every row width against every alignment of the output (0..15 elements off a
    # 64-byte boundary): the scalar head/tail and the 64-byte stores must cover each
    # element exactly once
    require(_simd.NT_STORES, "an x86-64 CPU for the non-temporal path")
    q = rng.integers(-127, 128, (37, d)).astype(np.int8)
    scale = rng.random(37).astype(dtype) + 0.5
    expect = (q.astype(np.float64) * scale[:, None].astype(np.float64)).astype(dtype)
    monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
    for off in range(16):
        buf = np.full(q.size + 16, -7, dtype)
        out = buf[off:off + q.size].reshape(q.shape)
        got = dequantize_int8(q, scale, dtype, out=out)
        assert got is out
        np.testing.assert_array_equal(out, expect)
        assert (buf[:off] == -7).all() and (buf[off + q.size:] == -7).all()  # nothing spilled


def test_dequantize_streams_into_fresh_outputs_only_where_nt_fresh(dtype, rng, monkeypatch):
    # its own new output streamed only where _simd.NT_FRESH (off on the Intel host: plain
    # stores into just-zeroed pages were faster); a caller's out= streamed either way
    require(_simd.NT_STORES, "an x86-64 CPU for the non-temporal path")
    from kernels import quant
    monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
    streamed = []
    real = quant._dequantize_nt
    monkeypatch.setattr(quant, "_dequantize_nt", lambda *a: (streamed.append(1), real(*a)))
    q = rng.integers(-127, 128, (33, 70)).astype(np.int8)
    scale = rng.random(33).astype(dtype) + 0.5
    expect = (q.astype(np.float64) * scale[:, None].astype(np.float64)).astype(dtype)
    for fresh_nt in (False, True):
        monkeypatch.setattr(_simd, "NT_FRESH", fresh_nt)
        streamed.clear()
        np.testing.assert_array_equal(dequantize_int8(q, scale, dtype), expect)
        assert len(streamed) == int(fresh_nt)
        out = np.empty(q.shape, dtype)
        assert dequantize_int8(q, scale, dtype, out=out) is out
        np.testing.assert_array_equal(out, expect)
        assert len(streamed) == int(fresh_nt) + 1


def test_quantize_refuses_nan_and_wrong_types():
    with pytest.raises(KernelInputError, match=r"NaN or inf in channel\(s\) \[1\]"):
        quantize_int8(np.array([[1.0, 2.0], [np.inf, 0.0]]))
    with pytest.raises(KernelDtypeError, match="w has dtype int32"):
        quantize_int8(np.ones((2, 2), np.int32))
    with pytest.raises(KernelDtypeError, match="q must be an int8"):
        dequantize_int8(np.ones((2, 2), np.int16), np.ones(2))
    with pytest.raises(KernelInputError, match=r"scale must have shape \(2,\)"):
        dequantize_int8(np.ones((2, 2), np.int8), np.ones(3))


# -- top-k sparsification ---------------------------------------------------------------

def ref_topk_sparsify(g, r, k):
    acc = r.astype(np.float64) + g
    order = np.lexsort((np.arange(acc.size), -np.abs(acc)))[:k]
    idx = np.sort(order)
    new_r = acc.copy()
    new_r[idx] = 0
    return idx, acc[idx], new_r


def test_topk_sparsify_matches_reference_over_steps(dtype, tol, rng):
    r = np.zeros(1000, dtype)
    rr = np.zeros(1000)
    for _ in range(4):
        g = rng.standard_normal(1000).astype(dtype)
        idx, vals = topk_sparsify(g, r, 50)
        ri, rv, rr = ref_topk_sparsify(g, rr, 50)
        np.testing.assert_array_equal(idx, ri)
        np.testing.assert_allclose(vals, rv, **tol)
        np.testing.assert_allclose(r, rr, **tol)


def test_error_feedback_loses_nothing(rng):
    g = rng.standard_normal(300)
    r = np.zeros(300)
    idx, vals = topk_sparsify(g, r, 30)
    np.testing.assert_allclose(densify(idx, vals, 300) + r, g, rtol=0, atol=0)


def test_ties_go_to_lower_index_and_k_is_capped():
    r = np.zeros(6)
    idx, vals = topk_sparsify(np.array([1.0, -3.0, 3.0, 0.5, 3.0, 0.0]), r, 2)
    assert idx.tolist() == [1, 2] and vals.tolist() == [-3.0, 3.0]
    assert r.tolist() == [1.0, 0.0, 0.0, 0.5, 3.0, 0.0]
    idx, _ = topk_sparsify(np.ones(3), np.zeros(3), 10)
    assert idx.tolist() == [0, 1, 2]


def test_nan_gradient_is_refused_before_residual_changes():
    r = np.array([1.0, 2.0, 3.0])
    with pytest.raises(KernelInputError, match="NaN or inf"):
        topk_sparsify(np.array([0.0, np.nan, 0.0]), r, 1)
    assert r.tolist() == [1.0, 2.0, 3.0]


def test_sparsify_errors_and_empty():
    with pytest.raises(KernelDtypeError, match="residual must be a float64"):
        topk_sparsify(np.ones(3), np.zeros(3, np.float32), 1)
    with pytest.raises(KernelInputError, match="residual must be C-contiguous"):
        topk_sparsify(np.ones(3), np.zeros(6)[::2], 1)
    with pytest.raises(KernelInputError, match="grad must be 1-D"):
        topk_sparsify(np.ones((3, 1)), np.zeros((3, 1)), 1)
    idx, vals = topk_sparsify(np.zeros(0), np.zeros(0), 3)
    assert idx.size == vals.size == 0
    for bad in (3, -1):
        with pytest.raises(KernelInputError, match=r"indices must be in \[0, 3\)"):
            densify(np.array([bad]), np.array([1.0]), 3)


def _magnitudes(case, n, dtype, rng):
    if case == "normal":
        return np.abs(rng.standard_normal(n)).astype(dtype)
    if case == "ties":  # few distinct values: the k-th sits inside a run of equal keys
        return np.round(np.abs(rng.standard_normal(n)), 1).astype(dtype)
    if case == "zeros":
        return np.zeros(n, dtype)
    if case == "narrow":  # one top-level bucket holds everything: the second level runs on
        return (1 + rng.random(n) / 64).astype(dtype)  # all of it, in parallel slices
    if case == "wide":  # subnormals to huge, and the largest finite value
        x = np.abs(rng.standard_normal(n)) * 10.0 ** rng.integers(-300, 300, n)
        x = np.minimum(x, np.finfo(dtype).max).astype(dtype)
        x[::1000] = np.finfo(dtype).max
        x[1::1000] = np.finfo(dtype).smallest_subnormal
        return x
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["normal", "ties", "zeros", "narrow", "wide"])
@pytest.mark.parametrize("n", [1, 1000, compress._SMALL_SELECT, 100_003,
                               compress._WIDE_DIGIT_MIN + 5])
def test_kth_largest_is_exact(case, n, dtype, rng):
    # the radix select (sizes from _SMALL_SELECT up; levels of 16 bits over
    # _WIDE_DIGIT_MIN keys, else 11, or 13 for a float64's first) and np.partition below
    x = _magnitudes(case, n, dtype, rng)
    want = np.sort(x)[::-1]
    for k in sorted(k for k in {1, 2, n // 3 + 1, n // 2 + 1, n - 1, n} if 1 <= k <= n):
        got = compress._kth_largest(x.copy(), k)
        assert got == want[k - 1], (case, n, k)
        assert got.dtype == x.dtype


MODES = ["two-pass", "one-pass", "out", "out-nt"]


def sparsify_mode(g, r, k, mode):
    """topk_sparsify in one of its three modes, always leaving the new residual in r. The
    out= mode writes into a misaligned slice (so the scalar peel before the 64-byte
    non-temporal blocks runs) and must not touch r itself."""
    if not mode.startswith("out"):
        return topk_sparsify(g, r, k, one_pass=mode == "one-pass")
    before = r.copy()
    spare = np.full(r.size + 1, 99.0, r.dtype)[1:]
    saved = _simd.NT_MIN_BYTES
    if mode == "out-nt":  # non-temporal stores even for this small vector (x86-64 only)
        _simd.NT_MIN_BYTES = 0
    try:
        res = topk_sparsify(g, r, k, out=spare)
    finally:
        _simd.NT_MIN_BYTES = saved
    np.testing.assert_array_equal(r, before)
    r[...] = spare
    return res


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 2000, 30000])
def test_topk_sparsify_threshold_path_matches_reference(k, mode, dtype, tol, rng, monkeypatch):
    # n >= 65536 and k <= n / 8 take the sampled-threshold path (k = 1 only with the
    # one-pass pool for small k turned off)
    monkeypatch.setattr(compress, "POOL_MAX_N", 0)
    n = 200_003
    r = np.zeros(n, dtype)
    rr = np.zeros(n)
    for step in range(3):
        g = rng.standard_normal(n).astype(dtype)
        g[::997] = np.round(g[::997])  # exact ties at the threshold, for small k too
        if step == 2:
            g[rng.integers(0, n, 50)] = 40.0  # a spike the strided sample likely misses
        idx, vals = sparsify_mode(g, r, k, mode)
        ri, rv, rr = ref_topk_sparsify(g, rr, k)
        np.testing.assert_array_equal(idx, ri)
        np.testing.assert_allclose(vals, rv, **tol)
        np.testing.assert_allclose(r, rr, **tol)


@pytest.mark.parametrize("case", ["normal", "ties", "zeros", "ascending", "descending"])
@pytest.mark.parametrize("n", [1, 7, 100, 1000, 2047])
def test_kth_in_place_is_exact(case, n, dtype, rng):
    # the small pool's quickselect: runs of equal keys, and orders that defeat a naive pivot
    x = _magnitudes("ties" if case == "ties" else "normal", n, dtype, rng)
    if case == "zeros":
        x[:] = 0
    elif case == "ascending":
        x.sort()
    elif case == "descending":
        x[::-1].sort()
    want = np.sort(x)[::-1]
    for k in sorted(k for k in {1, 2, n // 3 + 1, n // 2 + 1, n - 1, n} if 1 <= k <= n):
        a = np.concatenate([x, [np.inf]]).astype(dtype)  # entries past n are not looked at
        assert compress._kth_in_place(a, n, k) == want[k - 1], (case, n, k)
        np.testing.assert_array_equal(np.sort(a[:n]), np.sort(x))  # a permutation


def _pool_data(case, n, rng):
    g = rng.standard_normal(n)
    if case == "ascending":  # every block passes the cut: the pool fills and is cut often
        g = np.sort(np.abs(g))
    elif case == "descending":  # the first blocks hold the answer: nothing passes later
        g = -np.sort(np.abs(g))[::-1]
    elif case == "ties":  # few distinct values: ties at the cut and at the threshold
        g = np.round(g * 2) / 2
    elif case == "zeros":
        g = np.zeros(n)
    return g


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["normal", "ascending", "descending", "ties", "zeros"])
@pytest.mark.parametrize("n, k", [(5, 5), (33, 1), (1000, 8), (4099, 3),
                                  ((1 << 16) + 7, 16), (1 << 17, 32)])
def test_topk_sparsify_pool_path_matches_reference(n, k, case, mode, dtype, tol, rng,
                                                  monkeypatch):
    # small k (_pool_max_k) over up to POOL_MAX_N entries: one pass through _pool_kth,
    # then _select; neither the select over all magnitudes nor the sampled threshold may run
    assert n <= compress.POOL_MAX_N and k <= compress._pool_max_k(n)
    for other in ("_accumulate_abs", "_topk_by_threshold"):
        monkeypatch.setattr(compress, other, lambda *a: pytest.fail(f"{other} ran"))
    r = (rng.standard_normal(n) * (case == "normal")).astype(dtype)
    rr = r.astype(np.float64)
    for _ in range(2):
        g = _pool_data(case, n, rng).astype(dtype)
        idx, vals = sparsify_mode(g, r, k, mode)
        ri, rv, rr = ref_topk_sparsify(g, rr, k)
        np.testing.assert_array_equal(idx, ri)
        np.testing.assert_allclose(vals, rv, **tol)
        np.testing.assert_allclose(r, rr, **tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", [0, 100, 5000, 70000, (1 << 17) - 6])
@pytest.mark.parametrize("bad", [np.nan, np.inf, "overflow"])
def test_topk_sparsify_pool_path_refuses_nan_inf_and_overflow(where, bad, mode, dtype, rng):
    # in the pool's first fill, in a later block (past the cut, or not), in the tail:
    # refused, and in every mode (one_pass too, on this path) residual is unchanged
    n = (1 << 17) - 5
    assert 16 <= compress._pool_max_k(n) and n <= compress.POOL_MAX_N
    g = rng.standard_normal(n).astype(dtype)
    r = rng.standard_normal(n).astype(dtype)
    if bad == "overflow":  # both finite, their sum is not
        g[where] = r[where] = np.finfo(dtype).max
    else:
        g[where] = bad
    before = r.copy()
    with pytest.raises(KernelInputError, match="NaN or inf"):
        sparsify_mode(g, r, 16, mode)
    np.testing.assert_array_equal(r, before)


@pytest.mark.parametrize("mode", MODES)
def test_topk_sparsify_chosen_at_chunk_and_block_edges(mode, rng):
    # the two-pass mode zeroes the chosen entries block by block as it adds grad in:
    # the largest entries sit on the first and last entry of every chunk and block
    n = 200_003
    g = rng.standard_normal(n) * 1e-3
    edges = {0, n - 1}
    nch = compress.n_chunks(n, min_rows=1 << 14)
    for c in range(nch):
        lo, hi = compress.chunk_bounds(n, nch, c)
        edges.update(range(lo, hi, compress._ZERO_BLOCK))
        edges.update(b - 1 for b in range(lo + compress._ZERO_BLOCK, hi, compress._ZERO_BLOCK))
        edges.update({lo, hi - 1})
    edges = np.array(sorted(edges))
    g[edges] = 10 + rng.random(edges.size)
    r = np.zeros(n)
    idx, vals = sparsify_mode(g, r, edges.size, mode)
    np.testing.assert_array_equal(idx, edges)
    np.testing.assert_array_equal(vals, g[edges])
    expect = g.copy()
    expect[edges] = 0
    np.testing.assert_array_equal(r, expect)


@pytest.mark.parametrize("itemsize", [4, 8])
def test_threshold_sample_is_whole_lines_of_about_n_over_32(itemsize):
    # 16384 entries at least (n = 2^16: a quarter of it, where it had been all of it),
    # n / 32 between, 65536 at most; whole 64-byte lines, spread over the whole vector
    for n, want in [(1 << 16, 16384), (100_003, 16384), (1 << 20, 32768), (1 << 21, 65536),
                    (1 << 25, 65536)]:
        pos, stride, block = compress._sample_layout(n, itemsize)
        assert block * itemsize == 64
        assert abs(pos * block - want) < block, (n, pos * block)
        assert pos * stride <= n < pos * (stride + 1) and block <= stride


@pytest.mark.parametrize("mode", MODES)
def test_topk_sparsify_threshold_path_sample_misses_and_nan(mode, rng):
    n = 1 << 17
    pos, stride, block = compress._sample_layout(n, 8)
    i = np.arange(n)
    unseen = np.flatnonzero((i % stride >= block) | (i // stride >= pos))[::32]
    assert unseen.size >= 1000
    g = np.zeros(n)
    g[unseen] = np.arange(1, unseen.size + 1)  # the threshold sample sees only zeros
    r = np.zeros(n)
    # one-pass: the candidate scan already added g into r when the sample proves wrong;
    # the exact path must then finish on r alone, not add g twice
    idx, vals = sparsify_mode(g, r, 100, mode)
    np.testing.assert_array_equal(idx, np.sort(np.argsort(-g, kind="stable")[:100]))
    np.testing.assert_array_equal(r + densify(idx, vals, n), g)
    if mode == "one-pass":
        g2 = rng.standard_normal(n)
        g2[12345] = np.inf
        r2 = rng.standard_normal(n)
        expect = r2 + g2
        with pytest.raises(KernelInputError, match="one_pass=True: residual already holds"):
            topk_sparsify(g2, r2, 100, one_pass=True)
        np.testing.assert_array_equal(r2, expect)  # as documented: residual absorbed grad
        return
    for pos in (0, 12345):  # NaN inside and outside the sample
        g2 = rng.standard_normal(n)
        g2[pos] = np.nan
        r2 = rng.standard_normal(n)
        before = r2.copy()
        with pytest.raises(KernelInputError, match="NaN or inf"):
            if mode.startswith("out"):
                topk_sparsify(g2, r2, 100, out=np.empty_like(r2))
            else:
                topk_sparsify(g2, r2, 100)
        np.testing.assert_array_equal(r2, before)


@pytest.mark.parametrize("n", [1000, 200_003])  # exact path, threshold path
def test_error_feedback_matches_reference_and_survives_a_refused_step(n, dtype, tol, rng):
    ef = ErrorFeedback(n, dtype)
    rr = np.zeros(n)
    for _ in range(3):
        g = rng.standard_normal(n).astype(dtype)
        idx, vals = ef.step(g, n // 50)
        ri, rv, rr = ref_topk_sparsify(g, rr, n // 50)
        np.testing.assert_array_equal(idx, ri)
        np.testing.assert_allclose(vals, rv, **tol)
        np.testing.assert_allclose(ef.residual, rr, **tol)
    before = ef.residual.copy()
    bad = rng.standard_normal(n).astype(dtype)
    bad[n // 3] = np.inf
    with pytest.raises(KernelInputError, match="NaN or inf"):
        ef.step(bad, n // 50)
    np.testing.assert_array_equal(ef.residual, before)
    idx, vals = ef.step(g, n // 50)  # and the next good step carries on from there
    ri, rv, _ = ref_topk_sparsify(g, before.astype(np.float64), n // 50)
    np.testing.assert_array_equal(idx, ri)


def test_out_mode_errors():
    g, r = np.ones(8), np.zeros(8)
    with pytest.raises(KernelInputError, match="not both"):
        topk_sparsify(g, r, 1, one_pass=True, out=np.zeros(8))
    with pytest.raises(KernelInputError, match="out must not overlap residual"):
        topk_sparsify(g, r, 1, out=r)
    with pytest.raises(KernelInputError, match="out must not overlap"):
        topk_sparsify(g, r, 1, out=g)
    with pytest.raises(KernelInputError, match="out must have shape"):
        topk_sparsify(g, r, 1, out=np.zeros(9))
    with pytest.raises(KernelInputError, match="size must be"):
        ErrorFeedback(0)
    with pytest.raises(KernelInputError, match="dtype must be float32 or float64"):
        ErrorFeedback(4, np.int32)
    ef = ErrorFeedback(8, np.float32)  # the errors name grad, not the internal buffers
    with pytest.raises(KernelDtypeError, match="grad has dtype float64 but must match"):
        ef.step(np.ones(8), 1)
    with pytest.raises(KernelInputError, match=r"grad must have shape \(8,\)"):
        ef.step(np.ones(9, np.float32), 1)
    assert not ef.residual.any()
    assert r.tolist() == [0.0] * 8
