"""Bias + GELU + layer norm fused (kernels.fused) against NumPy and the separate kernels;
the training app's model gradient against a NumPy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kernels import _chunks, fused, nn
from kernels.errors import KernelInputError

_erf = np.vectorize(math.erf)


def ref_forward(z, b, g, beta, eps=1e-5):
    """float64 ``(a, h, mean, rstd)`` of ``layer_norm(gelu(z + b))``."""
    u = z.astype(np.float64) + b
    a = 0.5 * u * (1 + _erf(u / math.sqrt(2)))
    mu = a.mean(axis=1)
    rstd = 1 / np.sqrt(a.var(axis=1) + eps)
    return a, (a - mu[:, None]) * rstd[:, None] * g + beta, mu, rstd


def ref_backward(dh, z, b, g, eps=1e-5):
    """float64 ``(dz, db, dgamma, dbeta)`` for the upstream gradient ``dh``."""
    a, _, mu, rstd = ref_forward(z, b, g, np.zeros_like(g), eps)
    u = z.astype(np.float64) + b
    xh = (a - mu[:, None]) * rstd[:, None]
    dh = dh.astype(np.float64)
    gx = dh * g
    da = rstd[:, None] * (gx - gx.mean(axis=1, keepdims=True)
                          - xh * (gx * xh).mean(axis=1, keepdims=True))
    dgelu = 0.5 * (1 + _erf(u / math.sqrt(2))) + u * np.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    dz = da * dgelu
    return dz, dz.sum(axis=0), (dh * xh).sum(axis=0), dh.sum(axis=0)


def _inputs(rng, n, d, dt, scale=3.0):
    z = (scale * rng.standard_normal((n, d))).astype(dt)
    b = rng.standard_normal(d).astype(dt)
    g = (1 + 0.2 * rng.standard_normal(d)).astype(dt)
    beta = (0.3 * rng.standard_normal(d)).astype(dt)
    dh = rng.standard_normal((n, d)).astype(dt)
    return z, b, g, beta, dh


def _close(got, want, dtype, tol, what):
    # gradients summed over rows grow with the row count: scale atol by the largest value
    atol = tol["atol"] * max(1.0, float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=atol, err_msg=what)
    assert got.dtype == dtype, what


@pytest.fixture(params=["rows", "auto"])
def fused_rows(request, monkeypatch):
    """"rows": every width through the fused row loops (short rows too, which by default
    go to the separate kernels); "auto": as the library chooses."""
    if request.param == "rows":
        monkeypatch.setattr(fused, "SEPARATE_BELOW_FEATURES", 0)
        monkeypatch.setattr(fused, "SEPARATE_FORWARD_BELOW_FEATURES", 0)
    return request.param


# (rows, features): whole 256-byte blocks, a masked tail block, a row shorter than one
# vector, a long row; several chunks of rows (more rows than 16 a chunk); a few wide rows
# split into chunks of fewer than 16 rows (each a chunk forward, one per thread backward)
SHAPES = [(64, 256), (37, 100), (5, 7), (3, 1000), (200, 64), (5, 9000)]


@pytest.mark.parametrize("n,d", SHAPES)
def test_matches_the_reference(n, d, dtype, tol, rng, gelu_path, fused_rows):
    # scale 3: float64 lanes past |z| = 4.99 are put aside and finished in batches
    z, b, g, beta, dh = _inputs(rng, n, d, dtype)
    a, h, mu, rstd = fused.bias_gelu_layer_norm(z, b, g, beta)
    for got, want, what in zip((a, h, mu, rstd), ref_forward(z, b, g, beta),
                               ("a", "h", "mean", "rstd")):
        _close(got, want, dtype, tol, what)
    grads = fused.bias_gelu_layer_norm_backward(dh, a, z, b, g, mu, rstd)
    for got, want, what in zip(grads, ref_backward(dh, z, b, g), ("dz", "db", "dgamma", "dbeta")):
        _close(got, want, dtype, tol, what)


def test_few_wide_rows_are_split_over_the_threads(monkeypatch):
    # 16 rows a chunk left a few wide rows on one thread (0.61-0.73x the separate kernels)
    for mod in (fused, _chunks):
        monkeypatch.setattr(mod, "num_threads", lambda: 2)
    assert fused._fwd_chunks(5, 9000) == 5 and fused._fwd_chunks(16, 16384) == 8
    assert fused._fwd_chunks(1024, 256) == fused._fwd_chunks(1024, 1024) == 8
    assert fused._bwd_chunks(5, 9000) == 2 and fused._bwd_chunks(8, 32768) == 2
    assert fused._bwd_chunks(3, 1000) == 1 and fused._bwd_chunks(64, 256) == 4


def test_agrees_with_the_separate_kernels(dtype, tol, rng, gelu_path):
    z, b, g, beta, dh = _inputs(rng, 300, 384, dtype)
    a, h, mu, rstd = fused.bias_gelu_layer_norm(z, b, g, beta)
    a0 = nn.bias_act(z, b, "gelu")
    h0, mu0, rstd0 = nn.layer_norm(a0, g, beta)
    if gelu_path != "portable":  # the same GELU blocks (the loops here may contract differently)
        np.testing.assert_array_equal(a, a0)
    _close(a, a0, dtype, tol, "a")
    for got, want in ((h, h0), (mu, mu0), (rstd, rstd0)):
        _close(got, want, dtype, tol, "forward")
    dz, db, dg, dbeta = fused.bias_gelu_layer_norm_backward(dh, a, z, b, g, mu, rstd)
    da0, dg0, dbeta0 = nn.layer_norm_backward(dh, a0, g, mu0, rstd0)
    dz0, db0 = nn.bias_act_backward(da0, z, b, "gelu")
    for got, want, what in ((dz, dz0, "dz"), (db, db0, "db"), (dg, dg0, "dgamma"),
                            (dbeta, dbeta0, "dbeta")):
        _close(got, want, dtype, tol, what)


@pytest.mark.parametrize("d", [1, 10, 64, fused.SEPARATE_BELOW_FEATURES - 1])
def test_short_rows_are_the_separate_kernels_results(d, dtype, rng, gelu_path):
    # rows of few features go through bias_act and layer_norm (and their backwards): the
    # fused loops took them row by row, 1.6-3.3x slower at 16-32 features
    z, b, g, beta, dh = _inputs(rng, 333, d, dtype)
    got = fused.bias_gelu_layer_norm(z, b, g, beta)
    a0 = nn.bias_act(z, b, "gelu")
    for x, want in zip(got, (a0, *nn.layer_norm(a0, g, beta))):
        np.testing.assert_array_equal(x, want)
    a, _, mu, rstd = got
    grads = fused.bias_gelu_layer_norm_backward(dh, a, z, b, g, mu, rstd)
    da0, dg0, dbeta0 = nn.layer_norm_backward(dh, a, g, mu, rstd)
    for x, want in zip(grads, (*nn.bias_act_backward(da0, z, b, "gelu"), dg0, dbeta0)):
        np.testing.assert_array_equal(x, want)


def test_the_forward_goes_separate_below_its_own_width(dtype, rng):
    # the forward's fused loops pay from 256 features, the backward's from 128
    d = fused.SEPARATE_FORWARD_BELOW_FEATURES - 1
    assert d >= fused.SEPARATE_BELOW_FEATURES
    z, b, g, beta, _ = _inputs(rng, 50, d, dtype)
    a0 = nn.bias_act(z, b, "gelu")
    for x, want in zip(fused.bias_gelu_layer_norm(z, b, g, beta),
                       (a0, *nn.layer_norm(a0, g, beta))):
        np.testing.assert_array_equal(x, want)


def test_float32_parameter_gradients_over_many_rows(rng, gelu_path, fused_rows):
    # 20000 rows (8 chunks): float32 shares are moved into float64 sums every 16 rows, so
    # dgamma, dbeta stay at float32 accuracy (summed in float32 alone they drift)
    dt = np.dtype(np.float32)
    z, b, g, beta, dh = _inputs(rng, 20000, 48, dt, scale=1.0)
    dh += 1.0  # a common offset: the sums grow with the row count
    a, _, mu, rstd = fused.bias_gelu_layer_norm(z, b, g, beta)
    _, _, dg, dbeta = fused.bias_gelu_layer_norm_backward(dh, a, z, b, g, mu, rstd)
    _, _, dg_ref, dbeta_ref = ref_backward(dh, z, b, g)
    # moved every 16 rows: within 1e-7 here; all 2500 rows of a chunk in float32: 1e-6
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=3e-7)
    np.testing.assert_allclose(dg, dg_ref, rtol=0, atol=3e-7 * np.abs(dg_ref).max())


def test_a_nan_stays_in_its_row(dtype, rng, gelu_path, fused_rows):
    z, b, g, beta, dh = _inputs(rng, 40, 70, dtype)
    z[7, 3] = np.nan
    a, h, mu, rstd = fused.bias_gelu_layer_norm(z, b, g, beta)
    assert np.isnan(h[7]).all() and np.isnan(mu[7])
    rest = np.delete(np.arange(40), 7)
    assert np.isfinite(h[rest]).all() and np.isfinite(a[rest]).all()
    dz, _, _, _ = fused.bias_gelu_layer_norm_backward(dh, a, z, b, g, mu, rstd)
    assert np.isnan(dz[7]).all() and np.isfinite(dz[rest]).all()


def test_strided_and_fortran_inputs_give_the_same_results(dtype, rng, fused_rows):
    z, b, g, beta, dh = _inputs(rng, 30, 40, dtype)
    want = fused.bias_gelu_layer_norm(z, b, g, beta)
    wide = np.zeros((30, 80), dtype)
    wide[:, ::2] = z
    for zz in (wide[:, ::2], np.asfortranarray(z)):
        for got, w in zip(fused.bias_gelu_layer_norm(zz, b, g, beta), want):
            np.testing.assert_array_equal(got, w)
    a, _, mu, rstd = want
    grads = fused.bias_gelu_layer_norm_backward(dh, a, z, b, g, mu, rstd)
    strided = fused.bias_gelu_layer_norm_backward(np.asfortranarray(dh), a, wide[:, ::2],
                                                  b, g, mu, rstd)
    for got, w in zip(strided, grads):
        np.testing.assert_array_equal(got, w)


def test_empty_inputs(dtype):
    v = np.ones(8, dtype)
    a, h, mu, rstd = fused.bias_gelu_layer_norm(np.empty((0, 8), dtype), v, v, v)
    assert a.shape == h.shape == (0, 8) and mu.shape == rstd.shape == (0,)
    dz, db, dg, dbeta = fused.bias_gelu_layer_norm_backward(
        np.empty((0, 8), dtype), a, np.empty((0, 8), dtype), v, v, mu, rstd)
    assert dz.shape == (0, 8)
    for grad in (db, dg, dbeta):
        np.testing.assert_array_equal(grad, np.zeros(8, dtype))
    e = np.empty(0, dtype)
    _, _, mu, rstd = fused.bias_gelu_layer_norm(np.empty((3, 0), dtype), e, e, e)
    assert np.isnan(mu).all() and np.isnan(rstd).all()  # as nn.layer_norm


def test_bad_arguments_are_named(rng):
    # each message starts with the argument's name (KernelDtypeError is a KernelInputError)
    z, b, g, beta, dh = _inputs(rng, 4, 6, np.float32)
    with pytest.raises(KernelInputError, match="^z "):
        fused.bias_gelu_layer_norm(z.astype(np.int32), b, g, beta)
    with pytest.raises(KernelInputError, match="^z "):
        fused.bias_gelu_layer_norm(z[0], b, g, beta)  # 1-D
    with pytest.raises(KernelInputError, match="^b "):
        fused.bias_gelu_layer_norm(z, b[:5], g, beta)
    with pytest.raises(KernelInputError, match="^gamma "):
        fused.bias_gelu_layer_norm(z, b, g.astype(np.float64), beta)
    with pytest.raises(KernelInputError, match="^eps "):
        fused.bias_gelu_layer_norm(z, b, g, beta, eps=-1.0)
    a, _, mu, rstd = fused.bias_gelu_layer_norm(z, b, g, beta)
    with pytest.raises(KernelInputError, match="^dh "):
        fused.bias_gelu_layer_norm_backward(dh[:3], a, z, b, g, mu, rstd)
    with pytest.raises(KernelInputError, match="^a "):
        fused.bias_gelu_layer_norm_backward(dh, a.astype(np.float64), z, b, g, mu, rstd)
    with pytest.raises(KernelInputError, match="^rstd "):
        fused.bias_gelu_layer_norm_backward(dh, a, z, b, g, mu, rstd[:3])


def test_the_training_models_gradient_matches_numpy(rng):
    """The app's whole backward (``kernels.apps._mlp.loss_and_grad``: products, fused bias
    + GELU + layer norm, softmax + cross-entropy) against the same model written in
    float64 NumPy."""
    from kernels.apps import _mlp

    shapes = _mlp.Shapes(features=12, hidden=40, classes=5)
    flat = _mlp.init_params(shapes, 3, np.dtype(np.float64))
    flat += 0.1 * rng.standard_normal(flat.size)  # biases and beta away from 0
    x = rng.standard_normal((96, 12))
    y = rng.integers(0, 5, 96)
    grad = np.zeros_like(flat)
    loss, _ = _mlp.loss_and_grad(flat, shapes, x, y, grad, denom=96)

    p = _mlp.views(flat, shapes)
    z1 = x @ p["w1"]
    _, h, _, _ = ref_forward(z1, p["b1"], p["gamma"], p["beta"])
    logits = h @ p["w2"] + p["b2"]
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    want_loss = (lse - logits[np.arange(96), y]).sum()
    dlog = np.exp(logits - lse[:, None])
    dlog[np.arange(96), y] -= 1
    dlog /= 96
    dz1, db1, dgamma, dbeta = ref_backward(dlog @ p["w2"].T, z1, p["b1"], p["gamma"])
    want = {"w1": x.T @ dz1, "b1": db1, "gamma": dgamma, "beta": dbeta, "w2": h.T @ dlog,
            "b2": dlog.sum(axis=0)}
    assert loss == pytest.approx(want_loss, rel=1e-12)
    got = _mlp.views(grad, shapes)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-10, atol=1e-12, err_msg=name)
