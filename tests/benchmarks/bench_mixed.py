#!/usr/bin/env python
"""A training step written by hand: NumPy matrix products and kernel calls alternating.

    python tests/benchmarks/bench_mixed.py [--out docs/benchmarks.md] [--steps 60]
        [--batches 1024,256]

A notebook that trains a model with ``x @ w`` and ``kernels.nn`` calls alternates two
thread pools, OpenBLAS's and Numba's OpenMP pool, and both keep their threads spinning
after each call. Each row runs the training app's model (Linear 32 -> 256, bias + GELU,
layer norm, Linear 256 -> 10, softmax + cross-entropy, AdamW; float32, at each batch
size: the app's ``kernels.apps._mlp.loss_and_grad`` and ``kernels.optim.AdamW``; at
batch 256 all three products with the 10 classes are under
``kernels.gemm.SPLIT_MIN_FLOPS``, so ``matmul`` runs them on the calling thread, with
BLAS pinned for each call) in a process of
its own, as the row says: as it is (the products by ``np.matmul``, as ``x @ w`` does),
inside ``kernels.blas_threads()`` (BLAS pinned to one thread), with an environment
variable that shortens one pool's spinning (read when the library loads, hence the
separate processes), or with the products by ``kernels.gemm.matmul`` (as the app does:
split over Numba's threads, BLAS pinned for each call by ``matmul`` itself). The same
model and step in PyTorch is the last row. Per-call columns: a kernel called back to
back, the case that spinning serves (best of 7 loops of about 20 ms each). What to do
about it, and what each setting costs: docs/kernels.md, "Mixing NumPy's matrix products
with the kernels".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from report import replace_section  # noqa: E402
SECTION = "## Mixing NumPy matrix products with the kernels"
FEATURES, HIDDEN, CLASSES = 32, 256, 10

# (label, extra environment, run inside kernels.blas_threads(), PyTorch, products by
# np.matmul instead of kernels.gemm.matmul)
MODES = [
    ("as it is", {}, False, False, True),
    ("products by `kernels.gemm.matmul`", {}, False, False, False),
    ("`with kernels.blas_threads():`", {}, True, False, True),
    ("`with kernels.blas_threads():`, products by `kernels.gemm.matmul`", {}, True, False,
     False),
    ("`GOMP_SPINCOUNT=0`", {"GOMP_SPINCOUNT": "0"}, False, False, True),
    ("`OMP_WAIT_POLICY=passive`", {"OMP_WAIT_POLICY": "passive"}, False, False, True),
    ("`OPENBLAS_THREAD_TIMEOUT=4`", {"OPENBLAS_THREAD_TIMEOUT": "4"}, False, False, True),
    ("PyTorch, the same model and step", {}, False, True, False),
]


def _data(np, batch: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, batch)
    return x, y


def _time_steps(step, steps: int) -> list[float]:
    for _ in range(10):
        step()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def child_ours(steps: int, batch: int, pinned: bool, np_products: bool) -> dict:
    import numpy as np

    import kernels
    from kernels import activations, nn
    from kernels.apps import _mlp
    from kernels.optim import AdamW

    if np_products:  # as x @ w would (the app's products go through kernels.gemm)
        _mlp.matmul = lambda a, b, out=None: np.matmul(a, b, out=out)
    shapes = _mlp.Shapes(FEATURES, HIDDEN, CLASSES)
    opt = AdamW(_mlp.init_params(shapes, 0, np.dtype(np.float32)), lr=3e-3, weight_decay=1e-2)
    grad = np.zeros_like(opt.params)
    x, y = _data(np, batch)

    def step():
        _mlp.loss_and_grad(opt.params, shapes, x, y, grad, batch)
        opt.step(grad)

    rng = np.random.default_rng(1)
    small = rng.standard_normal((8, 256)).astype(np.float32)
    big = rng.standard_normal((1024, 256)).astype(np.float32)
    gam, bet = np.ones(256, np.float32), np.zeros(256, np.float32)
    with kernels.blas_threads() if pinned else contextlib.nullcontext():
        times = _time_steps(step, steps)
        from bench_small import race  # best of 7 loops of about 20 ms each

        calls = race({"gelu 8 x 256": lambda: activations.gelu(small),
                      "layer_norm 1024 x 256": lambda: nn.layer_norm(big, gam, bet)})
    return {"steps": times, "calls": calls}


def child_torch(steps: int, batch: int) -> dict:
    import numpy as np
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.GELU(),
                                torch.nn.LayerNorm(HIDDEN), torch.nn.Linear(HIDDEN, CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2, fused=True)
    x, y = _data(np, batch)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(tx), ty, reduction="sum") / batch
        loss.backward()
        opt.step()

    return {"steps": _time_steps(step, steps), "calls": {},
            "torch": f"torch {torch.__version__} ({torch.get_num_threads()} threads)"}


def run_child(mode, steps: int, batch: int) -> dict | None:
    label, env, _, torch, _ = mode
    argv = [sys.executable, __file__, "--child", str(MODES.index(mode)), "--steps", str(steps),
            "--batch", str(batch)]
    proc = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        if torch and "No module named 'torch'" in proc.stderr:
            return None
        raise SystemExit(f"{label}: child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="markdown file whose section on mixing is replaced")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per process")
    ap.add_argument("--rounds", type=int, default=2,
                    help="times each process runs, in turn (best median kept)")
    ap.add_argument("--batches", default="1024,256", help="batch sizes, one table row each")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        _, _, pinned, torch, np_products = MODES[args.child]
        sys.path.insert(0, str(ROOT))
        res = (child_torch(args.steps, args.batch) if torch
               else child_ours(args.steps, args.batch, pinned, np_products))
        print(json.dumps(res))
        return
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[tuple[int, str], list[dict]] = {(b, m[0]): [] for b in batches for m in MODES}
    for rnd in range(args.rounds):
        for batch in batches:
            for mode in MODES:
                r = run_child(mode, args.steps, batch)
                if r is None:
                    continue
                results[batch, mode[0]].append(r)
                print(f"round {rnd + 1} batch {batch} {mode[0]:36s} median "
                      f"{statistics.median(r['steps']) * 1e3:8.2f} ms/step", flush=True)
    import numba
    import numpy as np

    rows = []
    for (batch, label), runs in results.items():
        if not runs:
            continue
        med = min(statistics.median(r["steps"]) for r in runs)
        best = min(min(r["steps"]) for r in runs)
        calls = {k: min(r["calls"][k] for r in runs) for k in runs[0]["calls"]}
        rows.append((batch, label, med, best, calls, runs[0].get("torch")))
    base = {b: next(r[2] for r in rows if r[0] == b) for b in batches}
    torch_med = {r[0]: r[2] for r in rows if r[5]}
    names = list(rows[0][4])
    lines = [SECTION, "", "Command (about a minute per round; 2 rounds):", "", "```",
             "python tests/benchmarks/bench_mixed.py --out docs/benchmarks.md", "```", "",
             __doc__.split("\n\n", 2)[2].strip().replace("\n", " ").replace("``", "`"), "",
             f"Machine: {os.cpu_count()} cores; numpy {np.__version__}, numba "
             f"{numba.__version__}" + (f", {rows[-1][5]}" if rows[-1][5] else "")
             + f". Median of {args.steps} steps after 10 untimed, best of "
             f"{args.rounds} processes per row.", "",
             "| batch | run | ms / step (median) | best | samples/s | vs as it is | vs PyTorch | "
             + " | ".join(f"{n}, us / call" for n in names) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(names)]
    for batch, label, med, best, calls, torch in rows:
        vs_t = f"{torch_med[batch] / med:.2f}x" if batch in torch_med and not torch else "–"
        cells = " | ".join(f"{calls[n] * 1e6:.1f}" if n in calls else "–" for n in names)
        lines.append(f"| {batch} | {label} | {med * 1e3:.2f} | {best * 1e3:.2f} | "
                     f"{batch / med:,.0f} | {base[batch] / med:.1f}x | {vs_t} | {cells} |")
    print("\n".join(lines[-len(rows) - 2:]))
    if args.out:
        replace_section(args.out, SECTION, lines)


if __name__ == "__main__":
    main()
