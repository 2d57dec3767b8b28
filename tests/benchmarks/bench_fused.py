#!/usr/bin/env python
"""Bias + GELU + layer norm: the fused kernels against the separate calls. One command:

    python tests/benchmarks/bench_fused.py [--out docs/benchmarks.md]

``kernels.fused.bias_gelu_layer_norm`` (and its backward) do what ``bias_act(z, b,
"gelu")`` then ``layer_norm`` do (backward: ``layer_norm_backward`` then
``bias_act_backward``), in one call each way. A user may call either, so the fused pair
should never be the slower one, at any row width. Each row times both on the same
arrays, alternating within each of ``--rounds`` rounds (each callable's best of a loop
of about 20 ms), at two sizes: in cache (2^18 elements, about what a training step's
batch holds) and from memory (2^23). A ratio is separate time over fused time, the
median over the rounds (range in brackets); above 1 the fused call is faster. Outputs
are allocated by each call, as a user's code does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

from bench_kernels import environment  # noqa: E402
from bench_small import _loop  # noqa: E402
from report import replace_section  # noqa: E402
import numpy as np  # noqa: E402

from kernels import activations, fused, nn  # noqa: E402

SECTION = "## Bias + GELU + layer norm: fused and separate"


def _pairs(n: int, d: int, dt) -> dict[str, tuple]:
    """{"forward": (fused, separate), "backward": (fused, separate)} on n x d of dt."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, d)).astype(dt)
    dh = rng.standard_normal((n, d)).astype(dt)
    b = (0.1 * rng.standard_normal(d)).astype(dt)
    g = (1 + 0.1 * rng.standard_normal(d)).astype(dt)
    beta = (0.1 * rng.standard_normal(d)).astype(dt)
    a, _, mu, rstd = fused.bias_gelu_layer_norm(z, b, g, beta)

    def sep_fwd():
        a0 = activations.bias_act(z, b, "gelu")
        nn.layer_norm(a0, g, beta)

    def sep_bwd():
        da, _, _ = nn.layer_norm_backward(dh, a, g, mu, rstd)
        activations.bias_act_backward(da, z, b, "gelu")

    return {"forward": (lambda: fused.bias_gelu_layer_norm(z, b, g, beta), sep_fwd),
            "backward": (lambda: fused.bias_gelu_layer_norm_backward(dh, a, z, b, g, mu, rstd),
                         sep_bwd)}


def measure(n: int, d: int, dt, rounds: int) -> dict[str, tuple[float, list[float]]]:
    """Per direction: (fused seconds, best over the rounds; separate / fused per round)."""
    out = {}
    for way, (fus, sep) in _pairs(n, d, dt).items():
        fus(), sep()
        reps = max(2, int(0.02 / max(_loop(fus, 2), 1e-7)))
        best, ratios = float("inf"), []
        for _ in range(rounds):
            tf, ts = _loop(fus, reps), _loop(sep, reps)
            best = min(best, tf)
            ratios.append(ts / tf)
        out[way] = (best, sorted(ratios))
    return out


def _cell(ratios: list[float]) -> str:
    return f"{ratios[len(ratios) // 2]:.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="markdown file whose section is replaced")
    ap.add_argument("--widths", default="16,32,64,128,256,1024,4096,16384",
                    help="features per row")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sizes", default="18,23", help="log2 of the elements: in cache, memory")
    args = ap.parse_args()
    import numba

    lines = [SECTION, "", "Command (about three minutes):", "", "```",
             "python tests/benchmarks/bench_fused.py --out docs/benchmarks.md", "```", "",
             __doc__.split("\n\n", 2)[2].strip().replace("\n", " ").replace("``", "`")
             + " Rows of fewer than"
             f" {fused.SEPARATE_FORWARD_BELOW_FEATURES} features forward and"
             f" {fused.SEPARATE_BELOW_FEATURES} backward go through the separate kernels"
             " inside the fused calls (docs/kernels.md, \"Bias + GELU + layer norm in one"
             " kernel\"), so there the two should be even.", "",
             f"Machine: {environment()['cpu']}, {os.cpu_count()} cores; numba "
             f"{numba.__version__} ({numba.get_num_threads()} threads).", "",
             "| dtype | elements | rows x features | fused forward us | separate / fused "
             "forward | fused backward us | separate / fused backward |",
             "|---|---|---|---|---|---|---|"]
    for dt in (np.float32, np.float64):
        for log2 in (int(s) for s in args.sizes.split(",")):
            for d in (int(w) for w in args.widths.split(",")):
                n = max(1, (1 << log2) // d)
                res = measure(n, d, dt, args.rounds)
                (tf, rf), (tb, rb) = res["forward"], res["backward"]
                row = (f"| {np.dtype(dt).name} | 2^{log2} | {n} x {d} | {tf * 1e6:.0f} | "
                       f"{_cell(rf)} | {tb * 1e6:.0f} | {_cell(rb)} |")
                print(row, flush=True)
                lines.append(row)
    if args.out:
        replace_section(args.out, SECTION, lines)


if __name__ == "__main__":
    main()
