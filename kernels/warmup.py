"""Compile (or load from the cache) every kernel for float32 and float64.

    HPCGW_NUMBA_CACHE_DIR=/opt/hpcgw/numba-cache python -m kernels.warmup [--jobs N]

Run at image build time so jobs start with a warm cache; prints per-kernel seconds
(``--json`` for machine-readable output, used by the benchmark's compile-time figures).
``--jobs N`` compiles in N worker processes (default: the CPUs this process may use, at
most 8; numba compiles on one core), each taking the next kernel nobody has claimed;
then this process loads every kernel from the cache, compiling whatever a worker left.
The workers share the cache folder safely: ``kernels._jit`` serialises cache writes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# the slowest to compile first, so the workers end together (cold, one process: the
# threshold path 5-7 s, the float64 GELU kernels about 8 s in all)
FIRST = ("topk_sparsify threshold", "gelu", "gelu_backward", "bias_act", "bias_act_backward",
         "gelu streamed")
MAX_DEFAULT_JOBS = 8


def _calls(dt: np.dtype) -> dict[str, Callable[[], object]]:
    from kernels import _simd, cluster, compress, data, fused, gemm, nn, optim, quant, search
    from kernels._checks import empty_aligned, empty_placed

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

    def grads_then_params(n):  # params 16 bytes past the grads modulo 64 KiB
        g = np.zeros(n, dt)
        p = empty_placed(g, 16, optim._ALIAS_PERIOD)
        p[:] = 0
        return p, g, np.zeros(n, dt), np.zeros(n, dt)

    def streamed(*calls):  # float64 GELU and bias + ReLU / none have kernels of their
        # own for streamed outputs (kernels._simd.streaming_every_output)
        def run():
            with _simd.streaming_every_output():
                for call in calls:
                    call()
        return run

    def fused_pair():  # forward, then backward on its outputs
        a, _, m, r = fused.bias_gelu_layer_norm(x, v, v, v)
        fused.bias_gelu_layer_norm_backward(x, a, x, v, v, m, r)

    ow = empty_aligned(wide.shape, dt, like=wide, apart_from=wide)
    mu, rs = stats(x)
    muw, rsw = stats(wide)
    mub, rsb = stats(broad)
    mu4, rs4 = stats(four)
    return {
        "adamw_step": lambda: optim.adamw_step(x.copy(), x, x * 0, x * 0, step=1),
        # the grads read through a buffer on Intel hosts (kernels.optim._adamw_staged)
        "adamw_step grads behind params": lambda: optim.adamw_step(
            *grads_then_params(optim._PEEL_MIN), step=1),
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
        "gelu streamed": streamed(
            lambda: nn.gelu(wide, out=ow), lambda: nn.gelu_backward(wide, wide, out=ow),
            lambda: nn.bias_act(wide, vw, out=ow),
            lambda: nn.bias_act_backward(wide, wide, vw, out=ow)),
        # relu / none into a new output: the loops over rows (act a run-time value)
        "bias_act relu": lambda: (nn.bias_act(x, v, "relu"),
                                  nn.bias_act_backward(x, x, v, "relu")),
        "bias_act relu streamed": streamed(
            lambda: nn.bias_act(wide, vw, "relu", out=ow),
            lambda: nn.bias_act_backward(wide, wide, vw, "relu", out=ow)),
        "bias_gelu_layer_norm": fused_pair,
        "kmeans_assign": lambda: cluster.kmeans_assign(x, x[:2]),
        "kmeans_partial_sums": lambda: cluster.kmeans_partial_sums(x, lab, 2),
        # d * k = 1024, k = 32: the GEMM path (NumPy's BLAS on Numba's threads)
        "kmeans_assign gemm": lambda: cluster.kmeans_assign(wide[:, :32], np.ones((32, 32), dt)),
        "topk_cosine": lambda: search.topk_cosine(x, x, 2),
        "matmul": lambda: gemm.warm(dt),  # NumPy's BLAS on Numba's threads
        "topk_cosine many queries": lambda: search.warm_gemm(dt),  # its split GEMM path
        "take_rows": lambda: data.warm(dt),  # both forms (one thread, split)
        "quantize_int8": lambda: quant.quantize_int8(x),
        "dequantize_int8": lambda: quant.dequantize_int8(quant.quantize_int8(x)[0], v[:4], dt),
        # a 1-D array (rows of one element): the elementwise loops, both ways
        "int8 rows of one": lambda: quant.dequantize_int8(
            quant.quantize_int8(v)[0], v, dt),
        # small k: the one-pass pool (_pool_kth); then k near n: a select over all of them
        "topk_sparsify": lambda: [compress.topk_sparsify(x.ravel(), np.zeros(24, dt), k)
                                  for k in (3, 20)],
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


def default_jobs() -> int:
    """The CPUs this process may run on, at most ``MAX_DEFAULT_JOBS`` (each worker holds a
    numba of its own: a few hundred MB)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_JOBS))


