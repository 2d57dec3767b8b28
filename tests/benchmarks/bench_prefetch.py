#!/usr/bin/env python
"""Do the kernels' software prefetch hints pay on this machine? One command:

    python tests/benchmarks/bench_prefetch.py [--rounds 15] [--only search]

For each kernel that issues ``llvm.prefetch`` hints (``kernels._prefetch``), two copies
of its compiled code are built in this process: one as shipped and one with
``kernels._prefetch.ENABLED`` false, where the hints emit nothing. The public call runs
with one copy, then the other, round after round (in cache, then from memory with a
96 MiB read before each call), and the table gives the median and quartiles of the
per-round ratio ``time without hints / time with``: above 1, the hints pay. A ratio
within a round is far steadier on a shared host than two best-of times taken a minute
apart. Whether a hint pays depends on the CPU's own prefetcher, so this is the check to
rerun on a new host. The copy with hints has the host-dependent ones too
(``kernels._prefetch.ROW_HINTS`` set for it, whatever this host's setting; the rows
marked "row hint" say whether the host has them on), and at every row size: the sizes
below which AMD hosts go without (``kernels.nn.STREAM_AHEAD_MIN_BYTES``,
``SOFTMAX_BLOCK_HINT_BYTES``) are lifted for it. A kernel whose loop is in a chunk
function of its own (not inlined: docs/kernels.md, "Where compile time goes") is listed
with that function, so the kernel's copies compile against the chunk's copies; a copy of
the kernel alone would link the one cached chunk and compare it with itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numba  # noqa: E402
import numpy as np  # noqa: E402

from kernels import (  # noqa: E402
    _prefetch, _simd, activations, compress, empty_aligned, nn, optim, quant, search)
from kernels._jit import fresh_copy  # noqa: E402


# kernels.nn's row sizes below which AMD hosts go without a hint, as Intel hosts set
# them (read when a kernel is compiled): the copy with hints has them everywhere
_HINTS_EVERYWHERE = {"STREAM_AHEAD_MIN_BYTES": 0, "SOFTMAX_BLOCK_HINT_BYTES": 512}


def _copies(mod: ModuleType, names: list[str], call: Callable[[], object]) -> dict:
    """``{hints: {name: dispatcher}}``, each compiled by a first call with the flag set
    (the flag is read when the code is generated, not when the dispatcher is made)."""
    orig = {n: getattr(mod, n) for n in names}
    out = {}
    row = _prefetch.ROW_HINTS
    host = {k: getattr(nn, k) for k in _HINTS_EVERYWHERE}
    try:
        for hints in (True, False):
            _prefetch.ENABLED = _prefetch.ROW_HINTS = hints
            for k, v in _HINTS_EVERYWHERE.items():  # the host's size limits lifted too
                setattr(nn, k, v if hints else host[k])
            out[hints] = {}
            for n in names:  # each with its own options (fast-math flags, parallel)
                out[hints][n] = fresh_copy(orig[n])
                setattr(mod, n, out[hints][n])
            call()
    finally:
        _prefetch.ENABLED, _prefetch.ROW_HINTS = True, row
        for k, v in host.items():
            setattr(nn, k, v)
        for n in names:
            setattr(mod, n, orig[n])
    return out


def ab(mod: ModuleType, names: list[str], call: Callable[[], object], rounds: int,
       flush: bool) -> list[float]:
    """Quartiles of the per-round ratio time without hints / time with them."""
    cps = _copies(mod, names, call)
    orig = {n: getattr(mod, n) for n in names}
    big = np.ones(12 << 20)  # 96 MiB: evicts the L3 before each call from memory
    t = {True: [], False: []}
    try:
        for _ in range(rounds):
            for hints in (True, False):
                for n in names:
                    setattr(mod, n, cps[hints][n])
                if flush:
                    big.sum()
                t0 = time.perf_counter()
                call()
                t[hints].append(time.perf_counter() - t0)
    finally:
        for n in names:
            setattr(mod, n, orig[n])
    return list(np.percentile(np.array(t[False]) / np.array(t[True]), [25, 50, 75]))


def _portable_search(q: np.ndarray, e: np.ndarray, normalized: bool) -> object:
    """``topk_cosine`` through ``search._topk`` (four rows a step as LLVM vectorises them,
    with the hint), as on a CPU without the vector scan."""
    search.VEC_SCAN = False
    try:
        return search.topk_cosine(q, e, 10, normalized=normalized)
    finally:
        search.VEC_SCAN = True


def _by_table(call: Callable[[], object]) -> Callable[[], object]:
    """``call`` with ``activations._GELU_VEC`` and ``_GELU_STAGED`` (the kernels by bias
    and direction) first pointed at the module's kernels of the moment, the copies ``ab``
    puts there."""
    def run() -> object:
        for (table, key), name in _GELU_NAMES.items():
            getattr(activations, table)[key] = getattr(activations, name)
        return call()
    return run


_GELU_NAMES = {(table, key): f.py_func.__name__
               for table in ("_GELU_VEC", "_GELU_STAGED")
               for key, f in getattr(activations, table).items()}


def _gelu_names(backward: bool) -> list[str]:
    """The GELU kernels (plain and staged) of one direction and their chunk functions,
    where the hints are: a kernel's copy compiles against the chunk copies."""
    return ["_gelu_chunk", "_gelu_chunk_staged"] + [
        name for (_, (bias, bwd)), name in _GELU_NAMES.items() if not bias and bwd == backward]


