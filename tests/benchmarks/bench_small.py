#!/usr/bin/env python
"""Per-call time at the sizes a training step hands the kernels. One command:

    python tests/benchmarks/bench_small.py [--out docs/benchmarks.md] [--rows 8,64,1024]

The main kernel benchmark (bench_kernels.py) times arrays of tens of MiB, where memory
bandwidth decides. A training step of a small model calls each kernel on a batch of a
few hundred to a few thousand rows, and a notebook on fewer still: there the fixed cost
of a call (argument checks, output allocation, the parallel launch) is a large part of
the time, and PyTorch's dispatcher is a few microseconds. Each row times our call and
PyTorch's on the same float32 arrays of ``rows x 256``, alternating, best of 7 repeats
of a loop sized to take about 20 ms; a ratio above 1 means ours is faster. Outputs are
allocated by each call, as a user's code does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import _baselines as B  # noqa: E402
from bench_kernels import SETTLE_S, environment  # noqa: E402
from report import replace_section  # noqa: E402
import numpy as np  # noqa: E402

from kernels import activations, compress, fused, nn, optim  # noqa: E402

COLS = 256
SECTION = "## Small inputs (per-call time)"


def _loop(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def race(fns: dict, repeats: int = 7) -> dict[str, float]:
    """Best seconds per call of each callable, timed in alternation. After PyTorch's loop
    the round waits ``SETTLE_S`` and runs the first callable once untimed, as
    ``bench_kernels.race`` does after a baseline: PyTorch's worker threads may keep
    spinning after a call, and a loop of ours timed in that window would share the
    cores with them (in the run that added this no row moved beyond its noise)."""
    for fn in fns.values():
        fn()
    reps = {k: max(5, int(0.02 / max(_loop(fn, 3), 1e-7))) for k, fn in fns.items()}
    best = {k: float("inf") for k in fns}
    first = next(iter(fns.values()))
    for _ in range(repeats):
        for k, fn in fns.items():
            best[k] = min(best[k], _loop(fn, reps[k]))
            if k == "torch":
                time.sleep(SETTLE_S)
                first()
    return best


def cases(rows: int, torch):
    """(name, ours, torch) callables on rows x COLS float32."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, COLS)).astype(np.float32)
    dy = rng.standard_normal((rows, COLS)).astype(np.float32)
    gam = (1 + 0.1 * rng.standard_normal(COLS)).astype(np.float32)
    bet = (0.1 * rng.standard_normal(COLS)).astype(np.float32)
    lab = rng.integers(0, COLS, rows)
    p, g = x.copy().reshape(-1), dy.reshape(-1)
    # each optimizer with the state it allocates itself (as torch's below): the moments'
    # placement moves this 7-stream update by up to 1.6x (kernels.optim._moment_buffers)
    opt_ours = optim.AdamW(p.copy(), lr=1e-3)
    out = []
    out.append(("adamw_step", lambda: opt_ours.step(g)))
    out.append(("softmax_cross_entropy+grad", lambda: nn.softmax_cross_entropy(x, lab)))
    out.append(("layer_norm", lambda: nn.layer_norm(x, gam, bet)))

    def ln_fb():
        _, m_, r_ = nn.layer_norm(x, gam, bet)
        nn.layer_norm_backward(dy, x, gam, m_, r_)

    out.append(("layer_norm fwd+bwd", ln_fb))
    out.append(("gelu", lambda: activations.gelu(x)))
    out.append(("gelu fwd+bwd", lambda: (activations.gelu(x), activations.gelu_backward(dy, x))))
    out.append(("bias_act gelu", lambda: activations.bias_act(x, bet, "gelu")))
    out.append(("bias_act gelu fwd+bwd", lambda: (activations.bias_act(x, bet, "gelu"),
                                                  activations.bias_act_backward(dy, x, bet,
                                                                                "gelu"))))
    out.append(("bias_act relu", lambda: activations.bias_act(x, bet, "relu")))
    out.append(("bias_act relu fwd+bwd", lambda: (activations.bias_act(x, bet, "relu"),
                                                  activations.bias_act_backward(dy, x, bet,
                                                                                "relu"))))
    def separate():  # what the fused pair replaces: four calls
        a = activations.bias_act(x, bet, "gelu")
        _, m_, r_ = nn.layer_norm(a, gam, bet)
        da, _, _ = nn.layer_norm_backward(dy, a, gam, m_, r_)
        activations.bias_act_backward(da, x, bet, "gelu")

    def together():
        a, _, m_, r_ = fused.bias_gelu_layer_norm(x, bet, gam, bet)
        fused.bias_gelu_layer_norm_backward(dy, a, x, bet, gam, m_, r_)

    out.append((BGLN_SEPARATE, separate))
    out.append((BGLN_FUSED, together))
    # error feedback on a gradient of rows x 256 (each side its own residual, which the
    # calls keep updating, as training steps do)
    gs = dy.reshape(-1)
    spars = {name: max(1, k) for name, k in ((SPARSE_16, 16), (SPARSE_1PCT, gs.size // 100))}
    for name, k in spars.items():
        out.append((name, lambda k=k, r=np.zeros(gs.size, np.float32):
                    compress.topk_sparsify(gs, r, k)))
    theirs: dict[str, object] = {}
    if torch is not None:
        t = B.torch_nn((torch, torch.nn.functional), x, lab, gam, bet, dy)
        tp = torch.from_numpy(p.copy()).requires_grad_()
        tp.grad = torch.from_numpy(g)
        opt = torch.optim.AdamW([tp], lr=1e-3, fused=True)
        opt.step()
        theirs = {"adamw_step": opt.step, "softmax_cross_entropy+grad": t["xent"],
                  "layer_norm": t["ln"], "layer_norm fwd+bwd": t["ln_fb"], "gelu": t["gelu"],
                  "gelu fwd+bwd": t["gelu_fb"], "bias_act gelu": t["bias_gelu"],
                  "bias_act gelu fwd+bwd": t["bias_gelu_fb"], "bias_act relu": t["bias_relu"],
                  "bias_act relu fwd+bwd": t["bias_relu_fb"],
                  BGLN_SEPARATE: t["bias_gelu_ln_fb"], BGLN_FUSED: t["bias_gelu_ln_fb"]}
        tg = torch.from_numpy(gs)
        for name, k in spars.items():
            theirs[name] = (lambda k=k, r=torch.zeros(gs.size, dtype=tg.dtype):
                            B.torch_topk_sparsify(torch, tg, r, k))
    return [(name, fn, theirs.get(name)) for name, fn in out]


BGLN_SEPARATE = "bias_act gelu, layer_norm fwd+bwd"
SPARSE_16 = "topk_sparsify k=16"
SPARSE_1PCT = "topk_sparsify (1%)"
_SPARSE_NOTE = ("on the rows x 256 gradient; torch: topk of abs(r + g), indices sorted "
                "(no NaN/inf check)")
BGLN_FUSED = "fused.bias_gelu_layer_norm fwd+bwd"
_BGLN_TORCH = ("torch: layer_norm(gelu(x + b)), then backward through autograd (x, b, "
               "gamma, beta)")
TORCH_NOTE = {
              BGLN_SEPARATE: "ours: bias_act, layer_norm, their backwards (four calls); "
                             + _BGLN_TORCH,
              BGLN_FUSED: "ours: kernels.fused forward and backward (two calls); "
                          + _BGLN_TORCH,
              "softmax_cross_entropy+grad": "torch: cross_entropy forward + backward",
              SPARSE_16: _SPARSE_NOTE, SPARSE_1PCT: _SPARSE_NOTE,
              "layer_norm fwd+bwd": "both: forward, then backward (torch through autograd)",
              "gelu fwd+bwd": "both: forward, then backward (torch through autograd)",
              "bias_act gelu fwd+bwd": "torch: gelu(x + b), then backward through autograd",
              "bias_act gelu": "torch: gelu(x + b)",
              "bias_act relu fwd+bwd": "torch: relu(x + b), then backward through autograd",
              "bias_act relu": "torch: relu(x + b)",
              "adamw_step": "both: an optimizer object stepping a copy of the same params"
                            " with its own moments (ours `optim.AdamW`, torch"
                            " `AdamW(fused=True)`)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="markdown file whose small-inputs section is replaced")
    ap.add_argument("--rows", default="8,64,1024,4096", help="batch sizes (rows of 256)")
    args = ap.parse_args()
    try:
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
    except ImportError:
        torch = None
    import numba

    lines = [SECTION, "", "Command (about a minute):", "", "```",
             "python tests/benchmarks/bench_small.py --out docs/benchmarks.md", "```", "",
             __doc__.split("\n\n", 2)[2].strip().replace("\n", " ").replace("``", "`")
             + " Before and after the rounds' cuts to the Python around the kernels:"
             " docs/kernels.md, \"Small inputs\".", "",
             f"Machine: {environment()['cpu']}, {os.cpu_count()} cores; "
             f"numba {numba.__version__} ({numba.get_num_threads()} threads), torch "
             f"{torch.__version__ if torch else '-'} ({torch.get_num_threads() if torch else '-'}"
             " threads).", "",
             "| kernel | rows x 256 | ours us | torch us | vs torch | note |",
             "|---|---|---|---|---|---|"]
    for rows in (int(r) for r in args.rows.split(",")):
        for name, ours, theirs in cases(rows, torch):
            t = race({"ours": ours, **({"torch": theirs} if theirs else {})})
            o, th = t["ours"] * 1e6, t.get("torch")
            ratio = f"{th * 1e6 / o:.2f}x" if th else "–"
            ths = f"{th * 1e6:.1f}" if th else "–"
            print(f"{name:28s} {rows:6d}  ours {o:9.1f} us  torch {ths:>9s} us  {ratio}",
                  flush=True)
            lines.append(f"| {name} | {rows} | {o:.1f} | {ths} | {ratio} | "
                         f"{TORCH_NOTE.get(name, '')} |")
    if args.out:
        replace_section(args.out, SECTION, lines)


if __name__ == "__main__":
    main()