def _order() -> list[str]:
    names = list(_calls(DTYPES[0]))
    return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


def _warm(name: str) -> dict[str, float]:
    times = {}
    for dt in DTYPES:
        t = time.perf_counter()
        _both_ways(_calls(dt)[name])
        times[f"{name}[{dt}]"] = time.perf_counter() - t
    return times


def _warm_claimed(claims: str) -> dict[str, float]:
    """Worker: each kernel (both dtypes) whose claim file this process creates first."""
    times: dict[str, float] = {}
    for i, name in enumerate(_order()):
        try:
            os.close(os.open(os.path.join(claims, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        times.update(_warm(name))
    return times


def _in_workers(jobs: int) -> dict[str, float]:
    """Seconds per ``name[dtype]`` compiled in ``jobs`` worker processes; a worker that
    fails is reported (a warning) and its kernels compile in this process afterwards."""
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="hpcgw-warmup-") as claims:
        argv = [sys.executable, "-m", "kernels.warmup", "--json", "--claims", claims]
        errs = [os.path.join(claims, f"stderr-{k}") for k in range(jobs)]
        procs = []
        for err in errs:  # (stderr to a file: a full pipe would stall a worker)
            with open(err, "w") as fh:
                procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=fh,
                                              text=True))
        for proc, err in zip(procs, errs):
            out, _ = proc.communicate()
            if proc.returncode == 0:
                times.update(json.loads(out))
            else:
                with open(err) as fh:
                    tail = fh.read().strip()[-400:]
                warnings.warn(f"a warm-up worker exited {proc.returncode}; this process "
                              f"compiles what it left: {tail}", stacklevel=3)
    times.pop("import numba", None)
    return times


def warm_all(jobs: int = 1) -> dict[str, float]:
    """Call each public kernel per dtype (twice: ``_both_ways``), first in ``jobs`` worker
    processes when ``jobs`` > 1; returns seconds per ``name[dtype]`` (a worker's compile
    plus this process's load)."""
    t0 = time.perf_counter()
    import kernels._jit  # noqa: F401  (numba import, reported separately)

    times = {"import numba": time.perf_counter() - t0}
    compiled = _in_workers(jobs) if jobs > 1 else {}
    for dt in DTYPES:
        for name, call in _calls(dt).items():
            t = time.perf_counter()
            _both_ways(call)
            key = f"{name}[{dt}]"
            times[key] = compiled.get(key, 0.0) + time.perf_counter() - t
    return times


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.warmup",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print {name: seconds} as JSON")
    ap.add_argument("--jobs", type=int, default=None, metavar="N",
                    help=f"worker processes (default: the CPUs available, at most "
                         f"{MAX_DEFAULT_JOBS}; 1 compiles in this process only)")
    ap.add_argument("--claims", help=argparse.SUPPRESS)  # a worker of --jobs
    args = ap.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        ap.error(f"--jobs must be 1 or more, not {args.jobs}")
    wall = time.perf_counter()
    if args.claims:
        t0 = time.perf_counter()
        import kernels._jit  # noqa: F401

        times = {"import numba": time.perf_counter() - t0, **_warm_claimed(args.claims)}
    else:
        times = warm_all(args.jobs or default_jobs())
    wall = time.perf_counter() - wall
    from kernels._jit import CACHE_DIR

    if args.json:
        print(json.dumps(times))
    else:
        for name, sec in times.items():
            print(f"{sec:8.3f} s  {name}")
        print(f"{sum(times.values()):8.3f} s  total, {wall:.3f} s wall (cache: {CACHE_DIR})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
