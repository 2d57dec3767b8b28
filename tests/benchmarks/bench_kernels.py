#!/usr/bin/env python
"""Kernel benchmark: bandwidth vs a STREAM triad, speed vs NumPy, PyTorch and scikit-learn.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        python tests/benchmarks/bench_kernels.py --out docs/benchmarks.md

Everything is measured in this one run (ratios are only meaningful within a run): the
triad, each kernel, its baselines, k-means against scikit-learn, training throughput
with 1 and 2 MPI ranks, and cold/warm compile times. The ``## Kernels`` section of
``--out`` is replaced; other sections of that file are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]

import _baselines as B

from kernels import cluster, compress, empty_aligned, nn, optim, quant, search
from kernels._checks import empty_placed
from kernels._jit import jit, numba, prange

GB = 1e9


def best(fn, repeat: int = 7) -> float:
    """Best wall time of ``repeat`` calls after one warm-up call."""
    return race({"fn": fn}, repeat)["fn"]


@jit(parallel=True)
def _triad(a, b, c, s):
    for i in prange(a.size):
        a[i] = b[i] + s * c[i]


def stream_triad(n: int) -> float:
    """STREAM triad bandwidth in GB/s (3 arrays counted, as STREAM does)."""
    b, c = np.full(n, 1.0), np.full(n, 2.0)
    a = np.empty(n)
    t = best(lambda: _triad(a, b, c, 3.0), repeat=10)
    return 3 * n * 8 / t / GB


# the row statistics: 2 values per row, written by the forward, read by the backward
_LN_FB_BYTES = "bytes: fwd 2 + bwd 3 passes + the row statistics"

SETTLE_S = 0.15  # OpenBLAS's idle worker threads spin for about 0.1 s after a call


@jit(parallel=True)
def _read_all(a):
    s = 0.0
    for i in prange(a.size):
        s += a[i]
    return s


def race(fns: dict, repeat: int = 7, clean=None) -> dict[str, float]:
    """Best time of each callable, timed round-robin so that load from other work on this
    shared machine hits all of them alike (a ratio of two separate best-ofs does not).

    After each NumPy, PyTorch or scikit-learn baseline call the round waits ``SETTLE_S`` and runs the
    first callable once untimed: the baselines' BLAS/OpenMP worker threads keep spinning
    after a call (OpenBLAS for about 0.1 s), and a Numba kernel timed inside that window
    shares the 2 cores with them (measured: a 1.1 ms search scan took 4-7 ms right after
    a NumPy GEMM). The untimed call brings the cores back up after the pause, so the
    next timed call starts as it would in a tight loop.

    ``clean``, when given, runs untimed before every timed call (see ``Table``)."""
    for fn in fns.values():
        fn()
    first = next(iter(fns.values()))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if clean is not None:
                clean()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if name in ("numpy", "torch", "sklearn"):
                time.sleep(SETTLE_S)
                first()
    return {name: min(ts) for name, ts in times.items()}


class Table:
    """Kernel rows. ``ours`` is the plain call (allocating its output, as the baselines
    do) and is what the ratios use; ``ours_out`` writes into a reused ``out=`` buffer and
    is what the bandwidth uses (a fresh 100+ MB output costs page faults that belong to the
    allocator, not the kernel).

    Every timed call of a row (the triad's too) starts from the same cache: one that a
    read of ``CLEAN_BYTES`` (3x the 32 MB L3 of the host it was sized on; the header
    gives the host's own L3 size) has filled with clean lines.
    Without it, whichever call came right after the triad paid for writing back the
    L3's worth of the triad's dirty lines, and ``ours`` always came right after it
    (measured: the 64 MiB one-query search scan took 1.50 ms after the triad against
    1.27-1.33 ms after a read; the triad itself moves 768 MiB and did not change)."""

    CLEAN_BYTES = 96 << 20

    def __init__(self, triad_n: int, wait_triad: float = 0.0, wait_max_s: float = 600.0,
                 only: str | None = None, repeat: int = 7) -> None:
        self.rows: list[dict] = []
        self.wait_triad, self.wait_max_s = wait_triad, wait_max_s
        self.only, self.repeat = only, repeat
        self._abc = (np.empty(triad_n), np.full(triad_n, 1.0), np.full(triad_n, 2.0))
        self._fill = np.ones(self.CLEAN_BYTES // 8)

    def _clean(self) -> None:
        _read_all(self._fill)

    def _triad(self) -> None:
        _triad(*self._abc, 3.0)

    def _read(self) -> None:
        """The read-only reference: one stream (the triad's ``b``, never written), summed."""
        _read_all(self._abc[1])

    def _wait_for_bandwidth(self) -> None:
        """With ``--wait-triad``: poll the triad until it reaches that many GB/s (at most
        ``wait_max_s``), so that a run characterises one of this shared machine's
        bandwidth regimes (it switches between about 47 and about 80 GB/s)."""
        deadline = time.perf_counter() + self.wait_max_s
        while self.wait_triad and time.perf_counter() < deadline:
            if 3 * self._abc[0].nbytes / best(self._triad, repeat=2) / GB >= self.wait_triad:
                return
            time.sleep(2.0)

    def add(self, name, shape, dtype, nbytes, note="", **fns) -> None:
        """Race ``fns`` (keys: ours, ours_out, numpy, torch) with a STREAM triad; one row.

        The triad runs in the same round-robin, so '% triad' compares the kernel with the
        bandwidth the machine gave during the same seconds (it is shared and varies 2x).
        With ``--only``, rows whose name does not contain it are skipped.
        """
        if self.only is not None and self.only not in name:
            return
        self._wait_for_bandwidth()
        t = race({"triad": self._triad, "read": self._read,
                  **{k: f for k, f in fns.items() if f is not None}},
                 repeat=self.repeat, clean=self._clean)
        triad = 3 * self._abc[0].nbytes / t["triad"] / GB
        read = self._abc[1].nbytes / t["read"] / GB
        ms = {k: t[k] * 1e3 if k in t else None for k in ("ours", "ours_out", "numpy", "torch")}
        gbs = nbytes / t.get("ours_out", t["ours"]) / GB if nbytes else None
        pct = 100 * gbs / triad if gbs else None
        self.rows.append({"kernel": name, "shape": shape, "dtype": str(np.dtype(dtype)),
                          **{f"{k}_ms": v for k, v in ms.items()}, "gb_s": gbs,
                          "triad_gb_s": triad, "pct_triad": pct, "read_gb_s": read,
                          "pct_read": 100 * gbs / read if gbs else None, "note": note})
        print(f"  {name:34s} {np.dtype(dtype)!s:8s} ours {ms['ours']:8.2f} ms"
              + (f"  {gbs:6.1f} GB/s ({pct:4.0f}% of {triad:.0f}; {100 * gbs / read:4.0f}% "
                 f"of a {read:.0f} read)" if gbs else "")
              + "".join(f"  {k} x{ms[k] / ms['ours']:5.2f}" for k in ("numpy", "torch") if ms[k]),
              flush=True)


def bench_adamw(tab: Table, tb, n_params: int, dt) -> None:
    """Fused AdamW (in place, so no output buffer) vs NumPy and torch fused/foreach."""
    rng = np.random.default_rng(0)
    p, g = rng.standard_normal(n_params).astype(dt), rng.standard_normal(n_params).astype(dt)
    state = optim.AdamW(p)  # the moments as the optimizer allocates them
    m, v = state.exp_avg, state.exp_avg_sq
    torch_step, note = None, ""
    if tb:
        # torch updates the very same four buffers: where they sit relative to each other
        # moves both kernels alike by up to 1.7x (docs/kernels.md), so separate buffers
        # compared placements, not kernels (torch on its own copy read 0.63-0.82x)
        torch, _ = tb
        tp = torch.from_numpy(p).requires_grad_()
        tp.grad = torch.from_numpy(g)
        opts = {k: torch.optim.AdamW([tp], lr=1e-3, **{k: True}) for k in ("fused", "foreach")}
        for o in opts.values():
            o.state[tp] = {"step": torch.tensor(4.0), "exp_avg": torch.from_numpy(m),
                           "exp_avg_sq": torch.from_numpy(v)}
        kind = min(race({k: o.step for k, o in opts.items()}, repeat=3).items(),
                   key=lambda kv: kv[1])[0]
        torch_step, note = (opts[kind].step,
                            f"torch: faster of fused/foreach ({kind}), on the same buffers")
    tab.add("adamw_step", (n_params,), dt, 7 * n_params * np.dtype(dt).itemsize, note,
            ours=lambda: optim.adamw_step(p, g, m, v, step=5),
            numpy=lambda: B.np_adamw(p, g, m, v, 5), torch=torch_step)
    # the same step with the moments where NumPy's one-after-another allocations of this
    # size land (64 or 128 MiB plus 4-8 KiB from the params): what AdamW's placement avoids
    m2, v2 = (empty_placed(p, off, 64 << 20) for off in (4096, -8192))
    m2.fill(0)
    v2.fill(0)
    tab.add("adamw_step, moments 4 / -8 KiB off", (n_params,), dt,
            7 * n_params * np.dtype(dt).itemsize,
            "moments 4 and -8 KiB from the params modulo 64 MiB, as NumPy's allocations "
            "land; the row above: as AdamW places them (kernels.optim._moment_buffers)",
            ours=lambda: optim.adamw_step(p, g, m2, v2, step=5))


def bench_nn(tab: Table, tb, rows: int, cols: int, dt) -> None:
    """softmax-CE, layer norm, GELU, bias+act: memory-bound, vs NumPy and PyTorch."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, cols)).astype(dt)
    y = rng.integers(0, cols, rows)
    gam, bet = np.ones(cols, dt), np.zeros(cols, dt)
    dy = rng.standard_normal((rows, cols)).astype(dt)
    # out= buffers as the kernels allocate their own (kernels.empty_aligned): 64-byte
    # aligned rows for layer norm, the input's offset in a cache line for GELU (whose
    # blocks align to the output, and then to the inputs as well), half a page from the
    # input (apart_from: streamed stores a little ahead of the loads slow them down)
    o, o2 = (empty_aligned(x.shape, dt, apart_from=x) for _ in range(2))
    ol = empty_aligned(x.shape, dt, like=x, apart_from=x)
    nb = rows * cols * np.dtype(dt).itemsize
    t = B.torch_nn(tb, x, y, gam, bet, dy)
    _, mu, rs = nn.layer_norm(x, gam, bet)

    # ours_out: the statistics too go into reused buffers (mean_out=, rstd_out=)
    st = (empty_aligned(rows, dt), empty_aligned(rows, dt))

    def ln_fb(out=None, out2=None, stats=(None, None)):
        _, mu_, rs_ = nn.layer_norm(x, gam, bet, out=out, mean_out=stats[0], rstd_out=stats[1])
        nn.layer_norm_backward(dy, x, gam, mu_, rs_, out=out2)

    # bytes each call must move besides the x-sized arrays: the labels a softmax reads,
    # the row statistics (mean, rstd) layer norm's forward writes and its backward reads
    sb = 2 * rows * np.dtype(dt).itemsize
    add = tab.add
    add("softmax_cross_entropy+grad", x.shape, dt, 2 * nb + y.nbytes,
        "torch: cross_entropy fwd+backward",
        ours=lambda: nn.softmax_cross_entropy(x, y), numpy=lambda: B.np_xent(x, y),
        ours_out=lambda: nn.softmax_cross_entropy(x, y, out=o), torch=t.get("xent"))
    # 10 classes (blocks of rows): the same bytes as rows of 10
    xs = x.reshape(-1)[:x.size // 10 * 10].reshape(-1, 10)
    ys = rng.integers(0, 10, xs.shape[0])
    os_ = empty_aligned(xs.shape, dt, apart_from=xs)
    ts = B.torch_nn(tb, xs, ys, gam[:10], bet[:10], xs)
    add("softmax_cross_entropy+grad, 10 classes", xs.shape, dt, 2 * xs.nbytes + ys.nbytes,
        f"blocks of {nn._lanes(np.float32)} (float32) / {nn._lanes(np.float64)} (float64) "
        "rows transposed in registers; "
        "torch: cross_entropy fwd+backward", ours=lambda: nn.softmax_cross_entropy(xs, ys),
        numpy=lambda: B.np_xent(xs, ys), ours_out=lambda: nn.softmax_cross_entropy(xs, ys, out=os_),
        torch=ts.get("xent"))
    # 100 classes (CIFAR-100): float32 rows of 6.25 vectors in registers
    xh = x.reshape(-1)[:x.size // 100 * 100].reshape(-1, 100)
    yh = rng.integers(0, 100, xh.shape[0])
    oh = empty_aligned(xh.shape, dt, apart_from=xh)
    th = B.torch_nn(tb, xh, yh, gam[:100], bet[:100], xh)
    add("softmax_cross_entropy+grad, 100 classes", xh.shape, dt, 2 * xh.nbytes + yh.nbytes,
        "float32 rows held in registers (AVX-512), float64 row loops; "
        "torch: cross_entropy fwd+backward", ours=lambda: nn.softmax_cross_entropy(xh, yh),
        numpy=lambda: B.np_xent(xh, yh), ours_out=lambda: nn.softmax_cross_entropy(xh, yh, out=oh),
        torch=th.get("xent"))
    # logits 100x wider (a confident model; a contrastive loss at logit scale 100): most
    # p * scale below the smallest normal, flushed to 0 (docs/kernels.md, "Subnormals")
    xw = 100 * x
    ow = empty_aligned(x.shape, dt, apart_from=xw)
    tw = B.torch_nn(tb, xw, y, gam, bet, dy)
    add("softmax_cross_entropy+grad, logits x 100", x.shape, dt, 2 * nb + y.nbytes,
        "most gradients below the smallest normal; torch: cross_entropy fwd+backward",
        ours=lambda: nn.softmax_cross_entropy(xw, y), numpy=lambda: B.np_xent(xw, y),
        ours_out=lambda: nn.softmax_cross_entropy(xw, y, out=ow), torch=tw.get("xent"))
    add("layer_norm", x.shape, dt, 2 * nb + sb, ours=lambda: nn.layer_norm(x, gam, bet),
        ours_out=lambda: nn.layer_norm(x, gam, bet, out=o, mean_out=st[0], rstd_out=st[1]),
        numpy=lambda: B.np_layer_norm(x, gam, bet), torch=t.get("ln"))
    add("layer_norm fwd+bwd", x.shape, dt, 5 * nb + 2 * sb, _LN_FB_BYTES, ours=ln_fb,
        ours_out=lambda: ln_fb(o, o2, st), torch=t.get("ln_fb"))
    add("layer_norm_backward", x.shape, dt, 3 * nb + sb,
        ours=lambda: nn.layer_norm_backward(dy, x, gam, mu, rs),
        ours_out=lambda: nn.layer_norm_backward(dy, x, gam, mu, rs, out=o))
    # few features (the short-row kernels) and wide rows: the same bytes in rows of d
    for d in (10, 64, 4096):
        xd = x.reshape(-1)[:x.size // d * d].reshape(-1, d)
        dyd = dy.reshape(-1)[:xd.size].reshape(xd.shape)
        gd, bd = np.ones(d, dt), np.zeros(d, dt)
        od, od2 = (empty_aligned(xd.shape, dt, apart_from=xd) for _ in range(2))
        std = (empty_aligned(xd.shape[0], dt), empty_aligned(xd.shape[0], dt))
        td = B.torch_nn(tb, xd, None, gd, bd, dyd)

        def ln_fb_d(out=None, out2=None, stats=(None, None), xd=xd, dyd=dyd, gd=gd, bd=bd):
            _, mu_, rs_ = nn.layer_norm(xd, gd, bd, out=out, mean_out=stats[0],
                                        rstd_out=stats[1])
            nn.layer_norm_backward(dyd, xd, gd, mu_, rs_, out=out2)

        note = {10: "; in blocks of rows transposed in registers",
                4096: "; backward: a read-only pass, then dx and the dgamma/dbeta shares"}
        add(f"layer_norm fwd+bwd, {d} features", xd.shape, dt,
            5 * xd.nbytes + 4 * xd.shape[0] * np.dtype(dt).itemsize,
            _LN_FB_BYTES + note.get(d, ""),
            ours=ln_fb_d, ours_out=lambda f=ln_fb_d, a=od, b=od2, s=std: f(a, b, s),
            torch=td.get("ln_fb"))
    add("gelu", x.shape, dt, 2 * nb, "numpy: scipy.special.erf", ours=lambda: nn.gelu(x),
        ours_out=lambda: nn.gelu(x, out=ol), numpy=lambda: B.np_gelu(x), torch=t.get("gelu"))
    add("gelu_backward", x.shape, dt, 3 * nb, ours=lambda: nn.gelu_backward(dy, x),
        ours_out=lambda: nn.gelu_backward(dy, x, out=ol))
    add("bias_act gelu", x.shape, dt, 2 * nb, "torch: gelu(x + b)",
        ours=lambda: nn.bias_act(x, gam, "gelu"), ours_out=lambda: nn.bias_act(x, gam, out=ol),
        numpy=lambda: B.np_gelu(x + gam), torch=t.get("bias_gelu"))
    add("bias_act_backward gelu", x.shape, dt, 3 * nb,
        ours=lambda: nn.bias_act_backward(dy, x, gam, "gelu"),
        ours_out=lambda: nn.bias_act_backward(dy, x, gam, "gelu", out=ol))
    add("bias_act relu", x.shape, dt, 2 * nb, "torch: relu(x + b)",
        ours=lambda: nn.bias_act(x, gam, "relu"),
        ours_out=lambda: nn.bias_act(x, gam, "relu", out=ol),
        numpy=lambda: np.maximum(x + gam, 0), torch=t.get("bias_relu"))
    add("bias_act_backward relu", x.shape, dt, 3 * nb,
        ours=lambda: nn.bias_act_backward(dy, x, gam, "relu"),
        ours_out=lambda: nn.bias_act_backward(dy, x, gam, "relu", out=ol))
    if dt == np.float64:  # wide inputs: 9.5% of lanes past float64's central pieces
        xw = 3 * x
        note = "x ~ N(0, 3^2): 9.5% of lanes put aside for the full-range path"
        add("gelu, wide x", x.shape, dt, 2 * nb, note, ours=lambda: nn.gelu(xw),
            ours_out=lambda: nn.gelu(xw, out=ol))
        add("gelu_backward, wide x", x.shape, dt, 3 * nb, note,
            ours=lambda: nn.gelu_backward(dy, xw), ours_out=lambda: nn.gelu_backward(dy, xw, out=ol))


def bench_data_kernels(tab: Table, tb, rows: int, dt) -> None:
    """int8 quantisation, top-k sparsification and search (1 query: a memory-bound scan)."""
    rng = np.random.default_rng(1)
    s = np.dtype(dt).itemsize
    w = rng.standard_normal((rows // 4, 1024)).astype(dt)
    q8, sc = quant.quantize_int8(w)
    wo = empty_aligned(w.shape, dt)
    qo = np.empty(w.shape, np.int8)
    tab.add("quantize_int8", w.shape, dt, w.size * (s + 1),
            ours=lambda: quant.quantize_int8(w), numpy=lambda: B.np_quantize(w),
            ours_out=lambda: quant.quantize_int8(w, out=qo))
    tab.add("dequantize_int8", w.shape, dt, w.size * (s + 1),
            ours=lambda: quant.dequantize_int8(q8, sc, dt), numpy=lambda: q8 * sc[:, None],
            ours_out=lambda: quant.dequantize_int8(q8, sc, dt, out=wo))
    n = w.size
    g = rng.standard_normal(n).astype(dt)
    r1, r2 = np.zeros(n, dt), np.zeros(n, dt)
    k = n // 100
    tt = None
    if tb:
        torch = tb[0]
        tg = torch.from_numpy(g)
        tr = torch.zeros(n, dtype=tg.dtype)
        tt = lambda: B.torch_topk_sparsify(torch, tg, tr, k)  # noqa: E731
    tab.add("topk_sparsify (1%)", (n,), dt, 3 * n * s,
            "bytes: minimum (g, r in; r out); two passes, so that a NaN/inf is refused "
            "before r changes; torch: topk of abs(r + g), indices sorted",
            ours=lambda: compress.topk_sparsify(g, r1, k),
            numpy=lambda: B.np_topk_sparsify(g, r2, k), torch=tt)
    r3 = np.zeros(n, dt)
    tab.add("topk_sparsify (1%) one_pass=True", (n,), dt, 3 * n * s,
            "one pass: on NaN/inf it still raises, but r already holds r + g",
            ours=lambda: compress.topk_sparsify(g, r3, k, one_pass=True),
            numpy=lambda: B.np_topk_sparsify(g, r2, k))
    ef = compress.ErrorFeedback(n, dt)
    tab.add("topk_sparsify (1%) out= (ErrorFeedback)", (n,), dt, 3 * n * s,
            "one pass into a spare buffer (non-temporal stores), swapped each step: r is "
            "only read, so a NaN/inf is refused with r unchanged",
            ours=lambda: ef.step(g, k),
            numpy=lambda: B.np_topk_sparsify(g, r2, k))
    emb = rng.standard_normal((rows * 2, 64)).astype(dt)
    en = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for nq in (1, 16, 64):
        qs = rng.standard_normal((nq, 64)).astype(dt)
        # one query: a memory-bound scan (the '% triad' goal applies); 16 and 64 do
        # 2 q flops per element read, so they are compute-bound (64 takes the GEMM path)
        nb = emb.nbytes if nq == 1 else None
        path = ("GEMM path" if nq >= search._gemm_min_queries(np.dtype(dt), emb.shape[1])
                else "fused scan")
        kind = path + ("" if nb else f", compute-bound: {2 * nq * emb.size / 1e9:.2f} GFLOP")
        tab.add(f"topk_cosine q={nq} k=10", emb.shape, dt, nb,
                kind + "; both norm the rows inside the call",
                ours=lambda qs=qs: search.topk_cosine(qs, emb, 10),
                numpy=lambda qs=qs: B.np_topk_cosine_raw(qs, emb, 10))
        tab.add(f"topk_cosine q={nq} k=10 normalized=True", emb.shape, dt, nb,
                kind + "; both on pre-normalised rows",
                ours=lambda qs=qs: search.topk_cosine(qs, en, 10, normalized=True),
                numpy=lambda qs=qs: B.np_topk_cosine(qs, en, 10))
        if nq != 16:  # k = 1000: each query's best kept in pools of 2k (search.POOL_MIN_K)
            tab.add(f"topk_cosine q={nq} k=1000", emb.shape, dt, nb,
                    kind + "; both norm the rows inside the call",
                    ours=lambda qs=qs: search.topk_cosine(qs, emb, 1000),
                    numpy=lambda qs=qs: B.np_topk_cosine_raw(qs, emb, 1000))


def bench_ceilings(rows: int = 2048, cols: int = 256) -> list[dict]:
    """Compute ceilings: each elementwise/row kernel, on both cores, on a block that stays
    in the L3 (at most 12 MB in all), as ns per element per core and as the GB/s
    it would move if memory cost nothing. A row whose ceiling is below 80% of the triad
    cannot reach the goal in that run however its memory access is arranged: it is
    compute-bound there."""
    out = []
    threads = numba.get_num_threads()
    for dt in (np.float32, np.float64):
        rng = np.random.default_rng(3)
        x = rng.standard_normal((rows, cols)).astype(dt)
        dy = rng.standard_normal(x.shape).astype(dt)
        o = empty_aligned(x.shape, dt, apart_from=x)
        ol = empty_aligned(x.shape, dt, like=x, apart_from=x)
        y = rng.integers(0, cols, rows)
        gam, bet = np.ones(cols, dt), np.zeros(cols, dt)
        _, mu, rs = nn.layer_norm(x, gam, bet)
        st = (empty_aligned(rows, dt), empty_aligned(rows, dt))
        cases = [
            ("softmax_cross_entropy+grad", 2, lambda: nn.softmax_cross_entropy(x, y, out=o)),
            ("layer_norm", 2, lambda: nn.layer_norm(x, gam, bet, out=o, mean_out=st[0],
                                                    rstd_out=st[1])),
            ("layer_norm_backward", 3, lambda: nn.layer_norm_backward(dy, x, gam, mu, rs, out=o)),
            ("gelu", 2, lambda: nn.gelu(x, out=ol)),
            ("gelu_backward", 3, lambda: nn.gelu_backward(dy, x, out=ol)),
            ("bias_act gelu", 2, lambda: nn.bias_act(x, gam, out=ol)),
            ("bias_act_backward gelu", 3, lambda: nn.bias_act_backward(dy, x, gam, "gelu",
                                                                     out=ol)),
        ]
        for name, streams, fn in cases:
            def reps(fn=fn):
                for _ in range(20):
                    fn()
            t = best(reps, repeat=5) / 20
            out.append({"kernel": name, "dtype": str(np.dtype(dt)),
                        "ns_per_elem": t * threads / x.size * 1e9,
                        "gb_s_2cores": streams * x.nbytes / t / GB})
    for r in out:
        print(f"  ceiling {r['kernel']:28s} {r['dtype']:8s} {r['ns_per_elem']:.3f} ns/elem/core "
              f"= {r['gb_s_2cores']:.0f} GB/s on 2 cores", flush=True)
    return out


def bench_kmeans(configs, iters: int) -> list[dict]:
    """Same data, same init, same number of Lloyd iterations: ours vs scikit-learn."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        print("  scikit-learn not installed: skipping k-means comparison")
        return []
    out = []
    for n, d, k, dt in configs:
        x = np.random.default_rng(2).random((n, d)).astype(dt)  # uniform: no early stop
        c0 = x[:k].copy()
        sk = KMeans(n_clusters=k, init=c0, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd")
        res: dict = {}

        def ours(x=x, c0=c0, res=res):
            res["r"] = cluster.kmeans(x, c0, max_iter=iters, tol=0.0)

        t = race({"ours": ours, "sklearn": lambda sk=sk, x=x: sk.fit(x)}, repeat=3)
        t_ours, t_sk = t["ours"], t["sklearn"]
        _, _, inertia, n_iter = res["r"]
        # one assignment to the fitted centroids: kmeans_assign (labels and distances)
        # against the fitted model's predict (labels)
        cf = np.ascontiguousarray(sk.cluster_centers_, dtype=dt)
        ta = race({"ours": lambda x=x, cf=cf: cluster.kmeans_assign(x, cf),
                   "sklearn": lambda sk=sk, x=x: sk.predict(x)}, repeat=7)
        row = {"shape": (n, d), "k": k, "dtype": str(np.dtype(dt)), "iters_ours": n_iter,
               "iters_sklearn": int(sk.n_iter_), "ours_ms": t_ours * 1e3,
               "sklearn_ms": t_sk * 1e3, "inertia_rel_diff": abs(inertia - sk.inertia_) / sk.inertia_,
               "assign_ours_ms": ta["ours"] * 1e3, "assign_sklearn_ms": ta["sklearn"] * 1e3}
        out.append(row)
        print(f"  kmeans n={n} d={d} k={k} {dt.__name__}: ours {t_ours * 1e3:.1f} ms, "
              f"sklearn {t_sk * 1e3:.1f} ms (x{t_sk / t_ours:.2f}), iters {n_iter}/{sk.n_iter_}; "
              f"assign {ta['ours'] * 1e3:.2f} / predict {ta['sklearn'] * 1e3:.2f} ms",
              flush=True)
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def bench_training() -> list[dict]:
    """Samples/s of the training app's last epoch with 1 and 2 MPI ranks."""
    out = []
    args = ["--epochs", "3", "--samples", "131072", "--hidden", "256", "--batch-size", "1024"]
    mpirun = shutil.which("mpirun")
    for ranks in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            metrics = os.path.join(tmp, "m.json")
            argv = [sys.executable, "-m", "kernels.apps.train", *args, "--metrics", metrics]
            if ranks > 1:
                if not mpirun:
                    print("  mpirun not found: skipping the 2-rank run")
                    continue
                argv = [mpirun, "-n", str(ranks), "--oversubscribe", *argv]
            subprocess.run(argv, cwd=REPO, env=_env(), check=True, capture_output=True)
            m = json.loads(Path(metrics).read_text())
        last = m["epochs"][-1]
        out.append({"ranks": ranks, "threads_per_rank": m["threads_per_rank"],
                    "samples_per_s": last["samples_per_s"], "eval_accuracy": last["eval_accuracy"]})
        print(f"  train {ranks} rank(s): {last['samples_per_s']:.0f} samples/s", flush=True)
    return out


def bench_compile() -> dict:
    """Cold (empty cache folder) and warm (cached) first-call times of every kernel, in one
    process (``--jobs 1``), and cold with the warm-up's default worker processes."""
    from kernels.warmup import default_jobs

    jobs = default_jobs()
    runs = {}
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as many:
        for name, cache, n in (("cold", one, 1), ("warm", one, 1),
                               (f"cold, --jobs {jobs}", many, jobs)):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "kernels.warmup", "--json",
                                   "--jobs", str(n)], cwd=REPO,
                                  env={**_env(), "HPCGW_NUMBA_CACHE_DIR": cache},
                                  check=True, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            times = json.loads(proc.stdout)
            imp = times.pop("import numba")
            runs[name] = {"process_s": wall, "import_numba_s": imp,
                          "kernels_s": sum(times.values()),
                          "slowest": max(times.items(), key=lambda kv: kv[1]), "n": len(times)}
    print(f"  compile: cold {runs['cold']['kernels_s']:.1f} s, warm "
          f"{runs['warm']['kernels_s']:.2f} s for {runs['cold']['n']} kernel/dtype pairs; "
          f"cold with {jobs} worker(s) {runs[f'cold, --jobs {jobs}']['process_s']:.1f} s wall",
          flush=True)
    return runs


def _l3_mib() -> float | None:
    """The L3 size the kernel reports for CPU 0 (``None`` where it does not say)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as fh:
            text = fh.read().strip()
    except OSError:
        return None
    scale = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}.get(text[-1:])
    return float(text[:-1]) * scale if scale and text[:-1].isdigit() else None


def environment() -> dict:
    """Versions, CPU, threads and which BLAS kernel ran (threadpoolctl)."""
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "numba_threads": numba.get_num_threads(),
            "threading_layer": numba.threading_layer(), "cpu": platform.processor() or "",
            "cores": os.cpu_count(),
            "openblas_env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                             if k in os.environ}}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in fh if "model name" in ln)
    except (OSError, StopIteration):
        pass
    info["l3_mib"] = _l3_mib()
    # the core generation LLVM compiles for: the VM's model name is only "AMD EPYC", and
    # hosts differ between sessions (znver4 runs 512-bit FMAs at half znver5's rate, and
    # the compute-bound rows move with it)
    import llvmlite.binding as llvm

    info["cpu"] += f" ({llvm.get_host_cpu_name()})"
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "architecture",
                                               "num_threads", "filepath")}
                        for p in threadpool_info() if p.get("user_api") == "blas"]
    except ImportError:
        info["blas"] = "threadpoolctl not installed"
    for mod in ("torch", "sklearn", "scipy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def _f(v, fmt="{:.2f}"):
    return "–" if v is None else fmt.format(v)


def _ratio(base, ours):
    return "–" if base is None else f"{base / ours:.2f}x"


def _header(res: dict, command: str) -> list[str]:
    env = res["env"]
    blas = "; ".join(f"{b['internal_api']} {b['version']} kernel {b['architecture']} "
                     f"({b['num_threads']} threads)" for b in env["blas"])
    openblas = (f"OPENBLAS_* set during the run: {env['openblas_env']}" if env["openblas_env"]
                else "OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset for this run")
    return [
        "## Kernels", "",
        f"Command (one run, {res['seconds'] / 60:.1f} min on this machine):", "",
        "```", command, "```", "",
        "To re-measure some rows only: `--only TEXT` runs the kernel rows whose name contains "
        "`TEXT` (each still raced against its own triad; no ceilings, k-means, training or "
        "compile times), `--repeat N` times each row N rounds instead of 7 (the best is "
        "kept), e.g. `python tests/benchmarks/bench_kernels.py --only \"gelu, wide\" "
        "--repeat 15`.", "",
        (f"Machine: {env['cpu']}, {env['cores']} cores (shared with other work, so figures "
         f"vary by +-20% between runs); numba {env['numba']} ({env['numba_threads']} threads, "
         f"{env['threading_layer']} layer), numpy {env['numpy']}, torch {env['torch']} (CPU, "
         f"{res['torch_threads']} threads), scikit-learn {env['sklearn']}, scipy {env['scipy']}. "
         f"BLAS: {blas}. {openblas}."), "",
        (f"**STREAM triad (numba prange, 3 x {res['triad_n'] * 8 / 2**20:.0f} MiB float64): "
         f"{res['triad_gb_s']:.1f} GB/s** at the start, {res['triad_end_gb_s']:.1f} at the end "
         "(best of 3 each): the machine is shared and its bandwidth moves, so each row also "
         "times a triad in the same round-robin as the kernel and its baselines, and "
         "'% triad' is against that one. GB/s = the minimum bytes a kernel must move (reads + "
         "writes, no write-allocate, as STREAM counts; the softmax's labels and layer norm's "
         "row statistics, mean and rstd, included) / best of 7 timed round-robin with the "
         "baselines, measured with a "
         "reused `out=` buffer where the kernel has one, allocated as the kernels allocate "
         "their own outputs (`kernels.empty_aligned`: rows 64-byte aligned, or at the "
         "input's offset in a cache line for GELU, and half a page from the input). Kernels that write a "
         "separate output with plain stores pay a write-allocate read the triad pays too; "
         "large outputs of float64 GELU and layer norm and of dequantisation skip it "
         "(non-temporal stores), and in-place AdamW pays none. Ratios (> 1 = Numba faster) "
         "use the plain call that allocates its output, as the NumPy/PyTorch calls do. "
         f"After each baseline call the round waits {SETTLE_S} s and runs the triad once "
         "untimed: the baselines' BLAS/OpenMP threads spin for about 0.1 s after a call, "
         "and a kernel timed inside that window shares the 2 cores with them. Every timed "
         f"call (the triad's too) starts after an untimed read of {Table.CLEAN_BYTES >> 20} "
         f"MiB (3x the 32 MB L3 it was sized on; this host's L3: {_l3_text(res)}), so "
         "none of them pays for writing back the dirty lines a writer "
         "before it left in the cache (before this, `ours` always came right after the "
         "triad and paid for the L3's worth of them: the one-query search took 1.50 ms "
         "there against 1.27-1.33 ms after a read)."), "",
        ("**Read stream:** each round also sums one of the triad's "
         f"{res['triad_n'] * 8 / 2**20:.0f} MiB arrays (one read-only stream, nothing written), and '% read' is the kernel's "
         "GB/s against that. A kernel that mostly reads (the search scan, quantisation, the "
         "sparsification) cannot beat it by much, so where the triad runs well above it "
         "(a host whose cores each keep too few reads in flight to use the bandwidth a "
         "triad's writes add), '% triad' shows the host, not the kernel."), "",
    ]


def _kernel_table(rows: list[dict]) -> list[str]:
    out = [("| kernel | dtype | shape | ours ms | ours ms, out= | GB/s | triad GB/s | % triad "
            "| read GB/s | % read | NumPy ms | vs NumPy | PyTorch ms | vs PyTorch | note |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['kernel']} | {r['dtype']} | {r['shape']} | {r['ours_ms']:.2f} | "
                   f"{_f(r['ours_out_ms'])} | {_f(r['gb_s'], '{:.1f}')} | "
                   f"{r['triad_gb_s']:.1f} | {_f(r['pct_triad'], '{:.0f}%')} | "
                   f"{_f(r.get('read_gb_s'), '{:.1f}')} | {_f(r.get('pct_read'), '{:.0f}%')} | "
                   f"{_f(r['numpy_ms'])} | {_ratio(r['numpy_ms'], r['ours_ms'])} | "
                   f"{_f(r['torch_ms'])} | {_ratio(r['torch_ms'], r['ours_ms'])} | {r['note']} |")
    return out


def _kmeans_table(res: dict) -> list[str]:
    out = ["", (f"k-means, {res['kmeans_iters']} Lloyd iterations from the same initial "
                "centroids (uniform data, so neither stops early), vs "
                "`sklearn.cluster.KMeans(algorithm='lloyd', n_init=1, tol=0).fit`:"), "",
           ("| n x d | k | dtype | iterations (ours/sklearn) | ours ms | sklearn ms "
            "| vs sklearn | inertia rel. diff | assign ms (`kmeans_assign`) "
            "| sklearn `predict` ms | vs sklearn |"),
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["kmeans"]:
        out.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['k']} | {r['dtype']} | "
                   f"{r['iters_ours']}/{r['iters_sklearn']} | {r['ours_ms']:.1f} | "
                   f"{r['sklearn_ms']:.1f} | {_ratio(r['sklearn_ms'], r['ours_ms'])} | "
                   f"{r['inertia_rel_diff']:.1e} | {r['assign_ours_ms']:.2f} | "
                   f"{r['assign_sklearn_ms']:.2f} | "
                   f"{_ratio(r['assign_sklearn_ms'], r['assign_ours_ms'])} |")
    out += ["", ("The last three columns: one assignment of the rows to the fitted "
                 "centroids, `kernels.cluster.kmeans_assign` (labels and squared distances; "
                 "the GEMM path from k = 32 and d * k = 1024; from k = 256, a tile-major "
                 "copy of the rows made for the call, as the Lloyd loop's) against the "
                 "fitted model's `predict` (labels only).")]
    return out


def _train_compile_tables(res: dict) -> list[str]:
    out = ["", ("Training (`python -m kernels.apps.train --epochs 3 --samples 131072 --hidden 256 "
                "--batch-size 1024`, last epoch; 2 ranks = `mpirun -n 2` on the same 2 cores):"),
           "", "| ranks | Numba threads/rank | samples/s | eval accuracy |", "|---|---|---|---|"]
    for r in res["training"]:
        out.append(f"| {r['ranks']} | {r['threads_per_rank']} | {r['samples_per_s']:.0f} | "
                   f"{r['eval_accuracy']:.3f} |")
    c = res["compile"]
    out += ["", (f"Compile time ({c['cold']['n']} kernel/dtype pairs via "
                 "`python -m kernels.warmup --jobs N`, fresh `HPCGW_NUMBA_CACHE_DIR`; with "
                 "workers the kernels' seconds add up each worker's compile and the final "
                 "load, so only the whole process's time shows the gain):"), "",
            "| | whole process s | import numba s | first calls, all kernels s | slowest |",
            "|---|---|---|---|---|"]
    for name in c:
        r = c[name]
        label = f"{name}, --jobs 1" if name in ("cold", "warm") else name
        out.append(f"| {label} | {r['process_s']:.2f} | {r['import_numba_s']:.2f} | "
                   f"{r['kernels_s']:.2f} | {r['slowest'][0]} {r['slowest'][1]:.2f} s |")
    return out


def _l3_text(res: dict) -> str:
    l3 = res["env"].get("l3_mib")
    return f"{l3:.0f} MiB" if l3 else "not reported"


def _ceiling_table(res: dict) -> list[str]:
    if not res.get("ceilings"):
        return []
    out = ["", ("Compute ceilings: each kernel on a 2048 x 256 block that stays in the L3 "
                "cache (Python call overhead included), both cores, as ns per element per "
                "core and as the GB/s it would move if memory cost nothing (same byte "
                "count as above). Where this is below 80% of a row's triad, that row is "
                "compute-bound in that run:"), "",
           "| kernel | dtype | ns / element / core | ceiling GB/s |", "|---|---|---|---|"]
    for r in res.get("ceilings", []):
        out.append(f"| {r['kernel']} | {r['dtype']} | {r['ns_per_elem']:.3f} | "
                   f"{r['gb_s_2cores']:.0f} |")
    return out


def render(res: dict, command: str) -> str:
    """The ``## Kernels`` markdown section."""
    lines = (_header(res, command) + _kernel_table(res["kernels"]) + _ceiling_table(res)
             + _kmeans_table(res)
             + _train_compile_tables(res))
    return "\n".join(lines) + "\n"


EARLIER = "### Earlier runs"  # kept, with what follows it in the section, by write_section


def write_section(path: Path, section: str) -> None:
    """Replace the ``## Kernels`` section of ``path`` (or append it); keep everything else,
    and the section's ``### Earlier runs`` part (the notes on past runs) after the new
    tables."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == "## Kernels"), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        kept = next((i for i in range(start + 1, end) if lines[i].strip() == EARLIER), end)
        earlier = "".join(lines[kept:end]).rstrip("\n")
        rest = "".join(lines[end:])
        new = ("".join(lines[:start]) + section + ("\n" + earlier + "\n" if earlier else "")
               + ("\n" + rest if rest else ""))
    path.write_text(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="markdown file whose '## Kernels' section is replaced")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not figures)")
    ap.add_argument("--wait-triad", type=float, default=0.0, metavar="GBS",
                    help="before each kernel row, wait (at most 10 min) until a triad reaches "
                         "GBS: measures the rows in one bandwidth regime of a shared machine")
    ap.add_argument("--kernels-only", action="store_true",
                    help="only the kernel rows and compute ceilings (no k-means, training, "
                         "compile times)")
    ap.add_argument("--only", metavar="TEXT",
                    help="only the kernel rows whose name contains TEXT (implies --kernels-only; "
                         "e.g. 'gelu, wide' or 'softmax'), for re-measuring a row quickly")
    ap.add_argument("--repeat", type=int, default=7, metavar="N",
                    help="timed rounds per kernel row (default 7; the best is kept)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.only is not None:
        args.kernels_only = True
    t0 = time.perf_counter()
    scale = 16 if args.quick else 1
    tb = B.torch_baselines()
    if tb:
        tb[0].set_num_threads(os.cpu_count() or 1)
    res = {"env": environment(), "torch_threads": tb[0].get_num_threads() if tb else None}
    print(f"BLAS: {res['env']['blas']}", flush=True)
    res["triad_n"] = (1 << 25) // scale
    res["triad_gb_s"] = max(stream_triad(res["triad_n"]) for _ in range(3))
    print(f"  STREAM triad: {res['triad_gb_s']:.1f} GB/s", flush=True)
    tab = Table(res["triad_n"], wait_triad=args.wait_triad, only=args.only, repeat=args.repeat)
    for dt in (np.float32, np.float64):
        bench_adamw(tab, tb, (1 << 24) // scale, dt)
        bench_nn(tab, tb, (1 << 17) // scale, 256, dt)
    bench_data_kernels(tab, tb, (1 << 17) // scale, np.float32)
    res["kernels"] = tab.rows
    if args.only is not None and not tab.rows:
        ap.error(f"--only {args.only!r} matches no kernel row")
    res["ceilings"] = ([] if args.only is not None
                       else bench_ceilings(2048 // (4 if args.quick else 1)))
    if args.kernels_only:  # the tables on stdout; --out is left alone
        print("\n".join(_kernel_table(res["kernels"]) + _ceiling_table(res)))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2, default=str))
        return 0
    res["kmeans_iters"] = 20
    res["kmeans"] = bench_kmeans([(200_000 // scale, 16, 8, np.float32),
                                  (200_000 // scale, 16, 8, np.float64),
                                  (100_000 // scale, 64, 64, np.float32),
                                  (100_000 // scale, 32, 256, np.float32)], res["kmeans_iters"])
    res["training"] = bench_training()
    res["compile"] = bench_compile()
    res["triad_end_gb_s"] = max(stream_triad(res["triad_n"]) for _ in range(3))  # re-check
    print(f"  STREAM triad at the end: {res['triad_end_gb_s']:.1f} GB/s", flush=True)
    res["seconds"] = time.perf_counter() - t0
    command = ("env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "
               "python tests/benchmarks/bench_kernels.py --out docs/benchmarks.md")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    if args.out:
        write_section(args.out, render(res, command))
    print(f"done in {res['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
