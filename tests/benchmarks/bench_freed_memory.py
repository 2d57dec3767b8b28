#!/usr/bin/env python
"""Kernels that allocate their output, with and without freed memory kept. One command:

    python tests/benchmarks/bench_freed_memory.py [--out docs/benchmarks.md] [--rounds 4]

Each round starts two fresh interpreters in turn, one with the defaults and one with
``HPCGW_KEEP_FREED_MEMORY=1`` (``kernels.memory.keep_freed_memory``), alternating which
goes first; each times every case (best of 7 calls, outputs dropped between calls, as a
loop that makes a new array each step does) and reports its peak resident size. The
ratios are default / kept per round, so the host's bandwidth, which moves between
minutes, changes both sides of a ratio alike. Inputs are 2^25 elements (128 MiB in
float32), outputs the same size: far above glibc's largest mmap threshold (32 MiB), so
by default each output is a fresh mapping.
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
cases = {
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
print(json.dumps(res))
"""


def child(keep: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HPCGW_KEEP_FREED_MEMORY"}
    if keep:
        env["HPCGW_KEEP_FREED_MEMORY"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parents[1]),
                                                      env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                          text=True, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got.pop("keeping") is keep
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="markdown file whose section on freed memory is replaced")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    t0 = time.perf_counter()
    # compiles into the cache, so no round pays for it; the cases are the child's
    cases = [c for c in child(False) if c != "peak MiB"]
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(args.rounds):
        for keep in ((False, True) if r % 2 == 0 else (True, False)):
            runs[keep].append(child(keep))
        print(f"round {r + 1}: " + ", ".join(
            f"{c.split()[0]} {runs[False][-1][c] / runs[True][-1][c]:.2f}x" for c in cases),
            flush=True)

    lines = [SECTION, "", f"Command ({time.perf_counter() - t0:.0f} s here):", "", "```",
             "python tests/benchmarks/bench_freed_memory.py --out docs/benchmarks.md", "```",
             "", __doc__.split("\n\n", 2)[2].strip().replace("\n", " ").replace("``", "`"),
             "", f"Machine: {cpu_field('model name') or 'unknown CPU'}, {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d')}. "
             f"{args.rounds} rounds; medians of each side's best, and the range of the "
             "per-round ratios:", "",
             "| call (new output each time) | default ms | kept ms | default / kept | per round |",
             "|---|---|---|---|---|"]
    for c in cases:
        d = [x[c] for x in runs[False]]
        k = [x[c] for x in runs[True]]
        ratios = [a / b for a, b in zip(d, k)]
        md, mk = statistics.median(d), statistics.median(k)
        lines.append(f"| {c} | {md:.2f} | {mk:.2f} | {md / mk:.2f}x | "
                     f"{min(ratios):.2f}-{max(ratios):.2f}x |")
        print(lines[-1], flush=True)
    lines += ["", "The control row (into `out=`, no allocation) shows how far the bandwidth moved "
              "between the two interpreters of a round."]
    peak = [statistics.median([x["peak MiB"] for x in runs[keep]]) for keep in (False, True)]
    lines += ["", f"Peak resident size of a child: {peak[0]:.0f} MiB by default, {peak[1]:.0f} "
              "MiB with freed memory kept."]
    print(lines[-1])
    if args.out:
        replace_section(args.out, SECTION, lines)


if __name__ == "__main__":
    main()
