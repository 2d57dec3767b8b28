#!/usr/bin/env python
"""Does a kernel's speed depend on where the caller's stack ends? One command:

    python tests/benchmarks/bench_stack.py [--step 16] [--only gelu]

Each kernel that streams its output (non-temporal stores, forced on for these small
arrays, which stay in the cache) is called from below a C frame of ``n`` bytes
(``alloca``), for ``n`` = 0, step, ... up to 4 KiB: every stack position within a page,
on one thread (the calling one). The stack pointer moves in 16-byte steps, so the
default step of 16 visits every position; 32 visits half of them (a 64-byte slot at 16
mod 32 straddles a page at positions that step never reaches). A loop that spills a 512-bit register to the stack
may run several times slower at the positions where the spill slot straddles a page
boundary (docs/kernels.md, "Spill slots across a page boundary"), and a process lands
at one such position or another depending on its callers. The table gives the best
time over all positions, the median, worst / best and how many positions took more than
1.4x the best. Needs a C compiler (``cc``) for the ``alloca`` frame.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["NUMBA_NUM_THREADS"] = "1"  # the kernel must run on the thread we shift
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from kernels import activations, compress, empty_aligned, nn, quant  # noqa: E402

SHIM = r"""
#include <alloca.h>
typedef void (*cb_t)(void);
void below(long n, cb_t cb) {
    volatile char *p = alloca(n + 1);
    p[0] = 0; p[n] = 0;
    cb();
    __asm__ volatile("" ::: "memory");  /* keep the frame until cb returns */
}
"""


def shim() -> ctypes.CDLL:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("bench_stack: needs a C compiler (cc) for the alloca frame")
    d = Path(tempfile.mkdtemp(prefix="hpcgw-stack-"))
    (d / "below.c").write_text(SHIM)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(d / "below.so"), str(d / "below.c")],
                   check=True)
    return ctypes.CDLL(str(d / "below.so"))


def kernels(rng: np.random.Generator) -> dict:
    """name -> a call writing a cache-sized output with non-temporal stores."""
    for mod in (nn, quant, compress, activations):
        mod.stream_out = lambda out: True
    ks = {}
    x = rng.standard_normal((2048, 256))
    dy = rng.standard_normal(x.shape)
    b = rng.standard_normal(256)
    o = empty_aligned(x.shape, np.float64, like=x)
    ks["gelu float64"] = lambda: nn.gelu(x, out=o)
    ks["gelu_backward float64"] = lambda: nn.gelu_backward(dy, x, out=o)
    ks["bias_act gelu float64"] = lambda: nn.bias_act(x, b, out=o)
    ks["bias_act_backward gelu float64"] = lambda: nn.bias_act_backward(dy, x, b, out=o)
    for dt in (np.float32, np.float64):
        name = np.dtype(dt).name
        for c in (256, 64, 10):
            n = (1 << 19) // c
            xc = rng.standard_normal((n, c)).astype(dt)
            y = rng.integers(0, c, n)
            g = empty_aligned(xc.shape, dt)
            gam = rng.standard_normal(c).astype(dt)
            bet = rng.standard_normal(c).astype(dt)
            dyc = rng.standard_normal(xc.shape).astype(dt)
            _, mu, rs = nn.layer_norm(xc, gam, bet)
            ks[f"softmax_cross_entropy {name} {c} classes"] = (
                lambda xc=xc, y=y, g=g: nn.softmax_cross_entropy(xc, y, out=g))
            ks[f"layer_norm {name} {c} features"] = (
                lambda xc=xc, gam=gam, bet=bet, g=g: nn.layer_norm(xc, gam, bet, out=g))
            ks[f"layer_norm_backward {name} {c} features"] = (
                lambda dyc=dyc, xc=xc, gam=gam, mu=mu, rs=rs, g=g:
                nn.layer_norm_backward(dyc, xc, gam, mu, rs, out=g))
        w = rng.standard_normal((512, 1024)).astype(dt)
        q, s = quant.quantize_int8(w)
        wo = empty_aligned(w.shape, dt)
        ks[f"dequantize_int8 {name}"] = lambda q=q, s=s, wo=wo, dt=dt: quant.dequantize_int8(
            q, s, dt, out=wo)
    grad = rng.standard_normal(1 << 19).astype(np.float32)
    ef = compress.ErrorFeedback(grad.size)
    ks["ErrorFeedback.step float32"] = lambda: ef.step(grad, 1000)
    return ks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--step", type=int, default=16, help="bytes between stack positions")
    ap.add_argument("--only", default="", help="run the kernels whose name holds this")
    ap.add_argument("--repeat", type=int, default=5, help="calls per position (best taken)")
    args = ap.parse_args()
    lib = shim()
    cb_t = ctypes.CFUNCTYPE(None)
    print(f"| kernel | best us | median us | worst / best | positions > 1.4x best "
          f"(of {4096 // args.step}) |")
    print("|---|---|---|---|---|")
    for name, fn in kernels(np.random.default_rng(0)).items():
        if args.only not in name:
            continue
        fn()  # compile or load
        cb = cb_t(fn)

        def at(n: int) -> float:
            lib.below(ctypes.c_long(n), cb)
            ts = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                lib.below(ctypes.c_long(n), cb)
                ts.append(time.perf_counter() - t0)
            return min(ts) * 1e6

        times = np.array([at(n) for n in range(0, 4096, args.step)])
        lo = times.min()
        print(f"| {name} | {lo:.0f} | {np.median(times):.0f} | {times.max() / lo:.2f} | "
              f"{int((times > 1.4 * lo).sum())} |", flush=True)


if __name__ == "__main__":
    main()
