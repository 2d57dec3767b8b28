"""Software prefetch for streaming kernels (``llvm.prefetch``; a hint, never a fault).

A kernel that does real work per cache line (a dot product and its reduction, an erf)
issues its loads only when it reaches them, so on this machine the time of such a
kernel over a large array was measured as compute time *plus* memory time: the hardware
prefetcher did not run far enough ahead. Asking for the line ``PREFETCH_BYTES`` ahead
overlaps the two (the top-k scan went from 26-30 to 46-58 GB/s on 2 cores).

Whether a hint pays depends on the CPU's own prefetcher: on the Zen 4 host without
AVX-512 the hints in layer norm's forward rows, int8 quantisation and the search scan
that norms its rows cost 10-35% and were dropped (docs/kernels.md); the vector search
scan reads in memory order, which that host's prefetcher follows
(``kernels._simd.scan_scores``).
``tests/benchmarks/bench_prefetch.py`` re-measures every remaining hint: it compiles
copies of the kernels with ``ENABLED`` false, which makes ``prefetch`` emit nothing.

Some hints pay on one CPU and cost on another, so they are issued only where
``ROW_HINTS`` is true (``HPCGW_NUMBA_ROW_HINTS``: on Intel, Zen 2 and Zen 5 hosts unless
set, see ``kernels.config``; the cache folder's name records the setting). On an Intel Xeon
(2 cores, 31 GB/s triad, 2026-12-02), from memory (``bench_prefetch.py``): int8
quantisation with the next row asked for during the second pass over a row 1.26-1.27x
(float32) / 1.23-1.26x (float64), the vector search scan with its rows asked for 8 KiB
ahead 1.33-1.37x (norming its rows) / 1.07-1.11x (pre-normalised), the softmax's
streamed rows with the next row asked for 1.27-1.29x. On the Zen 4 host an 8 KiB-ahead
hint in the quantisation cost 18-21%. The same switch picks layer norm's choices
measured with it (``kernels.nn``: ``LN_FWD_NEXT_ROW``).
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils

from kernels._jit import intrinsic, jit, types
from kernels.config import get_config

__all__ = ["PREFETCH_BYTES", "ROW_HINTS", "item_shift", "prefetch", "prefetch_ahead", "prefetch_l2",
           "row_hint"]

ENABLED = True  # read when a kernel is compiled: False leaves the hints out (benchmarks)
ROW_HINTS = get_config().row_hints  # the host-dependent hints (above); read when compiled
PREFETCH_BYTES = 8192  # ~100 ns of one core's bandwidth, several times over
_LINE = 64


def _prefetch_intrinsic(host_only: bool, name: str, doc: str, locality: int = 3):
    """Build ``prefetch`` (``host_only`` false) or ``row_hint`` (true: a hint only where
    ``ROW_HINTS`` is true when the caller is compiled)."""

    def typer(typingctx, arr, i):
        if not (isinstance(arr, types.Array) and arr.ndim == 1
                and isinstance(i, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            if ROW_HINTS or not host_only:
                _emit_prefetch(context, builder, signature, args, locality)
            return context.get_dummy_value()

        return types.void(arr, i), codegen

    typer.__name__ = typer.__qualname__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


def _emit_prefetch(context, builder, signature, args, locality=3):
    """The ``llvm.prefetch`` of ``arr[i]`` (nothing when ``ENABLED`` is false)."""
    if ENABLED:
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = builder.gep(ary.data, [idx])  # not inbounds: a hint may point past the end
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        i32 = ir.IntType(32)
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0),
                          ir.Constant(i32, locality),
                          ir.Constant(i32, 1)])


prefetch = _prefetch_intrinsic(False, "prefetch", """Hint the CPU to bring the cache line
holding ``arr[i]`` (1-D C array) into cache. Read prefetch, high temporal locality
(``llvm.prefetch(p, 0, 3, 1)``). An index past the end is harmless on x86 (prefetches do
not fault), but callers clamp anyway.""")
prefetch_l2 = _prefetch_intrinsic(False, "prefetch_l2", """``prefetch`` into L2, not L1
(``llvm.prefetch(p, 0, 2, 1)``, x86 ``prefetcht1``): for data wanted later than the L1
would hold it.""", 2)
row_hint = _prefetch_intrinsic(True, "row_hint", """``prefetch(arr, i)`` where ``ROW_HINTS``
was true when the caller was compiled, else nothing.""")


@jit(inline=True)
def prefetch_ahead(flat, i, nbytes, host_only=False):
    """Prefetch the ``nbytes`` that start ``PREFETCH_BYTES`` past ``flat[i]`` (one hint per
    cache line), clamped to the array; call once per ``nbytes`` of data consumed.
    ``host_only``: hints only where ``ROW_HINTS`` is on (``row_hint``)."""
    sh = item_shift(flat)
    j = i + (PREFETCH_BYTES >> sh)
    end = j + max(1, nbytes >> sh)
    step = max(1, _LINE >> sh)
    last = flat.size - 1
    while j < end:
        if host_only:
            row_hint(flat, min(j, last))
        else:
            prefetch(flat, min(j, last))
        j += step


@jit(inline=True)
def item_shift(a):
    """log2 of ``a``'s element size: shift by it, do not divide by the size. Numba's
    ``itemsize`` is a value LLVM reads at run time, so each ``n // a.itemsize`` was a
    division, and so was the length of a ``range`` stepped by such a quotient: 7 of them
    in each ``prefetch_ahead``, which the search scan calls every 16 rows (without them,
    caches flushed, medians of 21: 262144 x 64 float32 1.01-1.06x, 1000000 x 16
    1.02-1.26x, 100000 x 100 1.20-1.23x). Where such a division runs once per row of a
    KiB or more (layer norm, softmax, quantisation, AdamW's hinted blocks) it measured
    0.94-1.06x either way, so those stay as written."""
    s = a.itemsize
    return 2 if s == 4 else (3 if s == 8 else (0 if s == 1 else (1 if s == 2 else 4)))
