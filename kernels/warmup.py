"""Compile (or load from the cache) every kernel for float32 and float64.

    HPCGW_NUMBA_CACHE_DIR=/opt/hpcgw/numba-cache python -m kernels.warmup

Run at image build time so jobs start with a warm cache; prints per-kernel seconds
(``--json`` for machine-readable output, used by the benchmark's compile-time figures).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence

import numpy as np


def _calls(dt: np.dtype) -> dict[str, Callable[[], object]]:
    from kernels import cluster, compress, nn, optim, quant, search

    x = np.linspace(-1, 1, 24, dtype=dt).reshape(4, 6)
    v = np.ones(6, dt)
    lab = np.array([0, 1, 0, 1])
    big = np.linspace(-1, 1, 1 << 16, dtype=dt)
    wide = np.linspace(-1, 1, 4 * 160, dtype=dt).reshape(4, 160)  # past the short-row kernels
    vw = np.ones(160, dt)
    # rows of 4 KiB: the wide-row backward
    broad = np.linspace(-1, 1, 4 * 4096 // dt.itemsize, dtype=dt).reshape(4, -1)
    vb = np.ones(broad.shape[1], dt)
    ten = np.linspace(-1, 1, 320, dtype=dt).reshape(32, 10)
    lab10 = np.arange(32) % 10
    four = ten.reshape(-1)[:128].reshape(32, 4)
    # statistics for the backward calls from NumPy, so each kernel compiles in its own entry
    def stats(a):
        return a.mean(axis=1), 1 / np.sqrt(a.var(axis=1) + 1e-5)

    mu, rs = stats(x)
    muw, rsw = stats(wide)
    mub, rsb = stats(broad)
    mu4, rs4 = stats(four)
    return {
        "adamw_step": lambda: optim.adamw_step(x.copy(), x, x * 0, x * 0, step=1),
        "softmax_cross_entropy": lambda: nn.softmax_cross_entropy(x, lab),  # short rows
        "softmax_cross_entropy long rows": lambda: nn.softmax_cross_entropy(wide, lab),
        # 10 classes, 32 rows: blocks of rows (compiled per class count; 10 is the common one)
        "softmax_cross_entropy 10 classes": lambda: nn.softmax_cross_entropy(ten, lab10),
        "layer_norm": lambda: nn.layer_norm(x, v, v),  # short rows
        "layer_norm_backward": lambda: nn.layer_norm_backward(x, x, v, mu, rs),
        # 4 features, 32 rows: blocks of rows (compiled per feature count)
        "layer_norm 4 features": lambda: nn.layer_norm(four, v[:4], v[:4]),
        "layer_norm_backward 4 features": lambda: nn.layer_norm_backward(
            four, four, v[:4], mu4, rs4),
        "layer_norm long rows": lambda: nn.layer_norm(wide, vw, vw),
        "layer_norm_backward long rows": lambda: nn.layer_norm_backward(wide, wide, vw, muw, rsw),
        "layer_norm_backward wide rows": lambda: nn.layer_norm_backward(
            broad, broad, vb, mub, rsb),
        "gelu": lambda: nn.gelu(x),
        "gelu_backward": lambda: nn.gelu_backward(x, x),
        "bias_act": lambda: nn.bias_act(x, v, "gelu"),
        "bias_act_backward": lambda: nn.bias_act_backward(x, x, v, "gelu"),
        "kmeans_assign": lambda: cluster.kmeans_assign(x, x[:2]),
        "kmeans_partial_sums": lambda: cluster.kmeans_partial_sums(x, lab, 2),
        "topk_cosine": lambda: search.topk_cosine(x, x, 2),
        "quantize_int8": lambda: quant.quantize_int8(x),
        "dequantize_int8": lambda: quant.dequantize_int8(quant.quantize_int8(x)[0], v[:4], dt),
        "topk_sparsify": lambda: compress.topk_sparsify(x.ravel(), np.zeros(24, dt), 3),
        # large inputs select by a sampled threshold: other kernels, compiled here too
        "topk_sparsify threshold": lambda: compress.topk_sparsify(
            big, np.zeros(big.size, dt), 64),
    }


def _both_ways(call: Callable[[], object]) -> None:
    """``call``, then ``call`` again with the serial twins off: a small call runs the
    serial twins of kernels that have them (``kernels._jit.serial_twin``), and a job's
    large calls the parallel kernels, so the cache must hold both."""
    from kernels import _jit

    call()
    keep, _jit.SERIAL_TWINS = _jit.SERIAL_TWINS, False
    try:
        call()
    finally:
        _jit.SERIAL_TWINS = keep


def warm_all() -> dict[str, float]:
    """Call each public kernel per dtype (twice: ``_both_ways``); returns seconds per
    ``name[dtype]``."""
    t0 = time.perf_counter()
    import kernels._jit  # noqa: F401  (numba import, reported separately)

    times = {"import numba": time.perf_counter() - t0}
    for dt in (np.dtype(np.float32), np.dtype(np.float64)):
        for name, call in _calls(dt).items():
            t = time.perf_counter()
            _both_ways(call)
            times[f"{name}[{dt}]"] = time.perf_counter() - t
    return times


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.warmup", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print {name: seconds} as JSON")
    args = ap.parse_args(argv)
    times = warm_all()
    from kernels._jit import CACHE_DIR

    where = CACHE_DIR

    if args.json:
        print(json.dumps(times))
    else:
        for name, sec in times.items():
            print(f"{sec:8.3f} s  {name}")
        print(f"{sum(times.values()):8.3f} s  total (cache: {where})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