_BIAS_NAMES = ["_bias_act_streamed", "_bias_act_bwd_streamed", "_bias_act_chunk"]


def _streamed(call: Callable[[], object]) -> Callable[[], object]:
    """``call`` with outputs of every size streamed: bias + ReLU's hints are in the
    kernels that write a streamed output only."""
    def run() -> object:
        with _simd.streaming_every_output():
            return call()
    return run


def cases(size: int) -> list[tuple[str, ModuleType, list[str], Callable[[], object]]]:
    """(label, module, the jitted functions that hold hints, the public call)."""
    rng = np.random.default_rng(0)
    out = []
    here = "on" if _prefetch.ROW_HINTS else "off"
    for dt in (np.float32, np.float64):
        name = np.dtype(dt).name
        for d in (256, 1024, 4096):
            x = rng.standard_normal((size // d, d)).astype(dt)
            g, b = np.ones(d, dt), np.zeros(d, dt)
            y = empty_aligned(x.shape, dt, apart_from=x)
            _, mu, rs = nn.layer_norm(x, g, b)
            dy = rng.standard_normal(x.shape).astype(dt)
            dx = empty_aligned(x.shape, dt, apart_from=x)
            out.append((f"layer_norm {name} {d} features", nn,
                        ["_ln_fwd", "_ln_fwd_one_pass", "_ln_fwd_chunk", "_ln_fwd_one_pass_chunk"],
                        lambda x=x, g=g, b=b, y=y: nn.layer_norm(x, g, b, out=y)))
            out.append((f"layer_norm_backward {name} {d} features", nn,
                        ["_ln_bwd", "_ln_bwd_wide", "_ln_bwd_chunk", "_ln_bwd_wide_chunk"],
                        lambda dy=dy, x=x, g=g, mu=mu, rs=rs, dx=dx:
                        nn.layer_norm_backward(dy, x, g, mu, rs, out=dx)))
        c = 10
        lg = rng.standard_normal((size // c, c)).astype(dt)
        lab = rng.integers(0, c, size // c)
        out.append((f"softmax_cross_entropy {name} 10 classes", nn, ["_softmax_xent_blocks"],
                    lambda lg=lg, lab=lab: nn.softmax_cross_entropy(lg, lab)))
        # streamed gradients (a large aligned out=): the next row asked for meanwhile
        c = 256
        lg2 = rng.standard_normal((size // c, c)).astype(dt)
        lab2 = rng.integers(0, c, size // c)
        go = empty_aligned(lg2.shape, dt, apart_from=lg2)
        out.append((f"softmax_cross_entropy {name} 256 classes, streamed (row hint, "
                    f"{here} here)", nn,
                    ["_softmax_xent", "_softmax_xent_f64_vec", "_softmax_xent_chunk"],
                    lambda lg=lg2, lab=lab2, go=go: nn.softmax_cross_entropy(lg, lab, out=go)))
        # the row loops ask for the next row however the gradient is stored, here none
        out.append((f"softmax_cross_entropy {name} 256 classes, no gradient (row hint, "
                    f"{here} here)", nn, ["_softmax_xent", "_softmax_xent_chunk"],
                    lambda lg=lg2, lab=lab2: nn.softmax_cross_entropy(lg, lab, grad=False)))
        # rows held in registers, each call's rows asked for SOFTMAX_SHORT_HINT_BYTES on
        c = 100 if dt == np.float32 else 48
        lg3 = rng.standard_normal((size // c, c)).astype(dt)
        lab3 = rng.integers(0, c, size // c)
        out.append((f"softmax_cross_entropy {name} {c} classes, in registers (row hint, "
                    f"{here} here)", nn, ["_softmax_xent_short"],
                    lambda lg=lg3, lab=lab3: nn.softmax_cross_entropy(lg, lab)))
    e = rng.standard_normal((size // 64, 64)).astype(np.float32)
    q = rng.standard_normal((1, 64)).astype(np.float32)
    for nz in (True, False):
        out.append((f"topk_cosine float32 q=1 normalized={nz}, portable scan", search,
                    ["_topk"], lambda nz=nz: _portable_search(q, e, nz)))
        if search.VEC_SCAN:
            out.append((f"topk_cosine float32 q=1 normalized={nz}, vector scan (row hint, "
                        f"{here} here)", search, ["_topk_vec", "_topk_vec_chunk"],
                        lambda nz=nz: search.topk_cosine(q, e, 10, normalized=nz)))
    for dt in (np.float32, np.float64):
        w = rng.standard_normal((size // 1024, 1024)).astype(dt)
        qo = np.empty(w.shape, np.int8)
        out.append((f"quantize_int8 {np.dtype(dt).name} 1024 features (row hint, {here} here)",
                    quant, ["_quantize"], lambda w=w, qo=qo: quant.quantize_int8(w, out=qo)))
    for dt in (np.float32, np.float64):
        for scale in (1.0, 3.0):
            if scale != 1.0 and dt == np.float32:  # nothing put aside in float32
                continue
            x = (scale * rng.standard_normal((size // 256, 256))).astype(dt)
            dy = rng.standard_normal(x.shape).astype(dt)
            go = empty_aligned(x.shape, dt, apart_from=x)
            what = f"{np.dtype(dt).name} x ~ N(0, {scale:g}^2) (row hint, {here} here)"
            out.append((f"gelu {what}", activations, _gelu_names(False),
                        _by_table(lambda x=x, go=go: nn.gelu(x, out=go))))
            out.append((f"gelu_backward {what}", activations, _gelu_names(True),
                        _by_table(lambda x=x, dy=dy, go=go: nn.gelu_backward(dy, x, out=go))))
    for dt in (np.float32, np.float64):  # the streamed kernels, at every size here
        x = rng.standard_normal((size // 256, 256)).astype(dt)
        dy = rng.standard_normal(x.shape).astype(dt)
        b = np.ones(256, dt)
        go = empty_aligned(x.shape, dt, like=x, apart_from=x)
        what = f"{np.dtype(dt).name} 256 features, streamed (row hint, {here} here)"
        out.append((f"bias_act relu {what}", activations, _BIAS_NAMES,
                    _streamed(lambda x=x, b=b, go=go: nn.bias_act(x, b, "relu", out=go))))
        out.append((f"bias_act_backward relu {what}", activations, _BIAS_NAMES,
                    _streamed(lambda x=x, dy=dy, b=b, go=go:
                              nn.bias_act_backward(dy, x, b, "relu", out=go))))
    pa = rng.standard_normal(size).astype(np.float32)
    ga = rng.standard_normal(size).astype(np.float32)
    ma, va = optim._moment_buffers(pa)
    ma[:], va[:] = 0.0, 0.0
    f = np.float32
    consts = (f(0.99), f(1e-3), f(0.9), f(0.1), f(0.999), f(0.001), f(1.0), f(1e-8))
    # the blocked loop itself (adamw_step takes it where ROW_HINTS is on, float32 only)
    out.append((f"adamw_step float32 (row hint, {here} here)", optim, ["_adamw_hinted"],
                lambda: optim._adamw_hinted(pa, ga, ma, va, *consts, 8)))
    gr = rng.standard_normal(size).astype(np.float32)
    res = np.zeros_like(gr)
    out.append(("topk_sparsify float32 1% (the sample)", compress, ["_line_sample"],
                lambda: compress.topk_sparsify(gr, res, max(1, size // 100))))
    spare = np.zeros_like(gr)
    for mode, kw in (("default", {}), ("one_pass=True", {"one_pass": True}),
                     ("out=", {"out": spare})):
        out.append((f"topk_sparsify float32 1% {mode}, the candidate pass (row hint, "
                    f"{here} here)", compress, ["_candidates"],
                    lambda kw=kw: compress.topk_sparsify(gr, res, max(1, size // 100), **kw)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--only", default="", help="only the rows whose label contains this")
    args = ap.parse_args()
    print(f"numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads")
    print("| kernel | where | no hints / hints: median | quartiles |")
    print("|---|---|---|---|")
    for where, size, rounds, flush in (("in cache (2^19)", 1 << 19, 20 * args.rounds, False),
                                       ("from memory (2^25)", 1 << 25, args.rounds, True)):
        for label, mod, names, call in cases(size):
            if args.only not in label:
                continue
            q1, med, q3 = ab(mod, names, call, rounds, flush)
            print(f"| {label} | {where} | {med:.2f} | {q1:.2f}-{q3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
