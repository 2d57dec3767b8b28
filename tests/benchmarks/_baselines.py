"""What a user would write instead: NumPy/SciPy and PyTorch versions for the benchmark."""

from __future__ import annotations

import math

import numpy as np


def np_adamw(p, g, m, v, step, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=1e-2):
    """In-place NumPy AdamW with few temporaries (the careful way)."""
    p *= 1 - lr * wd
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * (g * g)
    denom = np.sqrt(v)
    denom *= 1 / math.sqrt(1 - b2**step)
    denom += eps
    p -= (lr / (1 - b1**step)) * (m / denom)


def np_xent(x, y):
    m = x.max(axis=1, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float((np.log(s[:, 0]) + m[:, 0] - x[rows, y]).mean())
    e /= s
    e[rows, y] -= 1
    e /= len(y)
    return loss, e


def np_layer_norm(x, g, b, eps=1e-5):
    mu = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def np_gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x * np.float32(1 / math.sqrt(2))).astype(x.dtype))


def np_topk_cosine_raw(q, e, k):
    """NumPy search over raw embeddings: the row norms are part of the call, as ours."""
    return np_topk_cosine(q, e / np.linalg.norm(e, axis=1, keepdims=True), k)


def np_topk_cosine(q, e_normed, k):
    """NumPy search over pre-normalised embeddings (normalising once is not timed)."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = qn @ e_normed.T
    part = np.argpartition(-s, k, axis=1)[:, :k]
    ps = np.take_along_axis(s, part, 1)
    order = np.argsort(-ps, axis=1)
    return np.take_along_axis(ps, order, 1), np.take_along_axis(part, order, 1)


def np_quantize(w):
    scale = np.abs(w).max(axis=1) / 127
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def np_topk_sparsify(g, r, k):
    acc = r + g
    idx = np.sort(np.argpartition(np.abs(acc), acc.size - k)[acc.size - k:])
    vals = acc[idx]
    acc[idx] = 0
    r[...] = acc
    return idx, vals


def torch_topk_sparsify(torch, g, r, k):
    """``np_topk_sparsify`` on tensors: ``r += g`` in place, the ``k`` largest magnitudes
    by ``torch.topk`` (unsorted), their indices sorted ascending as ours are, then taken
    out of ``r``. Unlike ours it does not look for NaN/inf, and ties go to whichever
    ``topk`` returns."""
    acc = r.add_(g)
    idx = torch.sort(torch.topk(acc.abs(), k, sorted=False).indices).values
    vals = acc[idx]
    acc[idx] = 0
    return idx, vals


def torch_baselines():
    """Callables using PyTorch on the CPU, or None when torch is not installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    return torch, F


def torch_nn(tb, x, y, gam, bet, dy) -> dict:
    """PyTorch callables for the nn kernels (empty without torch); ``y=None``: no labels,
    so no cross-entropy."""
    if not tb:
        return {}
    torch, F = tb
    cols = x.shape[1]
    xt, gt, bt, dyt = (torch.from_numpy(a) for a in (x, gam, bet, dy))
    yt = torch.from_numpy(y) if y is not None else None
    xr = xt.clone().requires_grad_()

    def xent():
        xr.grad = None
        F.cross_entropy(xr, yt).backward()

    def ln_fb():
        xr.grad = None
        F.layer_norm(xr, (cols,), gt, bt).backward(dyt)

    def gelu_fb():
        xr.grad = None
        F.gelu(xr).backward(dyt)

    def bias_gelu_fb():
        xr.grad = None
        F.gelu(xr + bt).backward(dyt)

    def bias_relu_fb():
        xr.grad = None
        F.relu(xr + bt).backward(dyt)

    # a hidden layer's elementwise work: layer_norm(gelu(x + b)), forward and backward
    # (the bias and the layer norm's weights need gradients too, as in a model)
    bg, gg, bb = (a.clone().requires_grad_() for a in (bt, gt, bt))

    def bias_gelu_ln_fb():
        for t in (xr, bg, gg, bb):
            t.grad = None
        F.layer_norm(F.gelu(xr + bg), (cols,), gg, bb).backward(dyt)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    return {"xent": xent if yt is not None else None, "ln_fb": ln_fb, "gelu_fb": gelu_fb,
            "bias_gelu_fb": bias_gelu_fb, "bias_relu_fb": bias_relu_fb,
            "bias_gelu_ln_fb": bias_gelu_ln_fb,
            "ln": no_grad(lambda: F.layer_norm(xt, (cols,), gt, bt)),
            "gelu": no_grad(lambda: F.gelu(xt)), "bias_gelu": no_grad(lambda: F.gelu(xt + bt)),
            "bias_relu": no_grad(lambda: F.relu(xt + bt))}
