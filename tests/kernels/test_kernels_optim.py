"""Fused AdamW against a plain NumPy AdamW (PyTorch's formulation)."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.errors import KernelDtypeError, KernelInputError
from kernels.optim import AdamW, adamw_step

HP = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1}


def ref_adamw(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    mhat = m / (1 - beta1**step)
    vhat = v / (1 - beta2**step)
    return p - lr * mhat / (np.sqrt(vhat) + eps), m, v


def test_matches_reference_over_steps(dtype, tol, rng):
    p = rng.standard_normal((37, 5)).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    rp, rm, rv = p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
    for step in range(1, 6):
        g = rng.standard_normal(p.shape).astype(dtype)
        adamw_step(p, g, m, v, step=step, **HP)
        rp, rm, rv = ref_adamw(rp, g.astype(np.float64), rm, rv, step, **HP)
    assert p.dtype == dtype
    np.testing.assert_allclose(p, rp, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    np.testing.assert_allclose(m, rm, **tol)
    np.testing.assert_allclose(v, rv, **tol)


def test_grads_just_behind_the_params_go_through_a_buffer_with_the_same_results(
        dtype, rng, monkeypatch):
    # params 16 bytes past the grads modulo 64 KiB (grads allocated right before params
    # of a power-of-two size): on Intel hosts the update reads the grads through a
    # per-thread buffer, and every element comes out as the plain loop makes it
    from kernels import optim
    from kernels._checks import empty_placed
    from kernels.config import _cpu_vendor

    n = optim._PEEL_MIN + 3 * optim._GRAD_STAGE + 7  # a partial piece at the end
    g = rng.standard_normal(n).astype(dtype)
    p = empty_placed(g, 16, optim._ALIAS_PERIOD)
    assert optim._grads_alias(g, p) and not optim._grads_alias(p, g)
    p[:] = rng.standard_normal(n)
    m, v = rng.standard_normal(n).astype(dtype), rng.random(n).astype(dtype)
    want = [a.copy() for a in (p, g, m, v)]
    monkeypatch.setattr(optim, "_ALIAS_BYTES", 0)  # the plain loop, for the reference
    adamw_step(*want, step=4, **HP)
    monkeypatch.undo()
    calls = []
    staged = optim._adamw_staged
    monkeypatch.setattr(optim, "_adamw_staged", lambda *a: calls.append(1) or staged(*a))
    # the buffer is taken on Intel hosts only (where it was measured to pay); here it
    # runs whatever the host, and the host's own setting picks the plain loop elsewhere
    assert optim.STAGE_ALIASED_GRADS is (_cpu_vendor() == "GenuineIntel")
    monkeypatch.setattr(optim, "STAGE_ALIASED_GRADS", False)
    adamw_step(*[a.copy() for a in (p, g, m, v)], step=4, **HP)
    assert calls == []
    monkeypatch.setattr(optim, "STAGE_ALIASED_GRADS", True)
    adamw_step(p, g, m, v, step=4, **HP)
    assert calls == [1]
    for got, ref in zip((p, m, v), (want[0], want[2], want[3])):
        np.testing.assert_array_equal(got, ref)


def test_float32_blocks_that_ask_ahead_give_the_plain_loops_bits(dtype, rng, monkeypatch):
    # where ROW_HINTS is on, a large float32 step runs in blocks that first ask for the
    # lines ahead (_adamw_hinted): the same arithmetic per element, so every element as
    # the plain loop makes it; sizes that are no multiple of the block or of the chunks.
    # The blocks run here whatever the host (where the hints are off they compile to
    # nothing); float64 keeps the plain loop (the hints cost there)
    from kernels import optim

    n = 8 * optim._HINT_BLOCK * 3 + 37
    arrs = [rng.standard_normal(n).astype(dtype) for _ in range(3)]
    arrs.append(rng.random(n).astype(dtype))
    t = dtype.type
    consts = (t(0.999), t(1e-3), t(0.9), t(0.1), t(0.99), t(0.01), t(1.2), t(1e-8))
    want = [a.copy() for a in arrs]
    optim._adamw(*want, *consts, 2)
    for nch in (1, 3, 8):
        got = [a.copy() for a in arrs]
        optim._adamw_hinted(*got, *consts, nch)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    calls = []
    hinted = optim._adamw_hinted
    monkeypatch.setattr(optim, "ROW_HINTS", True)
    monkeypatch.setattr(optim, "_HINT_MIN_BYTES", optim._PEEL_MIN)
    monkeypatch.setattr(optim, "_adamw_hinted", lambda *a: calls.append(1) or hinted(*a))
    big = [rng.standard_normal(optim._PEEL_MIN + 5).astype(dtype) for _ in range(4)]
    big[3] = np.abs(big[3])
    want = [a.copy() for a in big]
    monkeypatch.setattr(optim, "ROW_HINTS", False)
    adamw_step(*want, step=2, **HP)
    monkeypatch.setattr(optim, "ROW_HINTS", True)
    adamw_step(*big, step=2, **HP)
    assert len(calls) == (1 if dtype == np.float32 else 0)
    for a, b in zip(big, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("offset", [16, 8, 0])
def test_large_arrays_off_a_cache_line_peel_the_head_and_match(dtype, tol, rng, offset):
    # every array 16 (or 8) bytes past a 64-byte boundary: the first elements go through
    # the one-thread head loop, the rest through the parallel one from the boundary on;
    # offsets that differ between the arrays (the last case's grads) skip the peel
    from kernels import empty_aligned, optim

    n = optim._PEEL_MIN + 1001
    arrs = []
    for i in range(4):
        a = empty_aligned(n + 16, dtype)[offset // dtype.itemsize:][:n]
        a[:] = np.abs(rng.standard_normal(n)) if i == 3 else rng.standard_normal(n)
        arrs.append(a)
    if offset == 0:
        arrs[1] = np.concatenate([arrs[1][:1], arrs[1]])[1:]  # another offset in its line
    p, g, m, v = arrs
    head = optim._aligned_head(arrs)
    assert head == (0 if offset == 0 else (64 - offset) // dtype.itemsize)
    rp, rm, rv = ref_adamw(p.astype(np.float64), g.astype(np.float64), m.astype(np.float64),
                           v.astype(np.float64), 3, **HP)
    adamw_step(p, g, m, v, step=3, **HP)
    np.testing.assert_allclose(p, rp, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    np.testing.assert_allclose(m, rm, **tol)
    np.testing.assert_allclose(v, rv, **tol)


def test_adamw_state_sits_at_the_params_offset(dtype, rng):
    # the moments are allocated at the params' offset in a cache line, so a step over a
    # large buffer takes the aligned road (see kernels.optim._aligned_head)
    from kernels import optim

    p = rng.standard_normal(optim._PEEL_MIN + 3).astype(dtype)
    opt = AdamW(p)
    assert opt.exp_avg.ctypes.data % 64 == opt.exp_avg_sq.ctypes.data % 64 == p.ctypes.data % 64
    assert not opt.exp_avg.any() and not opt.exp_avg_sq.any()
    assert optim._aligned_head([p, p, opt.exp_avg, opt.exp_avg_sq]) == (
        (64 - p.ctypes.data % 64) % 64 // p.itemsize)


def test_large_adamw_state_sits_far_from_the_params_in_memory(dtype, rng, monkeypatch):
    # NumPy's large arrays land a few KiB apart modulo a large power of two, where the
    # 7-stream update ran 1.4-2x slower on two hosts (kernels.optim._moment_buffers); the
    # optimizer's own moments are placed well away from the params modulo every power of
    # two from the params' size up, still at their cache-line offset
    from kernels import optim

    monkeypatch.setattr(optim, "_SPREAD_MIN_BYTES", 0)  # a small array takes the road too
    p = rng.standard_normal((3, optim._PEEL_MIN // 3 + 5)).astype(dtype)
    g = rng.standard_normal(p.shape).astype(dtype)
    opt = AdamW(p.copy(), lr=0.01)
    m, v = opt.exp_avg, opt.exp_avg_sq
    period = optim._spread_period(p.nbytes)
    assert p.nbytes <= period < 2 * p.nbytes

    def apart(a, b, q):  # distance between two buffers' starts, modulo q
        d = (a.ctypes.data - b.ctypes.data) % q
        return min(d, q - d)

    q = 1 << 12  # a third of the way round (less 64 bytes) modulo every power of two
    while q <= 1 << 30:
        for a, b in ((m, opt.params), (v, opt.params), (m, v)):
            assert apart(a, b, q) >= min(q, period) // 3 - 64, (q, period)
        q *= 2
    assert m.ctypes.data % 64 == v.ctypes.data % 64 == opt.params.ctypes.data % 64
    assert m.shape == v.shape == p.shape and m.dtype == v.dtype == p.dtype
    assert m.flags.c_contiguous and m.flags.writeable and not m.any() and not v.any()
    opt.step(g)
    ref, rm, rv = p.copy(), np.zeros_like(p), np.zeros_like(p)
    adamw_step(ref, g, rm, rv, step=1, lr=0.01)
    tol = dict(rtol=1e-6) if dtype == np.float32 else dict(rtol=1e-13)
    np.testing.assert_allclose(opt.params, ref, **tol)
    np.testing.assert_allclose(m, rm, **tol)
    np.testing.assert_allclose(v, rv, **tol)


def test_moment_placement_period_is_the_power_of_two_at_or_above_the_params():
    from kernels import optim

    assert optim._spread_period(1 << 20) == 1 << 20
    assert optim._spread_period((1 << 20) + 8) == 2 << 20
    assert optim._spread_period(3 << 20) == 4 << 20
    assert optim._spread_period(1 << 30) == optim._SPREAD_PERIOD == 64 << 20
    assert optim._SPREAD_MIN_BYTES == 1 << 20  # smaller params: no placement


def test_non_contiguous_arrays_are_updated_in_place(rng):
    base = rng.standard_normal((8, 6))
    p = base[:, ::2]  # strided view: the update must land in ``base``
    m, v = np.zeros((8, 6))[:, ::2], np.zeros((8, 6))[:, ::2]
    g = rng.standard_normal((6, 8)).T[:, :3]
    expect, _, _ = ref_adamw(p.copy(), g, 0 * p, 0 * p, 1, **HP)
    adamw_step(p, g, m, v, step=1, **HP)
    np.testing.assert_allclose(base[:, ::2], expect, rtol=1e-12)
    assert np.all(m != 0) and np.all(v != 0)


def test_nan_gradient_poisons_only_its_element():
    p, m, v = np.ones(4), np.zeros(4), np.zeros(4)
    adamw_step(p, np.array([0.1, np.nan, 0.1, 0.1]), m, v, step=1, **HP)
    assert np.isnan(p[1]) and np.isfinite(p[[0, 2, 3]]).all()


def test_empty_is_a_no_op():
    p = np.zeros((0, 3), np.float32)
    adamw_step(p, p.copy(), p.copy(), p.copy(), step=1)
    assert p.shape == (0, 3)


@pytest.mark.parametrize("bad", [np.int64, np.float16])
def test_wrong_dtype_names_the_argument(bad):
    p = np.ones(3)
    with pytest.raises(KernelDtypeError, match="grads"):
        adamw_step(p, np.ones(3, bad), np.zeros(3), np.zeros(3), step=1)
    with pytest.raises(TypeError, match="exp_avg.*float64"):
        adamw_step(p, np.ones(3), np.zeros(3, np.float32), np.zeros(3), step=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"step": 0}, "step"), ({"step": 1, "beta1": 1.0}, "beta1"), ({"step": 1, "lr": -1}, "lr")],
)
def test_bad_hyperparameters_are_refused(kwargs, match):
    with pytest.raises(KernelInputError, match=match):
        adamw_step(np.ones(3), np.ones(3), np.zeros(3), np.zeros(3), **kwargs)


def test_shape_mismatch_and_read_only_are_refused():
    with pytest.raises(KernelInputError, match="grads must have shape"):
        adamw_step(np.ones(3), np.ones(4), np.zeros(3), np.zeros(3), step=1)
    ro = np.ones(3)
    ro.flags.writeable = False
    with pytest.raises(KernelInputError, match="read-only"):
        adamw_step(ro, np.ones(3), np.zeros(3), np.zeros(3), step=1)


def test_adamw_object_counts_steps(rng):
    opt = AdamW(np.ones(10), lr=0.1, weight_decay=0.0)
    for _ in range(3):
        opt.step(np.full(10, 2.0))
    # constant gradient: each bias-corrected step moves by ~lr
    np.testing.assert_allclose(opt.params, 1 - 0.3, rtol=1e-6)
    assert opt.step_count == 3


@pytest.mark.parametrize("kernel", ["_adamw_head", "_adamw", "_adamw_hinted", "_adamw_staged"])
def test_moments_decaying_through_the_subnormals_are_flushed(kernel, dtype, rng):
    # a parameter whose gradient stays 0 (an embedding row of an unseen token): its
    # moments decay into the subnormals, where an Intel core takes a microcode assist per
    # vector (20-28x slower). Every kernel runs with them flushed: such a moment comes
    # out 0, the rest as before, and the caller's floating-point mode comes back
    from kernels import optim

    n = 3 * optim._GRAD_STAGE + 37
    tiny = np.finfo(dtype).tiny
    p = rng.standard_normal(n).astype(dtype)
    g = np.zeros(n, dtype)
    m, v = np.full(n, tiny * 0.7, dtype), np.full(n, tiny * 0.3, dtype)
    live = slice(0, n, 5)  # every fifth entry an ordinary one
    g[live] = rng.standard_normal(g[live].size)
    m[live], v[live] = 0.1 * rng.standard_normal(g[live].size), 0.01 * rng.random(g[live].size)
    step = 1000
    rp, rm, rv = ref_adamw(*(a.astype(np.float64) for a in (p, g, m, v)), step, **HP)
    consts = optim._step_consts(dtype, step, **HP)
    extra = () if kernel == "_adamw_head" else (3,)
    getattr(optim, kernel)(p, g, m, v, *consts, *extra)
    for got in (m, v):
        assert not ((got != 0) & (np.abs(got) < tiny)).any()
    assert (m[1::5] == 0).all() and (v[1::5] == 0).all()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(p, rp, **tol)
    np.testing.assert_allclose(m[live], rm[live], **tol)
    np.testing.assert_allclose(v[live], rv[live], **tol)
    assert np.float32(1e-30) * np.float32(1e-10) != 0  # subnormals again in this thread
