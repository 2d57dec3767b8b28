"""The training app's model: Linear -> +bias GELU -> LayerNorm -> Linear -> softmax-CE.

All parameters live in one flat buffer (views per tensor), so one fused AdamW call and
one Allreduce cover the whole model. GEMMs go through NumPy's BLAS, split over Numba's
threads (``kernels.gemm.matmul``); the rest through the kernels: bias + GELU + layer norm
as one kernel each way (``kernels.fused``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kernels import fused, nn
from kernels.gemm import matmul


@dataclass(frozen=True)
class Shapes:
    features: int
    hidden: int
    classes: int

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        f, h, c = self.features, self.hidden, self.classes
        return [("w1", (f, h)), ("b1", (h,)), ("gamma", (h,)), ("beta", (h,)),
                ("w2", (h, c)), ("b2", (c,))]

    def size(self) -> int:
        return sum(math.prod(s) for _, s in self.layout())


def views(flat: np.ndarray, shapes: Shapes) -> dict[str, np.ndarray]:
    """Named views into the flat parameter (or gradient) buffer. Three calls a training
    step: ``math.prod``, not ``np.prod`` (a NumPy reduction per tensor), took them from
    20 to 3 us each (batch 1024, hidden 256: about 3.5% of a step)."""
    out, o = {}, 0
    for name, shape in shapes.layout():
        n = math.prod(shape)
        out[name] = flat[o: o + n].reshape(shape)
        o += n
    return out


def init_params(shapes: Shapes, seed: int, dtype: np.dtype) -> np.ndarray:
    """Deterministic initialisation (same on every rank)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    flat = np.zeros(shapes.size(), dtype)
    p = views(flat, shapes)
    p["w1"][...] = rng.standard_normal(p["w1"].shape) / np.sqrt(shapes.features)
    p["gamma"][...] = 1.0
    p["w2"][...] = rng.standard_normal(p["w2"].shape) / np.sqrt(shapes.hidden)
    return flat


def forward(flat: np.ndarray, shapes: Shapes, x: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Logits and the activations the backward pass needs."""
    p = views(flat, shapes)
    z1 = matmul(x, p["w1"])
    a1, h, mu, rstd = fused.bias_gelu_layer_norm(z1, p["b1"], p["gamma"], p["beta"])
    z2 = matmul(h, p["w2"])
    logits = nn.bias_act(z2, p["b2"], "none")
    return logits, (x, z1, a1, h, mu, rstd, z2)


def loss_and_grad(
    flat: np.ndarray, shapes: Shapes, x: np.ndarray, y: np.ndarray, grad: np.ndarray,
    denom: int,
) -> tuple[float, int]:
    """Write d(sum of losses / denom)/dparams into ``grad``; return (loss sum, n correct)."""
    p, g = views(flat, shapes), views(grad, shapes)
    logits, (x, z1, a1, h, mu, rstd, z2) = forward(flat, shapes, x)
    loss_sum, dlog = nn.softmax_cross_entropy(logits, y, reduction="sum", grad_scale=1.0 / denom)
    correct = int((logits.argmax(axis=1) == y).sum()) if len(y) else 0
    dz2, g["b2"][...] = nn.bias_act_backward(dlog, z2, p["b2"], "none")
    matmul(h.T, dz2, out=g["w2"])
    dz1, g["b1"][...], g["gamma"][...], g["beta"][...] = fused.bias_gelu_layer_norm_backward(
        matmul(dz2, p["w2"].T), a1, z1, p["b1"], p["gamma"], mu, rstd
    )
    matmul(x.T, dz1, out=g["w1"])
    return loss_sum, correct


def evaluate(flat: np.ndarray, shapes: Shapes, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """(loss sum, n correct) on ``x``, ``y`` without gradients."""
    logits, _ = forward(flat, shapes, x)
    loss_sum, _ = nn.softmax_cross_entropy(logits, y, grad=False, reduction="sum")
    correct = int((logits.argmax(axis=1) == y).sum()) if len(y) else 0
    return loss_sum, correct
