#!/usr/bin/env python
"""Kernels that allocate their output, under each of the three memory settings. One command:

    python tests/benchmarks/bench_freed_memory.py [--out docs/benchmarks.md] [--rounds 4]

Each round starts three fresh interpreters in turn (the order turns each round), with
``HPCGW_KEEP_FREED_MEMORY=0`` (glibc's own thresholds), unset (the default:
``kernels.memory.keep_heap_blocks``, blocks up to 32 MiB kept) and ``=1``
(``kernels.memory.keep_freed_memory``, every block kept); each times every case (best of 7
calls, outputs dropped between calls, as a loop that makes new arrays each step does) and
reports its peak resident size. The ratios are taken per round, so the host's bandwidth,
which moves between minutes, changes both sides of a ratio alike. The kernel inputs are
2^25 elements (128 MiB in float32), outputs the same size: far above glibc's largest mmap
threshold (32 MiB), so unless every block is kept each output is a fresh mapping. The
training-step cases are ten steps of the training app's model (`kernels.apps._mlp`: 32
features, hidden 256, 10 classes, float32; gradients, then an AdamW step), whose arrays
are 1-4 MiB: there glibc's own settings give the heap's freed top back after every step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

from report import replace_section  # noqa: E402

from kernels.config import cpu_field  # noqa: E402

SECTION = "## Keeping freed memory"

_CHILD = r"""
import json, resource, sys, time
import numpy as np
from kernels import activations, memory, nn, quant
rng = np.random.default_rng(0)
x32 = rng.standard_normal((131072, 256)).astype(np.float32)
x64 = x32.astype(np.float64)
g, b = np.ones(256, np.float32), np.zeros(256, np.float32)
lab = rng.integers(0, 256, 131072)
w = x32.reshape(32768, 1024)
q, s = quant.quantize_int8(w)
out = np.empty_like(x32)
from threadpoolctl import threadpool_limits
from kernels.apps import _mlp
from kernels.optim import AdamW
threadpool_limits(1, user_api="blas")  # as the apps run their products (apps._mpi)
shapes = _mlp.Shapes(32, 256, 10)
opt = AdamW(_mlp.init_params(shapes, 0, np.dtype(np.float32)), lr=1e-3)
grad = np.zeros_like(opt.params)
batches = {n: (rng.standard_normal((n, 32)).astype(np.float32), rng.integers(0, 10, n))
           for n in (1024, 4096)}
def steps(n):
    xb, yb = batches[n]
    for _ in range(10):
        _mlp.loss_and_grad(opt.params, shapes, xb, yb, grad, n)
        opt.step(grad)
cases = {
    "training step x 10, batch 1024": lambda: steps(1024),
    "training step x 10, batch 4096": lambda: steps(4096),
    "gelu float32": lambda: activations.gelu(x32),
    "gelu float64": lambda: activations.gelu(x64),
    "layer_norm float32": lambda: nn.layer_norm(x32, g, b),
    "softmax_cross_entropy+grad float32": lambda: nn.softmax_cross_entropy(x32, lab),
    "quantize_int8 float32": lambda: quant.quantize_int8(w),
    "dequantize_int8 float32": lambda: quant.dequantize_int8(q, s),
    "numpy add float32": lambda: np.add(x32, x32),
    "gelu float32 out= (control)": lambda: activations.gelu(x32, out=out),
}
res = {}
for name, fn in cases.items():
    fn()
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    res[name] = best * 1e3
res["peak MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
res["keeping"] = memory.keeping()
res["set"] = memory.malloc_set_by_environ()
print(json.dumps(res))
"""


MODES = ("0", "default", "1")  # HPCGW_KEEP_FREED_MEMORY: 0, unset, 1


def child(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HPCGW_KEEP_FREED_MEMORY"
           and not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    if mode != "default":
        env["HPCGW_KEEP_FREED_MEMORY"] = mode
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parents[1]),
                                                      env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                          text=True, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got.pop("keeping") is (mode == "1") and got.pop("set") is False
    return got


def _ratio(runs: dict[str, list[dict]], case: str, a: str, b: str) -> str:
    ratios = [x[case] / y[case] for x, y in zip(runs[a], runs[b])]
    return (f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="markdown file whose section on freed memory is replaced")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    t0 = time.perf_counter()
    # compiles into the cache, so no round pays for it; the cases are the child's
    cases = [c for c in child("default") if c != "peak MiB"]
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES[r % 3:] + MODES[:r % 3]:
            runs[mode].append(child(mode))
        print(f"round {r + 1}: " + ", ".join(
            f"{c.split(',')[0]} {runs['0'][-1][c] / runs['default'][-1][c]:.2f}x / "
            f"{runs['default'][-1][c] / runs['1'][-1][c]:.2f}x" for c in cases), flush=True)

    lines = [SECTION, "", f"Command ({time.perf_counter() - t0:.0f} s here):", "", "```",
             "python tests/benchmarks/bench_freed_memory.py --out docs/benchmarks.md", "```",
             "", __doc__.split("\n\n", 2)[2].strip().replace("\n", " ").replace("``", "`"),
             "", f"Machine: {cpu_field('model name') or 'unknown CPU'}, {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d')}. "
             f"{args.rounds} rounds; medians of each setting's best, and of the per-round "
             "ratios (their range in brackets):", "",
             "| call (new outputs each time) | `=0` ms | default ms | `=1` ms | `=0` / default "
             "| default / `=1` |",
             "|---|---|---|---|---|---|"]
    for c in cases:
        med = [statistics.median(x[c] for x in runs[m]) for m in MODES]
        lines.append(f"| {c} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} | "
                     f"{_ratio(runs, c, '0', 'default')} | {_ratio(runs, c, 'default', '1')} |")
        print(lines[-1], flush=True)
    lines += ["", "The control row (into `out=`, no allocation) shows how far the bandwidth moved "
              "between the interpreters of a round. The default and `=0` differ only for "
              "blocks up to 32 MiB: the kernel rows' 128 MiB outputs are fresh mappings under "
              "both, so their `=0` / default column shows how the OS served those mappings "
              "after the step cases, not a setting (docs/kernels.md, \"Keeping freed "
              "memory\")."]
    peak = [statistics.median([x["peak MiB"] for x in runs[m]]) for m in MODES]
    lines += ["", f"Peak resident size of a child: {peak[0]:.0f} MiB with `=0`, {peak[1]:.0f} "
              f"MiB by default, {peak[2]:.0f} MiB with `=1`."]
    print(lines[-1])
    if args.out:
        replace_section(args.out, SECTION, lines)


if __name__ == "__main__":
    main()
