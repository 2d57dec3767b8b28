"""Neural-network kernels: fused softmax + cross-entropy, layer norm forward/backward.

Rows are independent, so each kernel is one ``prange`` over rows with the row held in
cache between its passes; exp is the vectorisable ``kernels._fastmath.exp_softmax``
(of ``x - x0`` in the row loops, ``x0`` the row's first logit, or ``x - max`` where the
max is over ``SHIFT_MAX`` above it: no overflow branch, no flush to 0 of what the sum
absorbs anyway), or
for float64 with a gradient on an AVX-512 CPU ``kernels._avx512.softmax_exp_f64`` (a
table exp on explicit vectors, 32 classes per call); softmax rows of up to 8 AVX-512
vectors (128 float32 / 64 float64 classes) are held in registers from load to store
instead (``_softmax_xent_short``). Layer norm's forward asked for each row 8 KiB
ahead (``kernels._prefetch``): on a Zen 5 host (80 GB/s triad) it went from 49 to 65
GB/s (float64) with the hint, but on the Zen 4 host without AVX-512 the rows written
with plain stores were 1.14-1.5x slower with it, so it is gone (float32 long rows take
their statistics in one pass, ``_ln_fwd_one_pass``, which never had it). The same hint
made softmax, layer norm backward and the GELU rows slower (measured, A/B in one
round-robin), so they have none. Layer norm rows streamed out (``_ln_out_row``,
``_stream_row``) prefetch a later row's inputs while they write, one line per line
written. Layer norm rows of up to 8 vectors are held in registers too (``_ln_fwd_short``,
``_ln_bwd_short``): 1.2-3.4x faster than the row loops at 8-64 features; rows of 4 KiB or
more have their own backward (``_ln_bwd_wide``).
Parameter gradients (layer norm's dgamma/dbeta) are summed into per-chunk partial
buffers and reduced at the end, so threads never share a write.
GELU and bias + activation live in ``kernels.activations`` and are re-exported here.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from kernels import _avx512, _checks
from kernels._avx512 import (
    SHORT_ROW_VECTORS,
    ln_block,
    ln_block_apply,
    ln_block_stats,
    ln_bwd_block,
    ln_bwd_row,
    block_order,
    ln_row,
    softmax_block,
    softmax_blocks_per_call,
    softmax_exp_f64,
    softmax_exp_f64_tail,
    softmax_row1_f32,
    softmax_row1_f64,
    softmax_row2_f32,
    softmax_row2_f64,
    softmax_row4_f32,
    softmax_row4_f64,
    softmax_row8_f32,
    softmax_row8_f64,
    row_lanes,
    spread_columns,
)
from kernels._chunks import chunk_bounds, n_chunks, row_chunks
from kernels._fastmath import _maxnum_nnan, exp_softmax, opaque, row_max, row_max_float
from kernels._jit import jit, overload, pick_twin, prange, serial_twin, types
from kernels._prefetch import ROW_HINTS, prefetch, prefetch_ahead, prefetch_l2, row_hint
from kernels._simd import (NT_MIN_BYTES, VEC_BITS, _host_has_avx2_fma, copy64_nt,
                           flush_subnormals, ln_bwd_out, ln_bwd_out_next, ln_row_sums_vec,
                           ln_out, restore_fp, scale64_nt, sfence, stream_out)
from kernels.activations import bias_act, bias_act_backward, gelu, gelu_backward
from kernels.config import intel_host, zen2_host
from kernels.errors import KernelInputError

__all__ = [
    "bias_act",
    "bias_act_backward",
    "gelu",
    "gelu_backward",
    "layer_norm",
    "layer_norm_backward",
    "softmax_cross_entropy",
]


# A row's first logit stands in for its max (exp(x - x0) instead of exp(x - max)) when the
# max turns out at most this far above it: every exp is then below e^60, and their sum
# far from overflowing (float32 up to 3.4e38), so the max pass is saved. Further above,
# the row is done again against its max.
SHIFT_MAX = 60.0


@jit(inline=True)
def _shift(x0, mx):
    """What a softmax row's exps are shifted by: its first logit ``x0``, or its max ``mx``
    where that is more than ``SHIFT_MAX`` above ``x0`` (or either is not a number)."""
    return x0 if mx - x0 <= SHIFT_MAX else mx


@jit(inline=True)
def _row_exp(row, out, store, zero, max_first):
    """``(s, sh)``: the sum of ``exp(row - sh)``, each stored in ``out`` when ``store``,
    where the shift ``sh`` is the row's first value, or its max when that is more than
    ``SHIFT_MAX`` above the first (or not a number: a NaN or inf gives a NaN sum).

    Without ``max_first`` the exps are taken against the first value, the max tracked on
    the way, and the row done again against its max only when the rule says so; with
    it the max comes first (one ``vmaxps`` per vector), and a row the rule shifts by its
    max skips the first loop. Either way a row goes through the same loop for the same
    shift (``_shift``), so it gets the same bits: the sums' order is LLVM's choice per
    loop (256-bit float64 code summed two copies of a loop differently). Callers ask
    for ``max_first`` after a row that needed its max (their ``wide`` flag)."""
    c0 = row[0]
    mx = row_max_float(row) if max_first else c0
    if not max_first or _shift(c0, mx) == c0:
        s = zero
        if store:
            for j in range(row.size):
                x = row[j]
                e = exp_softmax(x - c0)
                out[j] = e
                s += e
                mx = _maxnum_nnan(mx, x)
        else:
            for j in range(row.size):
                x = row[j]
                s += exp_softmax(x - c0)
                mx = _maxnum_nnan(mx, x)
        if mx - c0 <= SHIFT_MAX:
            return s, c0
    sh = _shift(c0, mx)
    s = zero
    for j in range(row.size):
        e = exp_softmax(row[j] - sh)
        if store:
            out[j] = e
        s += e
    return s, sh


@jit(inline=True)
def _scale_out_nt(dst, base, buf, c, f, lab, scale, prev_here, next_here):
    """``dst[base:base+c] = buf[:c] * f``, ``scale`` then taken off at ``lab``: a softmax
    row's exps, built in a scratch row, scaled into the gradient ``dst`` (64-byte aligned
    at ``dst[0]``). The row's whole 64-byte lines go out with non-temporal stores, the
    multiply fused with them (``scale64_nt``) instead of a pass of its own over the
    scratch row. The label's segment (its line, or the partial line it sits in) is
    scaled in ``buf`` first and copied as it is. The same operations on each element as
    the plain stores' loop and label fix, so the same values. ``_stream_row`` streams
    rows of whole lines with a prefetch between the stores.

    A row that is not whole lines shares a line with the row before it and one with
    the row after. Where that row is in the same chunk (``prev_here``: the row before
    was done just now; ``next_here``: the row after comes next) the shared line is put
    together in the line past the scratch row (``buf[c:c+L]``, ``L`` elements a line)
    and streamed once it is whole; only a chunk's first and last rows store their part
    of such a line plainly. Plain stores there had to read the line from memory first,
    and each one held up the streamed stores behind it: float64 rows of 100 classes
    streamed at 18 GB/s against 26 for 96 classes."""
    per = 64 // dst.itemsize
    head = min((-base) % per, c)
    tail = head + (c - head) // per * per
    if lab < head:
        a, b = 0, head
    elif lab >= tail:
        a, b = tail, c
    else:
        a = lab - (lab - head) % per
        b = a + per
    for k in range(a, b):
        buf[k] = buf[k] * f
    buf[lab] -= scale
    whole = c >= per  # (a row shorter than a line: a line may span three rows; plain)
    if head and prev_here and whole:  # the line the row before began, in buf[c:c+per]
        o = c + per - head
        for j in range(head):
            buf[o + j] = buf[j] if a == 0 else buf[j] * f
        copy64_nt(dst, base - (per - head), buf, c)
    else:
        for j in range(head):
            dst[base + j] = buf[j] if a == 0 else buf[j] * f
    j = head
    while j < tail:
        if j == a:
            copy64_nt(dst, base + j, buf, j)
        else:
            scale64_nt(dst, base + j, buf, j, f)
        j += per
    if next_here and whole:  # the row after finishes this line
        for k in range(tail, c):
            buf[c + k - tail] = buf[k] if a == tail else buf[k] * f
    else:
        for k in range(tail, c):
            dst[base + k] = buf[k] if a == tail else buf[k] * f


@jit()
def _softmax_xent_chunk(ch, logits, labels, grad, losses, scale, want_grad, zero, nchunks,
                        scratch, nt, ahead):
    """Chunk ``ch`` of ``_softmax_xent``'s rows; ``want_grad`` and ``nt`` are constants
    in each of its loops, so each loop holds only its own code (as runtime flags they
    cost float32 at 256 classes 0.60 against 0.52 ns per element, one core, in L3, Zen 2
    host).

    Rows of any length, ``nchunks`` chunks of rows: exp and sum, the exps stored into
    ``grad`` (``_row_exp``: shifted by the row's first logit instead of its max, so
    there is no max pass), then ``grad`` scaled in place by ``scale / sum``. Row ``i``'s
    loss goes into ``losses[i]``.

    Against the three passes this replaces (max, exp, scale), one core, 2^21 logits
    (L3), ns per element: float64 1.49-1.69 -> 1.31-1.55 (256 classes), 1.63 -> 1.50
    (4096), 1.45 -> 1.40 (32000); float32 0.70 -> 0.66 (256), 0.73 -> 0.67 (4096),
    0.63 -> 0.51 (32000). Taking the exps into a row-sized scratch buffer first, then
    scaling into ``grad``, measured the same up to 256 classes and 1.3-1.4x slower from
    4096.

    ``nt`` (rows of the sizes ``SOFTMAX_STREAM_ROWS[0]`` gives, into an aligned
    gradient): as in ``_softmax_xent_f64_vec``, the exps go into the chunk's scratch
    row and the row is scaled on its way out (``_scale_out_nt``). On the Intel host,
    float32 from memory (2^25 logits, median per-round ratio against the plain stores,
    three runs): 256 classes 1.09-1.23x, 512 1.34x, 768 1.16x, 1024 0.96-1.28x, 4096
    1.02x, 32000 0.96-0.98x (a scratch row past the L1), hence the limit. Where the row
    hints are off (Zen 3 and 4 hosts) from 1.5 KiB; on Zen 2 hosts none: the numbers at
    ``SOFTMAX_STREAM_ROWS``. With ``ahead`` (rows of up to ``SOFTMAX_HINT_ROW_BYTES``,
    streamed or not), the row ``ahead`` elements on (the next) is asked for
    (``row_hint``) before each row.

    The per-row ``log`` stays here: taking it afterwards over all rows with NumPy (as the
    float64 kernel below does) cut the work by 7% in cache but made float32 slower
    from memory, 73-74% -> 57-58% of the triad when it gave 82 GB/s and 90% -> 74-88%
    at 49 (three processes, A/B in one round-robin each)."""
    n, c = logits.shape
    xflat = logits.reshape(-1)
    gflat = grad.reshape(-1)
    last = xflat.size - 1
    lanes = 64 // xflat.itemsize
    lo, hi = chunk_bounds(n, nchunks, ch)
    fp = flush_subnormals()
    wide = False  # the row before needed its max: take this row's first (_row_exp)
    for i in range(lo, hi):
        row = logits[i]
        g = scratch[ch] if nt else (grad[i] if want_grad else row)
        if ahead:
            for k in range(0, c, lanes):
                row_hint(xflat, min(i * c + ahead + k, last))
        s, sh = _row_exp(row, g, want_grad, zero, wide)
        wide = sh != row[0]
        lab = labels[i]
        losses[i] = sh + np.log(s) - row[lab]
        # f computed once and hidden, so both ways scale by it alike (fast-math had
        # made the loop's g[j] * (scale / s) into (scale * g[j]) * (1 / s))
        f = opaque(scale / s)
        if nt:  # (only with a gradient)
            _scale_out_nt(gflat, i * c, g, c, f, lab, scale, i > lo, i < hi - 1)
        elif want_grad:
            for j in range(c):
                g[j] = g[j] * f
            g[lab] -= scale
    if nt:
        sfence()
    restore_fp(fp)


@jit(parallel=True)
def _softmax_xent(logits, labels, grad, losses, scale, want_grad, zero, nchunks, scratch,
                  nt, ahead):
    """The long-row kernel (``_softmax_xent_chunk``): one loop per case, each passing
    its flags on as constants."""
    if nt:
        for ch in prange(nchunks):
            _softmax_xent_chunk(np.int64(ch), logits, labels, grad, losses, scale, True, zero,
                                nchunks, scratch, True, ahead)
    elif want_grad:
        for ch in prange(nchunks):
            _softmax_xent_chunk(np.int64(ch), logits, labels, grad, losses, scale, True, zero,
                                nchunks, scratch, False, ahead)
    else:
        for ch in prange(nchunks):
            _softmax_xent_chunk(np.int64(ch), logits, labels, grad, losses, scale, False, zero,
                                nchunks, scratch, False, ahead)


LN_FWD_ONE_PASS = True  # float32 long rows: _ln_fwd_one_pass (tests switch it off)
STREAM_AHEAD_BYTES = 16384  # streamed rows prefetch later rows' inputs up to this width
# ... and from this width: on Zen 3/4 hosts (no ROW_HINTS) the prefetcher keeps up with rows
# under 4 KiB by itself, and the hints only cost there. Zen 4 host, 2^25 elements from
# memory, A/B in one process (2-4 processes each), without the hints over with them:
# forward float32 256 / 512 features 1.00-1.16x / 0.97-1.22x, float64 256 1.03-1.11x;
# backward float32 256 / 512 1.09-1.14x / 1.12-1.17x, float64 256 1.06-1.26x. Rows of
# 4-8 KiB need them (forward float64 512 / 1024 features 0.83-0.99x / 0.76-0.81x
# without, float32 2048 0.85x; float32 1024 0.97-1.24x either way)
STREAM_AHEAD_MIN_BYTES = 0 if ROW_HINTS else 4096
LN_FWD_ROWS4_MAX = 32  # float32 rows of up to this many features: _ln_fwd_rows4
# float32 forward rows of this many bytes or more: streamed out (``_nt_rows``; 2 KiB until
# the rows were written vector by vector instead of through a scratch row: then 1 KiB
# rows streamed 1.11-1.19x faster from memory, 512 B 1.20-1.28x, 256 B 1.05-1.07x)
LN_FWD_NT_BYTES = 256
# Rows of 1 KiB or more go to the serial twin of the row loop (one chunk, no parallel
# launch) below this many elements. One call, Zen 2 host, serial twin / two threads at
# 16384 elements: float32 256 / 1024 features 0.83x / 0.72x the time, float64 0.99x /
# 0.95x; at 24576 0.99-1.11x; at 32768 float32 1.0-1.05x, float64 1.28x.
LN_FWD_ONE_CHUNK_ELEMENTS = 24576
LN_FWD_LEAD_BYTES = 8192  # streamed forward rows prefetch this far ahead (or the next row)
LN_FWD_NEXT_ROW = ROW_HINTS  # _ln_fwd's streamed rows: the next row instead (ROW_HINTS)
_INTEL = intel_host()  # (some choices below were measured per CPU vendor)
LN_BWD_WIDE_BYTES = 4096  # rows of this many bytes or more: _ln_bwd_wide
# float32 backward rows of this many bytes or more stream dx out (_nt_rows), on every
# host. 2^25 elements from memory, A/B by rounds in one process: Intel host 256 features
# 1.44x, 512 1.29x; Zen 4 host (1-3 processes each, a 35-50 GB/s triad) 64 features
# 0.93-1.07x (so not streamed), 128 1.09-1.18x, 192 1.11x, 256 1.29-1.43x, 384 1.12x,
# 512 1.18x, 768 1.10x. The Zen 5 host gained 15-21% at 256 features while its triad
# gave 48 GB/s but lost 5-30% (512-768 features) at 80, where the row kernel is nearly
# compute-bound; until 2026-12-04 that loss kept AMD hosts' rows under 4 KiB plain (the
# slower memory is the common case on these shared machines). On an Intel host rows from
# 128 bytes stream (Xeon with a 480 MiB L3, 2026-12-07, same A/B, two processes: 32
# features 1.10-1.15x, 48 1.33x, 64 1.45-1.47x, 96 1.40x, 128 1.41x; 16 features
# 0.92x, so not those).
LN_BWD_NT_F32_BYTES = 128 if _INTEL else 512
# _ln_bwd_wide with nt: rows in groups whose x and dy take up to LN_BWD_GROUP_BYTES (at
# most LN_BWD_GROUP_MAX rows); the second pass goes over the group in column tiles of
# LN_BWD_TILE_BYTES, so the tile's dgamma/dbeta shares stay in L1 for the whole group
LN_BWD_GROUP_BYTES = 256 << 10
LN_BWD_GROUP_MAX = 8
LN_BWD_GROUP_MIN = 4
LN_BWD_TILE_BYTES = 4096
LN_BWD_L2_AHEAD = True
# streamed float32 rows of these many bytes: each row's sums taken while the row before
# is written (_ln_bwd_wide's pipe)
LN_BWD_NEXT_F32_BYTES = (64 << 10, 96 << 10)
LN_BWD_PARTIAL_ROWS = 32  # its float32 dgamma/dbeta shares: rows summed before float64
LN_BWD_ROW_PARTIAL = 16  # _ln_bwd, float32: rows of dgamma/dbeta shares before float64
# _ln_bwd_short, float32: the same (0: each vector's shares widened into the float64 sums)
LN_BWD_SHORT_PARTIAL = 16
LN_BWD_PAIR_BYTES = 8192  # float32 rows of this many bytes or more: two rows per pass
VEC_F64 = _avx512.AVAILABLE  # float64 softmax through kernels._avx512's table exp (tests
# switch it off to run the portable path too)
# softmax gradients into a large aligned out= streamed out of a scratch row (a row's
# partial end lines plainly; tests switch it), the next row asked for meanwhile where the
# row hints are on: rows of (smallest, largest) bytes, for _softmax_xent and for
# _softmax_xent_f64_vec. With ROW_HINTS on Intel hosts: every row up to 4 KiB / any.
# Zen 2 hosts (ROW_HINTS on too): none, since the long-row kernel's flags became
# constants (2026-12-05): from memory, A/B by rounds, plain over streamed with the
# hint (medians) float32 256 / 1024 / 4096 classes 0.93-0.96x / 0.97x / 0.99x, float64
# 0.94-0.98x / 1.00x / 1.00x; streamed without the hint 1.01x at float32 256.
# Elsewhere, by the Zen 4 host (2^25 logits from memory, plain over streamed, 2-5
# processes each): float32 256 classes 0.94-1.00x, 384 1.13-1.47x, 512 0.95-1.29x, 768
# 1.66-1.70x, 1024 1.45-2.03x; float64 192 1.27-1.42x, 256 0.73-1.09x, 384 1.41x, 512
# 0.79-1.09x, 768 1.57x, 1000 1.30x, 1024 0.97-1.18x, 2048 0.86-0.92x
SOFTMAX_STREAM = True
_NO_ROWS = (1 << 62, 0)  # a window no row fits
SOFTMAX_STREAM_ROWS = ((_NO_ROWS, _NO_ROWS) if ROW_HINTS and zen2_host()
                       else ((64, 4096), (64, 1 << 62)) if ROW_HINTS
                       else ((1536, 4096), (2560, 8192)))
# rows of up to 8 vectors held in registers (_softmax_xent_short, _ln_fwd_short, ...) and
# blocks of rows of few classes or features transposed in registers (_softmax_xent_blocks,
# ...): on 512-bit vectors with AVX-512, 256-bit with AVX2 (kernels._avx512.row_lanes);
# tests switch them off to run the portable paths too
VEC_SHORT = VEC_BLOCKS = _host_has_avx2_fma()
# by (itemsize, lanes): the most features layer norm's blocks of rows take, forward and
# backward. AVX-512 (above, the row kernels were as fast or faster: 2^20 and 2^23
# elements, forward float32 13-20 features 1.35-1.88x faster in blocks, 24 0.92-1.27x,
# 28-32 0.76-1.09x; float64 7-13 1.04-1.96x, 14 0.94-1.36x; backward float32 9-10
# 1.27-2.07x, 11 1.0-1.22x, 12 0.77-0.88x; float64 5 1.13-1.26x, 6 1.18x, 7 0.95x).
# AVX2, 2^23 elements from memory: forward float32 2-16 features 1.4-5.0x the row
# loops, 17-28 1.08-1.48x (32: 0.85x), float64 2-8 5.7-7.2x, 9-16 1.3-2.9x (in cache
# 16: 0.87x); backward float32 up to 14 (against the short rows 1.0-5.9x; at 16
# 0.74x), float64 up to 8 (1.1-1.8x, except 7: 0.86x; 9-16 in cache 0.5-0.8x).
# AVX-512 float32 again once its blocks summed in float32 (2026-12-04, Zen 4, A/B by
# rounds, the row kernels' time over the blocks', 2^20 / 2^24 elements): forward 22
# features 2.03x / 1.56x, 24 1.23x / 1.30x, 26 1.62x / 1.10x, 28 1.52x / 0.79-1.20x,
# 30-32 0.74-0.96x; backward 12 1.29x / 1.10x (two processes), 13 0.70x, 14 0.77-1.10x
LN_BLOCK_MAX_FEATURES = {(4, 16): 26, (8, 8): 13, (4, 8): 28, (8, 4): 16}
# Backward blocks with AVX-512 on Intel hosts: up to 18 float32 and 12 float64 features
# (an Intel Xeon with a 480 MiB L3, 2026-12-07, A/B by rounds in one process, rows /
# blocks, medians, 2^20 elements in cache / 2^25 from memory: float32 13 features 1.34x /
# 1.99x, 14 1.37x / 1.87x, 16 1.16x / 1.20x, 18 1.18x / 1.35x, 20 0.82x / 1.03x, 24 0.80x
# / 0.99x; float64 7 1.98x / 1.63x, 8 1.70x / 1.57x, 10 1.35-1.37x / 1.39-1.43x, 12 1.23x
# / 1.25x, 13 1.02x / 1.20x, 14 0.98x / 1.18x, 16 1.04x / 1.04x); elsewhere 12 and 6, as
# measured above.
LN_BWD_BLOCK_MAX_FEATURES = {(4, 16): 18 if _INTEL else 12, (8, 8): 12 if _INTEL else 6,
                             (4, 8): 14, (8, 4): 8}
# Forward blocks of up to this many features (by (itemsize, lanes)) are taken in groups of
# LN_BLOCK_GROUP blocks, statistics first, then outputs (_ln_fwd_blocks_chunk): one block
# at a time the core waited on each block's chain of sums, square root and division
# (about 190 cycles a block of 8 x 10 float32 against some 60 of throughput). Zen 2 host,
# one core in L2, ns per element, one block at a time / grouped: float32 2-12 features
# 0.71-0.95 / 0.54-0.79 (1.20-1.37x), 16-32 within 3% either way; float64 2-10 and 16
# 1.10-1.52x, 12 1.02x. Not measured with AVX-512: those hosts keep one block at a time.
LN_BLOCK_SPLIT_MAX_FEATURES = {(4, 8): 12, (8, 4): 16}
LN_BLOCK_GROUP = 16  # blocks: at most 16 KiB of input, read again from the L1 cache
LN_BWD_BLOCK_PARTIAL = 8  # float32 backward blocks: dgamma/dbeta shares summed per 8 blocks
# classes up to which rows go in blocks (by (itemsize, lanes)); above, the row kernel
# wins in cache with AVX-512 (2^19 logits: float32 25-28 classes 1.12-1.31x in blocks,
# 29 / 31 / 32 1.0x / 0.93x / 0.86x; float64 16 1.0x). From memory the blocks win up to
# 2 L classes (2^25 logits: float32 25 / 28 / 32 1.46x / 1.27x / 1.22x, float64 16
# 1.62x), so inputs of NT_MIN_BYTES or more go in blocks up to there. With AVX2 they
# take up to 4 L always (_avx512.block_max_count; 2^23 logits from memory against the
# row loops: float32 2-16 classes 2.1-5.0x, 17-32 1.1-2.5x, float64 2-8 2.0-3.7x, 9-16
# 1.5-2.4x; in cache 1.1-2.6x but float64 16: 1.15x)
BLOCK_MAX_CLASSES = {(4, 16): 28, (8, 8): 16, (4, 8): 32, (8, 4): 16}
# softmax blocks: calls of this many bytes or more ask for the input 8 KiB ahead
# (_softmax_xent_blocks). On Zen 3/4 hosts (no ROW_HINTS) the prefetcher keeps up with
# smaller calls, where the hint only cost (Zen 4 host, A/B in one process, without the
# hint over with it: float32 10 / 16 / 20 classes, 640-1280-byte calls, in L3
# 1.08-1.11x, from memory 1.02-1.05x; float64 10 / 16 1.01-1.08x), and larger ones
# still need it (float32 28 classes, 1792 bytes: 0.90x without, from memory; 24
# classes 0.98x)
SOFTMAX_BLOCK_HINT_BYTES = 512 if ROW_HINTS else 1536
_B = _avx512.BLOCK
_VEC_BYTES = VEC_BITS // 8  # the row and block kernels' vectors (_avx512.row_lanes)


_LANES = {dt: row_lanes(np.dtype(dt).itemsize == 4)
          for dt in (np.float32, np.float64, np.dtype(np.float32), np.dtype(np.float64))}


def _lanes(dtype) -> int:
    """Lanes per vector of the row and block kernels for ``dtype``: 16 float32 / 8
    float64 with AVX-512, 8 / 4 with AVX2 (``kernels._avx512.row_lanes``). Looked up:
    a small call asks two or three times (0.4 us each computed, Zen 2 host)."""
    got = _LANES.get(dtype)
    return got if got is not None else row_lanes(np.dtype(dtype).itemsize == 4)


@jit(inline=True)
def _row_exps_f64(xflat, buf, base, out, c, mx, hint, last):
    """``(s, top)``: ``buf[out:out+c] = exp(xflat[base:base+c] - mx)``, ``s`` their sum and
    ``top`` the row's max (``softmax_exp_f64``, 32 at a time, then the masked tail);
    with ``hint`` the next row is asked for meanwhile (``row_hint``)."""
    s = 0.0
    top = xflat[base]
    j = 0
    while j + _B <= c:
        if hint:
            for k in range(j, j + _B, 8):
                row_hint(xflat, min(base + c + k, last))
        e, m = softmax_exp_f64(xflat, buf, base + j, out + j, mx, _B)
        s += e
        top = max(top, m)
        j += _B
    if j < c:
        e, m = softmax_exp_f64_tail(xflat, buf, base + j, out + j, mx, c - j)
        s += e
        top = max(top, m)
    return s, top


@jit(parallel=True, fastmath={"contract"})
def _softmax_xent_f64_vec(logits, xflat, lbits, labels, grad, gflat, sums, gaps, scale,
                          scratch, nchunks, nt):
    """``_softmax_xent`` with the gradient, float64, its exp pass on explicit AVX-512
    vectors (``softmax_exp_f64``: exp, store and sum of 32 elements per call, and
    their max). As in ``_softmax_xent``, the exps are shifted by the row's first logit
    and the row is done again against its max (``row_max``) only
    when that is more than ``SHIFT_MAX`` above it (or NaN): no max pass before the exps
    (Zen 4 host, A/B in one process: 2^18 logits 1.02-1.14x, from memory 1.07-1.67x,
    medians 1.08-1.23x). ``fastmath`` "contract" only: the table exp's rounding tricks
    must stay as written.
    Row ``i``'s loss is ``log(sums[i]) + gaps[i]``, the log taken afterwards by NumPy
    over all rows: 0.49 -> 0.43 ns per element on one core in cache, and 55-60% -> 70-73%
    of the triad when it gave 82 GB/s (three processes, A/B in one round-robin each).

    ``nt`` (rows of the sizes ``SOFTMAX_STREAM_ROWS[1]`` gives, into an aligned
    gradient): the exps go into the chunk's scratch row ``scratch[ch]`` (L1) and are
    scaled on their way out (``_scale_out_nt``: non-temporal stores, no write-allocate
    read of the gradient; the multiply fused with them: 1.11-1.16x from memory, 1.09-1.10x
    in L3 against a pass of its own, Zen 4 host, A/B in one process), and while a row's exps
    are taken the next row is asked for (``row_hint``: only where ``ROW_HINTS``). On the
    Intel host, 2^25 logits from memory against the plain stores (median per-round
    ratio, 21 rounds): 256 classes 1.31x (22.7 -> 29.7 GB/s), 1024 1.82x, 32000 1.28x;
    in a first version, streamed without the hint 0.82x / 1.27x, the hint without
    streaming 0.98-1.03x, so without the hints (AMD hosts) only rows of 2.5-8 KiB are
    streamed, where that pays there (``SOFTMAX_STREAM_ROWS``). Only into a
    caller's ``out=``: a fresh gradient's pages fault in on first write, already zeroed
    in cache by the kernel, and streaming past them was slower (plain / streamed 0.93x
    at 256 classes, 0.82x at 1024; float32 256 0.90x)."""
    n, c = logits.shape
    last = xflat.size - 1
    for ch in prange(nchunks):
        lo, hi = chunk_bounds(n, nchunks, ch)
        buf = scratch[ch] if nt else gflat
        fp = flush_subnormals()
        wide = False
        for i in range(lo, hi):
            base = i * c
            out = 0 if nt else base  # where the row's exps go in buf
            # shifted by the row's first logit, its max taken on the way (SHIFT_MAX);
            # after a row that needed its max, the max first; either way a row goes
            # through the same call for the same shift (as in _row_exp)
            x0 = xflat[base]
            mx = _shift(x0, row_max(lbits[i])) if wide else x0
            hint = nt and wide  # (the first call asks for the next row otherwise)
            wide = wide and mx != x0
            if not wide:
                s, top = _row_exps_f64(xflat, buf, base, out, c, x0, nt, last)
                wide = not top - x0 <= SHIFT_MAX  # far above the first logit, or NaN
                if wide:
                    mx = row_max(lbits[i])
            if wide:
                s, _ = _row_exps_f64(xflat, buf, base, out, c, mx, hint, last)
            sums[i] = s
            lab = labels[i]
            gaps[i] = mx - logits[i, lab]
            f = scale / s
            if nt:
                _scale_out_nt(gflat, base, buf, c, f, lab, scale, i > lo, i < hi - 1)
            else:
                row = buf[out:out + c]  # a slice: a loop indexed from out is not vectorised
                for j in range(c):
                    row[j] = row[j] * f
                row[lab] -= scale
        if nt:
            sfence()
        restore_fp(fp)


def _short_row(xflat, gflat, base, c, labels, scale, grad, nt, nvec):  # pragma: no cover
    raise NotImplementedError  # overloaded


@overload(_short_row, inline="always")
def _short_row_overload(xflat, gflat, base, c, labels, scale, grad, nt, nvec):
    """The ``kernels._avx512.softmax_row*`` intrinsic for ``nvec`` vectors and
    ``len(labels)`` rows side by side (1 or 2), of the array's dtype (chosen while
    typing: each dtype compiles only its own)."""
    f32 = xflat.dtype == types.float32
    if labels.count == 2:
        one, two, four, eight = (_avx512.softmax_rows2[f32, k] for k in (1, 2, 4, 8))
    else:
        one, two, four, eight = (
            (softmax_row1_f32, softmax_row2_f32, softmax_row4_f32, softmax_row8_f32) if f32
            else (softmax_row1_f64, softmax_row2_f64, softmax_row4_f64, softmax_row8_f64))

    def impl(xflat, gflat, base, c, labels, scale, grad, nt, nvec):
        if nvec == 1:
            return one(xflat, gflat, base, c, labels, scale, grad, nt)
        if nvec == 2:
            return two(xflat, gflat, base, c, labels, scale, grad, nt)
        if nvec == 4:
            return four(xflat, gflat, base, c, labels, scale, grad, nt)
        return eight(xflat, gflat, base, c, labels, scale, grad, nt)
    return impl


# _softmax_xent_short takes rows two at a time, side by side (tests switch it off). Intel
# host (model 167), A/B in one process, medians of 11-15 per-round ratios: one core in
# cache (2^18 logits) float32 48 / 64 / 100 / 128 classes 1.10x / 1.07x / 1.10-1.20x /
# 1.08-1.16x, float64 32 / 48 / 64 1.09x / 1.11x / 1.15x; from memory (2^25, both cores,
# with the hint below) 1.01-1.04x float32, 1.03-1.11x float64. Same bits either way.
SHORT_PAIRS = True
# _softmax_xent_short asks for the lines of the rows it takes this far on (a row hint:
# hosts with ROW_HINTS), for logits of NT_MIN_BYTES or more. Intel host, 2^25 logits from
# memory into an out=, A/B: float32 64 / 100 / 128 classes 1.23x / 1.17x / 1.21x (1 / 4 /
# 8 KiB on within 4% of each other), without a gradient 1.33-1.42x; float64 48 / 64
# 1.19x / 1.27x; into a new gradient (its pages faulted in as it is written) 0.99-1.00x;
# in cache (2^19 logits, bench_prefetch.py) 0.93-0.96x, hence the size
SOFTMAX_SHORT_HINT_BYTES = 4096
# _softmax_xent's rows of up to this many bytes ask for the next row before each row (a
# row hint; until 2026-12-08 only the streamed rows did), for logits of NT_MIN_BYTES or
# more. Intel host, 2^25 logits from memory, A/B, without a gradient float32 256 / 512 /
# 1024 classes 1.99x / 2.02x / 1.87x, 2048 1.03x, 4096 0.97x, float64 256 1.16x (in
# cache, 2^19: 0.93x / 1.03x at 256); into a new output float32 256 / 512 / 1024 1.17x
# / 1.16x / 1.04x; into an out= (plain stores) 2048 0.94x, so not wider rows
SOFTMAX_HINT_ROW_BYTES = 4096


@jit(parallel=True, fastmath={"contract"})
def _softmax_xent_short(logits, xflat, labels, gflat, sums, gaps, scale, grad, nt, nchunks,
                        nvec, pairs, ahead):
    """Rows of at most ``nvec`` (1, 2, 4 or 8) vectors (``_lanes``), each held in
    registers from its load to its store (``kernels._avx512.softmax_row*``): the loops
    of ``_softmax_xent`` run almost entirely in their scalar remainders on such rows (10
    classes: 22 ns per row per core). Row ``i``'s loss is ``log(sums[i]) + gaps[i]``;
    the gradient goes into ``gflat`` only when ``grad``, its whole vectors streamed
    (non-temporal) when ``nt``. With ``pairs``, two rows per call, side by side
    (``SHORT_PAIRS``). Each call first asks for the lines of its rows ``ahead``
    elements on (``row_hint``: nothing without ``ROW_HINTS``); asking for each row 8 KiB
    ahead on every host made float32 33-100 classes from memory 4-27% slower on an AMD
    host, float64 17-64 classes about even (so never on Zen 3 and 4 hosts), while on
    the Intel host it pays (``SOFTMAX_SHORT_HINT_BYTES``)."""
    n, c = logits.shape
    for ch in prange(nchunks):
        lo, hi = chunk_bounds(n, nchunks, ch)
        fp = flush_subnormals()
        last = xflat.size - 1
        line = 64 // xflat.itemsize  # (once: numba reads itemsize at run time)
        i = lo
        while i < hi:
            two = pairs and i + 1 < hi
            if ahead:  # the lines of the rows done now, ``ahead`` elements on
                for k in range(0, 2 * c if two else c, line):
                    row_hint(xflat, min(i * c + ahead + k, last))
            if two:
                la, lb = labels[i], labels[i + 1]
                sa, ma, sb, mb = _short_row(xflat, gflat, i * c, c, (la, lb), scale, grad,
                                            nt, nvec)
                sums[i] = sa
                sums[i + 1] = sb
                gaps[i] = np.float64(ma) - np.float64(logits[i, la])
                gaps[i + 1] = np.float64(mb) - np.float64(logits[i + 1, lb])
                i += 2
            else:
                lab = labels[i]
                s, mx = _short_row(xflat, gflat, i * c, c, (lab,), scale, grad, nt, nvec)
                sums[i] = s
                gaps[i] = np.float64(mx) - np.float64(logits[i, lab])
                i += 1
        if nt:
            sfence()
        restore_fp(fp)


# the most vectors per row each short-row kernel takes, by (itemsize, lanes); above, or
# at 0, rows go through the row loops. With AVX2 (8 float32 / 4 float64 lanes) a partial
# vector's masked store (vmaskmovps/pd) is slow on AMD CPUs (one every ~12 cycles, and
# more from memory): 2^23 elements from memory against the row loops, softmax float32
# 2-48 classes 0.37-1.02x, float64 2-32 0.54-1.25x (the blocks below take the few
# classes); layer norm forward float32 17-64 features 0.70-0.79x (where _ln_fwd_rows4
# and the one-pass loop run), but float64 9-32 1.21-2.10x; backward float32 17-32
# 1.22-1.31x, 40-64 0.76-0.95x, float64 9-32 1.11-3.0x
SHORT_MAX_VECTORS = {"softmax": {(4, 16): 8, (8, 8): 8, (4, 8): 0, (8, 4): 0},
                     "ln": {(4, 16): 8, (8, 8): 8, (4, 8): 0, (8, 4): 8},
                     "ln_bwd": {(4, 16): 8, (8, 8): 8, (4, 8): 4, (8, 4): 8}}


def _short_vectors(c: int, dtype: np.dtype, kind: str | None = None) -> int:
    """The fewest vectors (1, 2, 4 or 8) that hold a row of ``c`` elements of ``dtype``,
    or 0 when none do, or when that is more than ``SHORT_MAX_VECTORS[kind]`` allows."""
    lanes = _lanes(dtype)
    if c > SHORT_ROW_VECTORS[-1] * lanes:
        return 0
    for nvec in SHORT_ROW_VECTORS:  # (a generator with next() cost 0.5 us)
        if c <= nvec * lanes:
            break
    if kind is not None and nvec > SHORT_MAX_VECTORS[kind][_itemsize(dtype), lanes]:
        return 0
    return nvec


def _itemsize(dtype) -> int:
    """``np.dtype(dtype).itemsize``, without building a dtype from one (0.25 us)."""
    return dtype.itemsize if isinstance(dtype, np.dtype) else np.dtype(dtype).itemsize


@jit(parallel=True, fastmath={"contract"})
def _softmax_xent_blocks(xflat, labels, gflat, prods, gaps, ncalls, nchunks, scale, grad, nt,
                         cls, per):
    """Rows of few classes (``BLOCK_MAX_CLASSES``), ``L`` rows (``_lanes``)
    at a time, each block transposed in registers (``kernels._avx512.softmax_block``),
    ``per`` blocks per call (``softmax_blocks_per_call``: ``ncalls`` calls).
    ``cls`` is a tuple of ``c`` zeros: its type carries ``c`` to the compiler, so each
    ``c`` compiles on first use and is cached (``numba.literally`` did the same but cost
    about 4 ms per call in dispatch). Block ``b``'s loss is ``log(prods[b]) + gaps[b]``;
    the gradient goes into ``gflat`` only when ``grad``, with non-temporal stores when
    ``nt``. Each call of ``SOFTMAX_BLOCK_HINT_BYTES`` or more (512 with ``ROW_HINTS``, 1536
    elsewhere) asks for the input 8 KiB ahead (``kernels._prefetch``).
    2^25 float32 logits of 10 classes, from memory: 10.8-11.4 ms with neither, 9.4-9.5
    with both; float64 16-19 -> 14.3-14.5. With 2 classes (128-byte blocks) the
    prefetch cost 2-5% (one hint per 2 vectors), in cache and from memory."""
    step = len(cls) * (_VEC_BYTES // xflat.itemsize) * per  # elements per call
    for c in prange(nchunks):
        lo, hi = chunk_bounds(ncalls, nchunks, c)
        fp = flush_subnormals()
        for b in range(lo, hi):
            if step * xflat.itemsize >= SOFTMAX_BLOCK_HINT_BYTES:
                prefetch_ahead(xflat, b * step, step * xflat.itemsize)
            softmax_block(xflat, gflat, labels, prods, gaps, b, scale, grad, nt, cls)
        if nt:
            sfence()  # this thread's streamed lines, before the call returns
        restore_fp(fp)


_LOG_BIG = 2.0 ** 400  # the running products are rescaled by this (exactly) past it


@jit(inline=True)
def _rescale(m, e):
    """``(m, e)`` with ``m * 2^(400 e)`` unchanged and ``m`` back in ``[2^-400, 2^400]``
    (powers of two: exact; NaN, inf and 0 pass through)."""
    while _LOG_BIG < m < math.inf:  # inf (a product past the domain) stays inf
        m *= 1.0 / _LOG_BIG
        e += 1
    while 0.0 < m < 1.0 / _LOG_BIG:
        m *= _LOG_BIG
        e -= 1
    return m, e


@jit(fastmath={"contract"})
def _log_sum(p):
    """``sum(log(p))`` for ``p`` >= 1 (the row sums of a softmax, each in ``[1, c]``, or
    their per-block products, each at most ``c^L`` <= 2^77) with one log: four running
    products over groups of 8 (a group's product stays under 2^616), each rescaled by
    an exact ``2^-400`` when it passes ``2^400`` and the rescales counted. NumPy's
    ``log`` runs libm's scalar one on a CPU without AVX-512: 419430 block products took
    1.9-3.9 ms of a 10-class float32 call of about 18 (twice that for float64's 4-row
    blocks); this takes 0.14. Each factor adds an ulp of relative error to a product, so
    the result is off by about ``p.size * 1e-16`` in absolute terms (1e-10 at 839000
    products, whose log sum is 1.3e6). A NaN gives NaN, a 0 gives -inf, as the logs
    would."""
    n = p.size
    full = n // 32 * 32
    m = np.ones(4)
    e = np.zeros(4, np.int64)
    for i in range(0, full, 32):
        for k in range(4):
            j = i + 8 * k
            g = (((p[j] * p[j + 1]) * (p[j + 2] * p[j + 3]))
                 * ((p[j + 4] * p[j + 5]) * (p[j + 6] * p[j + 7])))
            m[k], e[k] = _rescale(m[k] * g, e[k])
    mt, et = 1.0, 0
    for k in range(4):
        mt, et = _rescale(mt * m[k], et + e[k])
    for j in range(full, n):
        mt, et = _rescale(mt * p[j], et)
    return math.log(mt) + et * (400.0 * math.log(2.0))


_SCRATCH = threading.local()
_SCRATCH_MAX_ROWS = 1 << 21


def _row_scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two float64 buffers of ``n`` values (sums, gaps: per row, or per block of rows),
    kept per thread between calls up to ``_SCRATCH_MAX_ROWS``: fresh ones of a few MB
    page-fault on every call (10 classes x 419430 rows: 2.2 ms on top of a 1.7 ms kernel)."""
    if n > _SCRATCH_MAX_ROWS:
        return np.empty(n), np.empty(n)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.shape[1] < n:
        buf = _SCRATCH.buf = np.empty((2, max(n, 1024)))
    return buf[0, :n], buf[1, :n]


def softmax_cross_entropy(
    logits: np.ndarray, labels: np.ndarray, *, grad: bool = True, reduction: str = "mean",
    out: np.ndarray | None = None, grad_scale: float | None = None,
) -> tuple[float, np.ndarray | None]:
    """Cross-entropy of softmax(``logits``) against integer ``labels``, with its gradient.

    Returns ``(loss, dlogits)``: ``loss`` is the mean (or sum, ``reduction="sum"``) over
    rows as a Python float, ``dlogits`` the gradient of that loss w.r.t. ``logits``
    (same dtype; written into ``out`` when given), or None when ``grad=False``. NaN logits
    give a NaN loss. ``grad_scale`` replaces the gradient's 1/n (mean) or 1 (sum) factor,
    e.g. 1/global_batch when each data-parallel rank holds part of the batch.
    """
    x = _checks.float_array("logits", logits, ndim=2)
    y = _checks.int_array("labels", labels)
    if y.shape[0] != x.shape[0]:
        raise KernelInputError(f"labels must have shape ({x.shape[0]},), got {y.shape}")
    if reduction not in ("mean", "sum"):
        raise KernelInputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    n, c = x.shape
    if n and c == 0:
        raise KernelInputError("logits has 0 classes; it needs at least one column")
    _checks.in_range("labels", y, c)
    g = (_checks.out_array("out", out, x.shape, x.dtype, apart_from=x) if grad
         else np.empty((0, 0), x.dtype))
    if n == 0:
        return (float("nan") if reduction == "mean" else 0.0), (g if grad else None)
    if grad_scale is None:
        grad_scale = 1.0 / n if reduction == "mean" else 1.0
    scale = x.dtype.type(_checks.finite_float("grad_scale", grad_scale))
    lanes = _lanes(x.dtype)
    nvec = _short_vectors(c, x.dtype, "softmax")
    if nvec == 8 and c <= 5 * lanes:  # 3 of 8 vectors idle: long rows win
        nvec = 0
    streamed = grad and stream_out(g) and g.ctypes.data % 64 == 0
    large = x.nbytes >= NT_MIN_BYTES
    most = BLOCK_MAX_CLASSES[x.itemsize, lanes]
    blocks = VEC_BLOCKS and 2 <= c <= (max(most, 2 * lanes) if large else most)
    per = softmax_blocks_per_call(c, lanes, x.itemsize) if blocks else 1
    nblk = n // lanes // per * per if blocks else 0
    # one sum per block (then per row left over) or per row
    sums, gaps = _row_scratch(nblk + n - nblk * lanes)
    if nblk:  # whole blocks of rows (``per`` per call), then the rest row by row
        # without a gradient nothing is stored: x stands in for the output array
        gflat = g.reshape(-1) if grad else x.reshape(-1)
        _softmax_xent_blocks(x.reshape(-1), y, gflat, sums, gaps, nblk // per,
                             n_chunks(nblk // per, min_rows=4), scale, grad, streamed,
                             (0,) * c, per)
        done = nblk * lanes
        if done < n:
            rest = slice(nblk, nblk + n - done)
            xr = x[done:].reshape(-1)
            _softmax_xent_short(x[done:], xr, y[done:], g[done:].reshape(-1) if grad else xr,
                                sums[rest], gaps[rest], scale, grad, False, 1,
                                _short_vectors(c, x.dtype), SHORT_PAIRS, 0)
        used = slice(0, nblk + n - done)
        total = _log_sum(sums[used]) + float(gaps[used].sum())
    elif VEC_SHORT and nvec:  # without a gradient x stands in for the output array
        xflat = x.reshape(-1)
        # non-temporal stores need every row's vectors whole and aligned
        _softmax_xent_short(x, xflat, y, g.reshape(-1) if grad else xflat, sums, gaps, scale,
                            grad, streamed and c % lanes == 0, row_chunks(n, c), nvec,
                            SHORT_PAIRS, SOFTMAX_SHORT_HINT_BYTES // x.itemsize if large else 0)
        total = _log_sum(sums) + float(gaps.sum())
    else:  # long rows; a gradient into a caller's out= may be streamed (SOFTMAX_STREAM)
        vec64 = grad and VEC_F64 and x.dtype == np.float64
        lo, hi = SOFTMAX_STREAM_ROWS[vec64]
        nt = (grad and streamed and SOFTMAX_STREAM and out is not None
              and lo <= c * x.itemsize <= hi)
        nch = row_chunks(n, c)
        # a row and a line (_scale_out_nt puts the lines two rows share together there)
        scratch = np.empty((nch, c + 64 // x.itemsize) if nt else (1, 1), x.dtype)
        if vec64:
            _softmax_xent_f64_vec(x, x.reshape(-1), x.view(np.int64), y, g, g.reshape(-1),
                                  sums, gaps, scale, scratch, nch, nt)
            total = _log_sum(sums) + float(gaps.sum())
        else:
            # (nt: large, and rows of at most SOFTMAX_HINT_ROW_BYTES)
            ahead = c if large and c * x.itemsize <= SOFTMAX_HINT_ROW_BYTES else 0
            _softmax_xent(x, y, g, sums, scale, grad, x.dtype.type(0), nch, scratch, nt, ahead)
            total = float(sums.sum())
    return (total / n if reduction == "mean" else total), (g if grad else None)


@jit(inline=True)
def _ahead(row_bytes):
    """Whether streamed rows of ``row_bytes`` prefetch a later row's inputs as they go
    (``STREAM_AHEAD_MIN_BYTES`` to ``STREAM_AHEAD_BYTES``)."""
    return STREAM_AHEAD_MIN_BYTES <= row_bytes <= STREAM_AHEAD_BYTES


@jit(inline=True)
def _stream_row(dst, base, buf, d, xflat, dyflat, nxt):
    """``dst[base:base+d] = buf[:d]`` with non-temporal 64-byte stores (``&dst[base]``
    64-byte aligned, ``d`` a whole number of 64-byte blocks), and a prefetch of
    ``xflat[nxt:nxt+d]`` and ``dyflat[nxt:nxt+d]`` (the next row's inputs; clamped to
    the arrays), one line per 64 bytes written, so that the
    read from memory overlaps these writes instead of starting after them (no hint for
    rows wider than ``STREAM_AHEAD_BYTES`` or, without ``ROW_HINTS``, narrower than
    ``STREAM_AHEAD_MIN_BYTES``: ``_ahead``). For the backward kernels, whose output row
    is built in a scratch row; the forward streams straight out (``_ln_out_row``).

    Measured first on float32 layer norm forward through such a scratch row, 2^25
    elements from memory, A/B in one process (plain stores / streamed / streamed + this
    prefetch, GB/s): 83 GB/s triad, 2048 features 47 / 55 / 69, 4096: 43 / 47 / 55; 49
    GB/s triad, 4096: 38 / 39 / 45, 8192: 40 / 39 / 47. At 32 KiB rows (8192 float32
    features) the hint cost 4-10% when the triad gave 80 GB/s (and gained 10-18% at 48),
    so wider rows go without it. Prefetching 8 KiB ahead instead of the next row (the
    forward's lead) made the backward 3-11% slower at 256-512 float64 features."""
    step = 64 // dst.itemsize
    hint = _ahead(d * dst.itemsize)
    for j in range(0, d, step):
        copy64_nt(dst, base + j, buf, j)
        if hint:  # two arrays, not a tuple: looping over a tuple of arrays left an
            # NRT incref/decref pair per array and line in _ln_bwd's float64 code
            # (in cache, 256 features: 0.81 -> 1.47 ns per element)
            prefetch(xflat, min(nxt + j, xflat.size - 1))
            prefetch(dyflat, min(nxt + j, dyflat.size - 1))


def _nt_rows(out: np.ndarray, f32_from: int | None = None) -> bool:
    """Stream ``out`` (2-D, C) out with non-temporal stores: large, every row starting
    on a 64-byte boundary (kernels allocate their outputs so, see
    ``kernels.empty_aligned``), and float64, or float32 with rows of ``f32_from`` bytes
    or more where a caller measured that it pays (forward ``LN_FWD_NT_BYTES``,
    backward ``LN_BWD_NT_F32_BYTES``; ``None``: never).

    Measured on layer norm at 131072 x 256, A/B in one process: float64 forward +9-16%
    and backward +23% whether the triad gave 48 or 80 GB/s; float32 +15-21% at 48 but
    -8-14% at 80, where its row kernel is nearly compute-bound and the copy through the
    scratch row costs more than the write-allocate it saves, so float32 kept plain
    stores there (and in ``_ln_bwd`` at 512-768 features: 0.7-0.95x at 80 GB/s). The
    forward now writes its streamed rows vector by vector (``_ln_out_row``, ``ln_row``),
    with no scratch row, and streams float32 rows from 256 bytes: 2^25 elements from
    memory at a 28-43 GB/s triad, A/B by rounds in one process, three processes (median
    ratios): 64 features 1.05-1.07x, 128 1.20-1.28x, 192 0.89-1.24x, 256 1.11-1.19x,
    384 1.40x. With a scalar head and tail per row (unaligned rows) float32 layer norm
    backward ran at 27 GB/s instead of 48."""
    if not stream_out(out):  # (first: it turns small outputs down at once)
        return False
    row = out.shape[-1] * out.itemsize
    wanted = out.dtype == np.float64 or (
        out.dtype == np.float32 and f32_from is not None and row >= f32_from)
    return wanted and out.ctypes.data % 64 == 0 and out.ndim == 2 and row % 64 == 0


@jit(inline=True)
def _ln_fwd_row(x, gamma, beta, eps, y, mean, rstd, flat, i, d, nt, lead):
    """Row ``i``: statistics in float64, then the output (streamed out when ``nt``,
    prefetching ``lead`` elements ahead). No hint for rows written with plain stores:
    asking for each row 8 KiB ahead made them slower on the Zen 4 host without AVX-512
    (A/B by rounds, 256 float64 features: in cache 1.14-1.22x, from memory 1.5x)."""
    row = x[i]
    s = 0.0
    for j in range(d):
        s += row[j]
    mu = s / d
    ss = 0.0
    for j in range(d):
        t = row[j] - mu
        ss += t * t
    r = 1.0 / np.sqrt(ss / d + eps)
    mean[i] = mu
    rstd[i] = r
    _ln_out_row(row, gamma, beta, y[i], mean[i], rstd[i], nt, flat, i * d + lead)


@jit(inline=True)
def _ln_out_row(row, gamma, beta, out, mu, r, nt, flat, ahead):
    """``out = (row - mu) * r * gamma + beta`` (``mu``, ``r`` in the input's dtype).
    With ``nt``, vector by vector through ``ln_out`` with non-temporal stores (no
    scratch row), each followed by a prefetch of ``flat[ahead + j]``: a later row's
    line, ``LN_FWD_LEAD_BYTES`` or a row ahead, whichever is further (rows of
    ``STREAM_AHEAD_MIN_BYTES`` to ``STREAM_AHEAD_BYTES`` only: ``_ahead``), spread over
    the row's writes. From memory, against the
    scratch row and ``_stream_row`` at a 44-50 GB/s triad: float32 1024 / 4096 / 8192
    features 1.07-1.08x / 1.0-1.07x / 1.06-1.14x, float64 256 / 4096 1.0-1.09x /
    1.04-1.12x; in cache (plain stores, unchanged) the same. The 8 KiB lead against the
    next row (through the scratch row): float64 256 / 512 features 1.05-1.41x /
    1.13-1.29x."""
    d = row.size
    if not nt:
        for j in range(d):
            t = (row[j] - mu) * r
            out[j] = t * gamma[j] + beta[j]
        return
    step = 64 // row.itemsize
    hint = _ahead(d * row.itemsize)
    last = flat.size - 1
    for j in range(0, d, step):
        ln_out(row, j, gamma, beta, j, out, j, mu, r)
        if hint:
            prefetch(flat, min(ahead + j, last))


@jit(parallel=True)
def _ln_fwd_one_pass(x, gamma, beta, eps, y, mean, rstd, nchunks, nt):
    """Layer norm of float32 rows past the short-row kernels: mean and variance from
    one pass, float64 sums of ``t = x - x[0]`` and ``t^2``, then the output pass
    (``_ln_fwd`` takes two passes for the statistics). ``(x[0] - mean)^2 <= d var``, so
    ``var = mean(t^2) - mean(t)^2`` keeps a relative error of about ``d`` float64 ulps,
    far below float32's: the outputs matched ``_ln_fwd``'s bit for bit on ``N(3, 1)``
    rows of 256-8192 features. No prefetch hint (``_ln_fwd``'s): without it this was
    still as fast or faster at 256 features from memory. 2^22 elements in cache
    1.25-1.4x faster; 2^25 from memory (74-82 GB/s triad, three processes) 256
    features +0-9%, 1024-2048 within 3%, 8192 +17-25%. ``nt``: the output streamed out
    (``_ln_out_row``; float32 rows of 2 KiB or more, ``LN_FWD_NT_BYTES``)."""
    if nt:
        for c in prange(nchunks):
            _ln_fwd_one_pass_chunk(x, gamma, beta, eps, y, mean, rstd, np.int64(c), nchunks,
                                   True)
    else:
        for c in prange(nchunks):
            _ln_fwd_one_pass_chunk(x, gamma, beta, eps, y, mean, rstd, np.int64(c), nchunks,
                                   False)


@jit()
def _ln_fwd_one_pass_chunk(x, gamma, beta, eps, y, mean, rstd, c, nchunks, nt):
    """Chunk ``c`` of ``_ln_fwd_one_pass``, ``nt`` a constant in each of its loops."""
    n, d = x.shape
    flat = x.reshape(-1)
    lead = max(d, LN_FWD_LEAD_BYTES // x.itemsize)
    lo, hi = chunk_bounds(n, nchunks, c)
    for i in range(lo, hi):
        row = x[i]
        x0, s1, s2 = _ln_row_sums(row)
        _ln_stats_set(mean, rstd, i, x0, s1, s2, d, eps)
        _ln_out_row(row, gamma, beta, y[i], mean[i], rstd[i], nt, flat, i * d + lead)
    if nt:
        sfence()


@jit(inline=True)
def _ln_row_sums(row):
    """``(x0, sum t, sum t^2)`` in float64 for ``t = row - x0``, ``x0 = row[0]``."""
    x0 = np.float64(row[0])
    s1 = 0.0
    s2 = 0.0
    for j in range(row.size):
        t = np.float64(row[j]) - x0
        s1 += t
        s2 += t * t
    return x0, s1, s2


@jit(inline=True)
def _ln_stats_set(mean, rstd, i, x0, s1, s2, d, eps):
    """Row ``i``'s mean and rstd from ``_ln_fwd_one_pass``'s shifted float64 sums."""
    m1 = s1 / d
    var = s2 / d - m1 * m1
    if var < 0.0:  # rounding; a NaN stays
        var = 0.0
    mean[i] = x0 + m1
    rstd[i] = 1.0 / np.sqrt(var + eps)


@jit(parallel=True)
def _ln_fwd_rows4(x, gamma, beta, eps, y, mean, rstd, nchunks):
    """``_ln_fwd_one_pass`` (no streaming) for short float32 rows, four rows at a time:
    a row of a few features is too short for its float64 sums to vectorise, so each
    was a chain of dependent adds; four rows' chains in one loop overlap. The same
    operations per row, so the same results bit for bit. 3.36M rows of 10 features
    33.5 -> 27.1 ms, 1M of 32 12.9 -> 9.3 ms; 64 features the same, 256 slower (0.61x):
    rows up to ``LN_FWD_ROWS4_MAX`` features only."""
    n, d = x.shape
    for c in prange(nchunks):
        lo, hi = chunk_bounds(n, nchunks, c)
        i = lo
        while i + 4 <= hi:
            r0, r1, r2, r3 = x[i], x[i + 1], x[i + 2], x[i + 3]
            a0, a1 = np.float64(r0[0]), np.float64(r1[0])
            a2, a3 = np.float64(r2[0]), np.float64(r3[0])
            s0 = s1 = s2 = s3 = q0 = q1 = q2 = q3 = 0.0
            for j in range(d):
                t0 = np.float64(r0[j]) - a0
                t1 = np.float64(r1[j]) - a1
                t2 = np.float64(r2[j]) - a2
                t3 = np.float64(r3[j]) - a3
                s0 += t0
                s1 += t1
                s2 += t2
                s3 += t3
                q0 += t0 * t0
                q1 += t1 * t1
                q2 += t2 * t2
                q3 += t3 * t3
            _ln_stats_set(mean, rstd, i, a0, s0, q0, d, eps)
            _ln_stats_set(mean, rstd, i + 1, a1, s1, q1, d, eps)
            _ln_stats_set(mean, rstd, i + 2, a2, s2, q2, d, eps)
            _ln_stats_set(mean, rstd, i + 3, a3, s3, q3, d, eps)
            for k in range(i, i + 4):
                _ln_out_row(x[k], gamma, beta, y[k], mean[k], rstd[k], False, x[k], 0)
            i += 4
        for k in range(i, hi):
            row = x[k]
            a0, s0, q0 = _ln_row_sums(row)
            _ln_stats_set(mean, rstd, k, a0, s0, q0, d, eps)
            _ln_out_row(row, gamma, beta, y[k], mean[k], rstd[k], False, row, 0)


@jit()
def _ln_fwd_chunk(x, gamma, beta, eps, y, mean, rstd, c, nchunks, nt):
    """Chunk ``c`` of ``_ln_fwd``."""
    n, d = x.shape
    flat = x.reshape(-1)
    lead = d if LN_FWD_NEXT_ROW else max(d, LN_FWD_LEAD_BYTES // x.itemsize)
    lo, hi = chunk_bounds(n, nchunks, c)
    for i in range(lo, hi):
        _ln_fwd_row(x, gamma, beta, eps, y, mean, rstd, flat, i, d, nt, lead)
    if nt:
        sfence()


@jit(parallel=True)
def _ln_fwd(x, gamma, beta, eps, y, mean, rstd, nchunks, nt):
    """Layer norm row by row, statistics in two passes; ``nt``: the output streamed out
    with non-temporal stores (``_ln_out_row``), a later row's lines asked for as it goes:
    ``LN_FWD_LEAD_BYTES`` or a row ahead, whichever is further, or the next row where
    ``LN_FWD_NEXT_ROW``. On the Intel host, float64 from memory (2^25 elements, median
    of 15 alternated rounds): 256 features 23.0 ms with the 8 KiB lead, 17.4 with no
    hint, 16.0 with the next row; per-round ratio 8 KiB lead / next row at 128 / 256 /
    384 / 512 / 1024 features 1.25 / 1.40 / 1.40 / 1.14 / 1.0 (the Zen 5 host had the
    8 KiB lead 1.05-1.41x faster than the next row). Float32's streamed rows
    (``_ln_fwd_one_pass``) measured within 6% either way there, and keep the lead."""
    if nt:  # (nt a constant in each loop: as a runtime flag it cost float64 at 64
        # features 1.15-1.21x in L3, Zen 2 host)
        for c in prange(nchunks):
            _ln_fwd_chunk(x, gamma, beta, eps, y, mean, rstd, np.int64(c), nchunks, True)
    else:
        for c in prange(nchunks):
            _ln_fwd_chunk(x, gamma, beta, eps, y, mean, rstd, np.int64(c), nchunks, False)


@jit(parallel=True)
def _ln_fwd_short(xflat, gamma, beta, eps, yflat, mean, rstd, n, d, nchunks, nt, spill, nvec):
    """Rows of at most ``nvec`` vectors, each held in registers from its load to
    its store (``kernels._avx512.ln_row``; ``gamma``, ``beta`` zero-padded to ``nvec``
    vectors). ``spill``: a row may write past its end into the later rows of its chunk
    (which overwrite it), so its partial vector is stored whole (y must not overlap x)."""
    for c in prange(nchunks):
        _ln_fwd_short_chunk(np.int64(c), xflat, gamma, beta, eps, yflat, mean, rstd, n, d,
                            nchunks, nt, spill, nvec)


@jit()
def _ln_fwd_short_chunk(c, xflat, gamma, beta, eps, yflat, mean, rstd, n, d, nchunks, nt, spill,
                        nvec):
    """Chunk ``c`` of ``_ln_fwd_short`` (not inlined: docs/kernels.md, "Where compile time
    goes")."""
    lo, hi = chunk_bounds(n, nchunks, c)
    for i in range(lo, hi):
        base = i * d
        rin = (n - i) * d
        rout = (hi - i) * d if spill else d
        if nvec == 1:
            mu, r = ln_row(xflat, yflat, gamma, beta, base, d, rin, rout, eps, nt, 1)
        elif nvec == 2:
            mu, r = ln_row(xflat, yflat, gamma, beta, base, d, rin, rout, eps, nt, 2)
        elif nvec == 4:
            mu, r = ln_row(xflat, yflat, gamma, beta, base, d, rin, rout, eps, nt, 4)
        else:
            mu, r = ln_row(xflat, yflat, gamma, beta, base, d, rin, rout, eps, nt, 8)
        mean[i] = mu
        rstd[i] = r
    if nt:
        sfence()


# layer norm's blocks of rows stream their output out (non-temporal stores) when it is
# large (``stream_out``) and 64-byte aligned: a block is 64 d bytes, whole lines
LN_BLOCKS_STREAM = True


def _ln_blocks_nt(out: np.ndarray) -> bool:
    """Whether the blocks of rows stream ``out`` out (``LN_BLOCKS_STREAM``)."""
    return LN_BLOCKS_STREAM and stream_out(out) and out.ctypes.data % 64 == 0


def _padded(v: np.ndarray, nvec: int) -> np.ndarray:
    """``v`` followed by zeros up to ``nvec`` whole vectors (``_lanes``)."""
    out = np.zeros(nvec * _lanes(v.dtype), v.dtype)
    out[:v.shape[0]] = v
    return out


def _ln_blocks(n: int, d: int, dtype: np.dtype, limits: dict[int, int]) -> int:
    """How many whole blocks of ``L`` rows (``_lanes``) go through the
    transposed block kernels (``_ln_fwd_blocks``, ``_ln_bwd_blocks``): 0 unless ``d`` is
    at most ``limits[L]``."""
    if not VEC_BLOCKS:
        return 0
    size = _itemsize(dtype)
    lanes = _lanes(dtype)
    return n // lanes if d <= limits[size, lanes] else 0


def _block_params(p: np.ndarray, lanes: int) -> np.ndarray:
    """``p`` (one value per feature) as the backward block kernel takes it: spread over
    the columns' lanes (``(d, L)``, flattened) where ``spread_columns``, else as is."""
    d = p.shape[0]
    return p[np.array(block_order(d, lanes))].reshape(-1) if spread_columns(d, lanes) else p


@jit()
def _ln_fwd_blocks_chunk(xflat, gamma, beta, eps, yflat, mean, rstd, nblocks, c, nchunks, nt,
                         feats):
    """Chunk ``c`` of ``_ln_fwd_blocks``: block by block, or where ``_ln_split`` says so
    in groups of ``LN_BLOCK_GROUP`` blocks, each group's statistics first
    (``ln_block_stats``) and then its outputs (``ln_block_apply``, the rows and the
    statistics read back from the L1 cache)."""
    lo, hi = chunk_bounds(nblocks, nchunks, c)
    if _ln_split(xflat, feats):
        for g0 in range(lo, hi, LN_BLOCK_GROUP):
            g1 = min(hi, g0 + LN_BLOCK_GROUP)
            for b in range(g0, g1):
                ln_block_stats(xflat, yflat, gamma, beta, mean, rstd, b, eps, nt, feats)
            for b in range(g0, g1):
                ln_block_apply(xflat, yflat, gamma, beta, mean, rstd, b, eps, nt, feats)
    else:
        for b in range(lo, hi):
            ln_block(xflat, yflat, gamma, beta, mean, rstd, b, eps, nt, feats)
    if nt:
        sfence()


def _ln_split(xflat, feats):  # pragma: no cover - replaced by the overload in jitted code
    """Whether ``_ln_fwd_blocks`` splits its blocks (``LN_BLOCK_SPLIT_MAX_FEATURES``)."""
    raise NotImplementedError


@overload(_ln_split, inline="always")
def _ln_split_overload(xflat, feats):
    size = xflat.dtype.bitwidth // 8
    split = len(feats) <= LN_BLOCK_SPLIT_MAX_FEATURES.get((size, row_lanes(size == 4)), 0)
    return lambda xflat, feats: split


@jit(parallel=True)
def _ln_fwd_blocks(xflat, gamma, beta, eps, yflat, mean, rstd, nblocks, nchunks, nt, feats):
    """Blocks of ``L`` rows of ``d = len(feats)`` features, each transposed in registers
    (``kernels._avx512.ln_block``; ``feats``: see ``_softmax_xent_blocks``), ``nchunks``
    chunks of blocks; ``y`` streamed out when ``nt`` (``_ln_blocks_nt``)."""
    if nt:  # (a constant in each loop: as a runtime flag it cost float64 at 10 features
        # 1.2x in L3, Zen 2 host)
        for c in prange(nchunks):
            _ln_fwd_blocks_chunk(xflat, gamma, beta, eps, yflat, mean, rstd, nblocks,
                                 np.int64(c), nchunks, True, feats)
    else:
        for c in prange(nchunks):
            _ln_fwd_blocks_chunk(xflat, gamma, beta, eps, yflat, mean, rstd, nblocks,
                                 np.int64(c), nchunks, False, feats)


# The forward kernels once more without ``parallel`` (``kernels._jit.serial_twin``), for
# calls of one chunk (``row_chunks``: fewer than 2 x 4096 elements): the same code without
# numba's parallel launch (compiled apart, its fast-math sums may round a few ulps apart).
_ln_fwd_1 = serial_twin(_ln_fwd)
_ln_fwd_one_pass_1 = serial_twin(_ln_fwd_one_pass)
_ln_fwd_rows4_1 = serial_twin(_ln_fwd_rows4)
_ln_fwd_short_1 = serial_twin(_ln_fwd_short)
_ln_fwd_blocks_1 = serial_twin(_ln_fwd_blocks)


def _ln_fwd_rows(x, gamma, beta, eps, y, mean, rstd) -> None:
    """Layer norm row by row: short rows in registers, or the row loops."""
    n, d = x.shape
    nt = _nt_rows(y, LN_FWD_NT_BYTES)
    nvec = _short_vectors(d, x.dtype, "ln") if VEC_SHORT else 0
    one = not nvec and n * d < LN_FWD_ONE_CHUNK_ELEMENTS and d * x.itemsize >= 1024
    nch = 1 if one else row_chunks(n, d)
    if nvec:
        pick_twin(_ln_fwd_short, _ln_fwd_short_1, nch)(
            x.reshape(-1), _padded(gamma, nvec), _padded(beta, nvec), eps, y.reshape(-1),
            mean, rstd, n, d, nch, nt, not np.may_share_memory(x, y), nvec)
    elif x.dtype == np.float32 and LN_FWD_ONE_PASS and d <= LN_FWD_ROWS4_MAX and not nt:
        pick_twin(_ln_fwd_rows4, _ln_fwd_rows4_1, nch)(x, gamma, beta, eps, y, mean, rstd, nch)
    elif x.dtype == np.float32 and LN_FWD_ONE_PASS:
        pick_twin(_ln_fwd_one_pass, _ln_fwd_one_pass_1, nch)(
            x, gamma, beta, eps, y, mean, rstd, nch, nt)
    else:
        pick_twin(_ln_fwd, _ln_fwd_1, nch)(x, gamma, beta, eps, y, mean, rstd, nch, nt)


def layer_norm(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, *, eps: float = 1e-5,
    out: np.ndarray | None = None, mean_out: np.ndarray | None = None,
    rstd_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer norm over the last axis of 2-D ``x``: returns ``(y, mean, rstd)``.

    ``mean`` and ``rstd`` (1/sqrt(var+eps), biased variance as in PyTorch) are kept for
    :func:`layer_norm_backward`. Statistics are accumulated in float64 (float32 rows of
    few features, taken in blocks of rows: in float32, the mean's rounding taken out).
    ``out``: optional C-contiguous buffer for ``y``; ``mean_out``, ``rstd_out``: optional
    ``(n,)`` buffers of ``x``'s dtype for the statistics. Reuse them across calls to
    avoid page faults (fresh ones are faulted in on first touch: once, at 2^25 elements
    of 10 features, that made a call 3.8x slower; usually glibc's heap keeps such blocks
    and it costs a few percent).
    """
    x = _checks.float_array("x", x, ndim=2)
    gamma = _checks.float_array("gamma", gamma, ndim=1, dtype=x.dtype)
    beta = _checks.float_array("beta", beta, ndim=1, dtype=x.dtype)
    _checks.shape_is("gamma", gamma, (x.shape[1],))
    _checks.shape_is("beta", beta, (x.shape[1],))
    eps = _checks.finite_float("eps", eps, low=0.0)
    n, d = x.shape
    y = _checks.out_array("out", out, x.shape, x.dtype, apart_from=x)
    # the statistics are read and written as scalars: no alignment, and buffers of our
    # own need no overlap check (together 12 of a 64-row call's 38 us)
    mean = (np.empty(n, x.dtype) if mean_out is None
            else _checks.out_array("mean_out", mean_out, (n,), x.dtype))
    rstd = (np.empty(n, x.dtype) if rstd_out is None
            else _checks.out_array("rstd_out", rstd_out, (n,), x.dtype))
    if (mean_out is not None or rstd_out is not None) and (
            mean is rstd or np.may_share_memory(mean, rstd) or any(
                np.may_share_memory(s, a) for s in (mean, rstd) for a in (x, y))):
        raise KernelInputError("mean_out and rstd_out must be buffers of their own (they "
                               "overlap each other, x or out)")
    if n and d:
        nblk = _ln_blocks(n, d, x.dtype, LN_BLOCK_MAX_FEATURES)
        lanes = _lanes(x.dtype)
        if nblk:  # gamma, beta tiled over a block (ln_block writes y in the row layout)
            nch = min(row_chunks(n, d), nblk)
            pick_twin(_ln_fwd_blocks, _ln_fwd_blocks_1, nch)(
                x.reshape(-1), np.tile(gamma, lanes), np.tile(beta, lanes), eps,
                y.reshape(-1), mean, rstd, nblk, nch, _ln_blocks_nt(y), (0,) * d)
        done = nblk * lanes
        if done == 0:
            _ln_fwd_rows(x, gamma, beta, eps, y, mean, rstd)
        elif done < n:
            _ln_fwd_rows(x[done:], gamma, beta, eps, y[done:], mean[done:], rstd[done:])
    elif n:
        mean[:] = np.nan
        rstd[:] = np.nan
    return y, mean, rstd


def _like(zero, v):  # pragma: no cover - replaced by the overload inside jitted code
    """``v`` as ``zero``'s float type. (Passing the type itself, ``np.float32``, as a
    kernel argument cost 7 us a call in numba's dispatcher.)"""
    raise NotImplementedError


@overload(_like, inline="always")
def _like_overload(zero, v):
    if zero == types.float32:
        return lambda zero, v: np.float32(v)
    return lambda zero, v: np.float64(v)


@jit()
def _ln_bwd_chunk(c, dy, x, gamma, mean, rstd, dx, pg, pb, nchunks, dxflat, work, nt, qg, qb,
                  every, zero):
    """Chunk ``c`` of ``_ln_bwd``, ``nt`` a constant in each of its loops (as a runtime flag
    it cost float32 at 64 features 1.2x in L3, Zen 2 host: plain rows went through the
    same loop as the scratch row of streamed ones). Not inlined: the kernel and its
    serial twin call the one compiled chunk (docs/kernels.md, "Where compile time goes")."""
    n, d = x.shape
    xflat = x.reshape(-1)
    dyflat = dy.reshape(-1)
    lo, hi = chunk_bounds(n, nchunks, c)
    xs = work[c, 0]
    ds = work[c, 1]
    buf = work[c, 2]
    held = 0
    for i in range(lo, hi):
        held = _held_rows(held, every, pg[c], pb[c], qg[c], qb[c])
        mu = mean[i]
        r = rstd[i]
        a = zero
        b = zero
        for j in range(d):
            xv = x[i, j]
            dv = dy[i, j]
            xs[j] = xv
            ds[j] = dv
            xh = (xv - mu) * r
            g = dv * gamma[j]
            a += g
            b += g * xh
            qg[c, j] += dv * xh
            qb[c, j] += dv
        a = _like(zero, np.float64(a) / d)
        b = _like(zero, np.float64(b) / d)
        out = buf if nt else dx[i]
        for j in range(d):
            xh = (xs[j] - mu) * r
            out[j] = r * (ds[j] * gamma[j] - a - xh * b)
        if nt:
            _stream_row(dxflat, i * d, buf, d, xflat, dyflat, (i + 1) * d)
    if every > 0:  # the rows since the last move (float32 with 16 rows or fewer: all)
        _move_sums(pg[c], pb[c], qg[c], qb[c])
    if nt:
        sfence()


@jit(parallel=True)
def _ln_bwd(dy, x, gamma, mean, rstd, dx, pg, pb, nchunks, dxflat, work, nt, qg, qb, every,
            zero):
    """One chunk of rows per thread. ``work[c]`` holds three scratch rows: copies of the
    x and dy rows, and the dx row when ``nt`` (built there and streamed out as in
    ``_ln_fwd``). The row sums and the dgamma/dbeta shares are in the input's dtype
    (``zero``'s, ``_like``): the shares go to ``qg[c]``, ``qb[c]`` and are moved into the
    float64 ``pg[c]``, ``pb[c]`` every ``every`` rows and at the chunk's end (float64
    passes ``pg``, ``pb`` themselves and ``every = -1``: never moved). Until this round
    the end's move was taken only when ``every < n``, so float32 calls of 16 rows or
    fewer returned dgamma, dbeta of 0 (``test_layer_norm_backward_sums_have_the_input_
    dtype_at_every_size``). In float64 the float32 loops ran at half width with
    a conversion per value: float32 in cache (2^18 elements, one core) 0.74-0.81 ->
    0.44-0.54 ns per element at 256-768 features (both cores: 1.34-1.39x at 1024 x 256
    and x 512); from memory (2^25, A/B by rounds) 256 features 0.96-1.02x, 768
    1.22-1.23x; every 8 / 16 / 32 rows within noise.

    x and dy are read from memory once, in order: the first loop keeps a copy of each
    row in ``work`` and the second loop reads the copy. Re-reading the input rows made
    the hardware prefetcher fall behind (131072 x 256 float32, NumPy's inputs at 16
    bytes into a cache line, A/B in one round-robin when the triad gave 80 GB/s on the
    Zen 5 host: 50 -> 66 GB/s); on the Zen 4 host re-reading was within noise (0.98-1.11x
    from memory)."""
    if nt:
        for c in prange(nchunks):
            _ln_bwd_chunk(np.int64(c), dy, x, gamma, mean, rstd, dx, pg, pb, nchunks, dxflat,
                          work, True, qg, qb, every, zero)
    else:
        for c in prange(nchunks):
            _ln_bwd_chunk(np.int64(c), dy, x, gamma, mean, rstd, dx, pg, pb, nchunks, dxflat,
                          work, False, qg, qb, every, zero)


@jit(parallel=True)
def _ln_bwd_wide(dy, x, gamma, mean, rstd, dx, pg, pb, nchunks, nt, qg, qb, every, pair,
                 zero, ab, group, l2_ahead, accs, pipe):
    """``_ln_bwd`` for wide rows (``LN_BWD_WIDE_BYTES`` or more), where ``_ln_bwd``'s
    per-row footprint (the row, its two copies, gamma and two float64 sums per feature:
    72 KiB at 2048 float32 features) overflowed L1 and every row went through L2
    several times. Here the first pass only reads (the row's sums of ``dy * gamma``
    and ``dy * gamma * xhat``, in the input's dtype, then float64), the second re-reads
    the row from cache, writes dx and adds the row's dgamma/dbeta shares to ``qg[c]``,
    ``qb[c]``: in the input's dtype, moved into the float64 ``pg[c]``, ``pb[c]`` every
    ``every`` rows (float32: half the bytes per feature; float64 passes ``every`` past
    the chunk, so only the chunk's end moves them). With ``pair`` (float32, never with
    ``nt``) the second pass takes two rows at once, so each share is loaded and stored
    once per two rows. With ``nt`` (float32 too) the second pass goes vector by vector
    (``ln_bwd_out``: dx streamed straight out, the shares updated), a line of the next
    row's x and dy prefetched after each vector (``_ahead``: rows of up to
    ``STREAM_AHEAD_BYTES``); its multiply-adds are explicit, so its dx can differ from
    the plain loop's by a few ulps of the largest terms. Streaming float32 rows too
    gained 9-37% at 1024-8192 features over plain stores with ``pair`` (both regimes of
    the machine); going vector by vector instead of through a scratch row and
    ``_stream_row`` then, from memory at a 43-50 GB/s triad: float32 1024-4096
    features 1.04-1.20x (8192: 0.84-1.10x), float64 512-4096 1.08-1.25x.
    2^25 float32 elements
    from memory (triad 41-48 GB/s), ``_ln_bwd`` against this without ``pair``: 2048
    features 16.7 -> 10.4 ms, 4096: 17.4 -> 11.5, 8192: 14.4 -> 10.7; ``pair`` then
    +10-18% at 2048-8192 (85 GB/s triad) but -17% at 1024, so it starts at 8 KiB.

    Streamed rows of 4-32 KiB go in groups of ``group`` rows (``_ln_bwd_group``: x and dy
    of a group up to ``LN_BWD_GROUP_BYTES``, 4 to 8 rows): the group's row sums first,
    then the second pass in column tiles of ``LN_BWD_TILE_BYTES``, each tile over all the
    group's rows, so the tile's shares stay in L1 for the group; after each vector the
    matching line of the next group's x and dy is asked for into L2 (``prefetch_l2``,
    with ``l2_ahead``). Row by row, a wide row's first pass waited on memory with
    nothing else to do (the next row was asked for only up to 16 KiB, into L1), and the
    row's shares went through L2. Zen 4 host, 2^25 elements from memory, A/B by rounds
    in one process, 2-7 processes, grouped / row by row: float64 512 features
    1.14-1.15x, 1024 1.06-1.29x, 2048 1.12-1.18x, 4096 1.18-1.35x (1.04-1.07x without
    the L2 requests); float32 1024 0.93-1.15x, 4096 1.01-1.03x, 8192 1.08-1.15x.
    dgamma and dbeta are bit for bit the row-by-row values; dx can differ by an ulp
    (each row's two sums are compiled into another loop). Groups of 1-2 rows with the
    requests cost 3-6% (float64 16384 features).

    With ``pipe`` (float32 rows of 64-96 KiB, ``LN_BWD_NEXT_F32_BYTES``) there is no
    first pass but the chunk's first row's: each row's second pass takes the next row's
    sums in the lanes of ``accs[c]`` as it goes (``ln_bwd_out_next``; the chunk's first
    row by ``ln_row_sums_vec``, the same arithmetic, so a row's dx does not depend on
    where the chunks fall). A/B as above, 6 processes: 16384 features 0.94-1.52x (about
    1.3x in the four where the row loop ran at 13-20 GB/s, 0.94-1.03x in the two where
    it ran at 22-24), 24576 1.01-1.04x; 32768 0.78-1.63x, 65536 0.74x (the row, the next
    and the shares overflow the L2), so it stops at 96 KiB; float64 8192-32768 features
    0.92-1.21x, so float64 keeps the row loop."""
    for c in prange(nchunks):
        _ln_bwd_wide_chunk(np.int64(c), dy, x, gamma, mean, rstd, dx, pg, pb, nchunks, nt, qg,
                           qb, every, pair, zero, ab, group, l2_ahead, accs, pipe)


@jit()
def _ln_bwd_wide_chunk(c, dy, x, gamma, mean, rstd, dx, pg, pb, nchunks, nt, qg, qb, every,
                       pair, zero, ab, group, l2_ahead, accs, pipe):
    """Chunk ``c`` of ``_ln_bwd_wide``: not inlined, so the kernel and its serial twin call
    one compiled chunk (docs/kernels.md, "Where compile time goes")."""
    n, d = x.shape
    xflat = x.reshape(-1)
    dyflat = dy.reshape(-1)
    step = 64 // x.itemsize
    tile = LN_BWD_TILE_BYTES // x.itemsize
    hint = _ahead(d * x.itemsize)
    last = xflat.size - 1
    lo, hi = chunk_bounds(n, nchunks, c)
    sg = qg[c]
    sb = qb[c]
    i = lo
    held = 0  # rows in sg, sb
    acc = accs[c]
    if pipe and i < hi:  # each row's sums taken while the row before is written
        a0, b0 = _ln_bwd_vec_sums(x[i], dy[i], gamma, mean[i], rstd[i], acc, step, zero)
    while pipe and i < hi:
        if held >= every:
            _move_sums(pg[c], pb[c], sg, sb)
            held = 0
        x0 = x[i]
        d0 = dy[i]
        o0 = dx[i]
        m0 = mean[i]
        r0 = rstd[i]
        if i + 1 < hi:
            acc[:] = zero
            x1 = x[i + 1]
            d1 = dy[i + 1]
            m1 = mean[i + 1]
            r1 = rstd[i + 1]
            for j in range(0, d, step):
                ln_bwd_out_next(x0, d0, gamma, sg, sb, o0, j, m0, r0, a0, b0, x1, d1, m1,
                                r1, acc)
            a0, b0 = _acc_means(acc, step, d, zero)
        else:
            for j in range(0, d, step):
                ln_bwd_out(x0, d0, gamma, sg, sb, o0, j, m0, r0, a0, b0)
        i += 1
        held += 1
    while nt and group > 1 and i < hi:  # groups of rows, the second pass in tiles
        if held >= every:
            _move_sums(pg[c], pb[c], sg, sb)
            held = 0
        m = min(group, hi - i)
        for r in range(m):
            ab[c, 0, r], ab[c, 1, r] = _ln_bwd_row_sums(x[i + r], dy[i + r], gamma,
                                                       mean[i + r], rstd[i + r], zero)
        nxt = (i + m) * d  # the next group's rows, asked for into L2 meanwhile
        for j0 in range(0, d, tile):
            j1 = min(j0 + tile, d)
            for r in range(m):
                xr = x[i + r]
                dr = dy[i + r]
                orow = dx[i + r]
                mr = mean[i + r]
                rr = rstd[i + r]
                ar = ab[c, 0, r]
                br = ab[c, 1, r]
                ahead = nxt + r * d
                for j in range(j0, j1, step):
                    ln_bwd_out(xr, dr, gamma, sg, sb, orow, j, mr, rr, ar, br)
                    if l2_ahead:
                        prefetch_l2(xflat, min(ahead + j, last))
                        prefetch_l2(dyflat, min(ahead + j, last))
        i += m
        held += m
    while i < hi:
        if held >= every:
            _move_sums(pg[c], pb[c], sg, sb)
            held = 0
        x0 = x[i]
        d0 = dy[i]
        m0 = mean[i]
        r0 = rstd[i]
        a0, b0 = _ln_bwd_row_sums(x0, d0, gamma, m0, r0, zero)
        o0 = dx[i]
        if nt:
            nxt = (i + 1) * d
            for j in range(0, d, step):
                ln_bwd_out(x0, d0, gamma, sg, sb, o0, j, m0, r0, a0, b0)
                if hint:
                    prefetch(xflat, min(nxt + j, last))
                    prefetch(dyflat, min(nxt + j, last))
            i += 1
            held += 1
            continue
        if not pair or i + 1 == hi:
            for j in range(d):
                u0 = d0[j]
                h0 = (x0[j] - m0) * r0
                o0[j] = r0 * (u0 * gamma[j] - a0 - h0 * b0)
                sg[j] += u0 * h0
                sb[j] += u0
            i += 1
            held += 1
            continue
        x1 = x[i + 1]
        d1 = dy[i + 1]
        m1 = mean[i + 1]
        r1 = rstd[i + 1]
        a1, b1 = _ln_bwd_row_sums(x1, d1, gamma, m1, r1, zero)
        o1 = dx[i + 1]
        for j in range(d):
            u0 = d0[j]
            u1 = d1[j]
            h0 = (x0[j] - m0) * r0
            h1 = (x1[j] - m1) * r1
            gj = gamma[j]
            o0[j] = r0 * (u0 * gj - a0 - h0 * b0)
            o1[j] = r1 * (u1 * gj - a1 - h1 * b1)
            sg[j] += u0 * h0 + u1 * h1
            sb[j] += u0 + u1
        i += 2
        held += 2
    _move_sums(pg[c], pb[c], sg, sb)
    if nt:
        sfence()


@jit(inline=True)
def _acc_means(acc, lanes, d, zero):
    """``(a, b)`` from the lanes of ``acc`` (``ln_row_sums_vec``): each half summed in
    float64, divided by ``d``, cast to the input's dtype."""
    sa = 0.0
    sb = 0.0
    for k in range(lanes):
        sa += acc[k]
        sb += acc[lanes + k]
    return _like(zero, sa / d), _like(zero, sb / d)


@jit(inline=True)
def _ln_bwd_vec_sums(xr, dr, gamma, mu, r, acc, lanes, zero):
    """A row's ``mean(dy * gamma)`` and ``mean(dy * gamma * xhat)`` taken as
    ``ln_bwd_out_next`` takes them (so a row's dx is the same wherever it sits)."""
    acc[:] = zero
    for j in range(0, xr.size, lanes):
        ln_row_sums_vec(xr, dr, gamma, mu, r, acc, j)
    return _acc_means(acc, lanes, xr.size, zero)


@jit(inline=True)
def _ln_bwd_row_sums(xr, dr, gamma, mu, r, zero):
    """A row's ``mean(dy * gamma)`` and ``mean(dy * gamma * xhat)`` (summed in the
    input's dtype, divided in float64), cast back to the input's dtype."""
    a = zero
    b = zero
    for j in range(xr.size):
        g = dr[j] * gamma[j]
        a += g
        b += g * ((xr[j] - mu) * r)
    return _like(zero, np.float64(a) / xr.size), _like(zero, np.float64(b) / xr.size)


@jit(inline=True)
def _move_sums(pg, pb, sg, sb):
    """``pg += sg``, ``pb += sb``, then ``sg = sb = 0``."""
    for j in range(pg.size):
        pg[j] += sg[j]
        pb[j] += sb[j]
        sg[j] = 0
        sb[j] = 0


@jit(inline=True)
def _held_rows(held, every, pg, pb, sg, sb):
    """Before a row's shares go into ``sg``, ``sb``: they are moved into ``pg``, ``pb``
    (``_move_sums``) once they hold ``every`` rows. Returns the rows held with this one."""
    if held == every:
        _move_sums(pg, pb, sg, sb)
        held = 0
    return held + 1


@jit(parallel=True)
def _ln_bwd_short(dyflat, xflat, gamma, mean, rstd, dxflat, pg, pb, n, d, nchunks, nt, spill,
                  nvec, qg, qb, every):
    """Rows of at most ``nvec`` vectors held in registers
    (``kernels._avx512.ln_bwd_row``); ``pg[c]``, ``pb[c]``: chunk ``c``'s float64 sums
    for dgamma and dbeta, ``nvec`` vectors long; ``spill`` as in ``_ln_fwd_short``. The
    rows add their shares to ``qg[c]``, ``qb[c]``, moved into ``pg[c]``, ``pb[c]`` every
    ``every`` rows and at the chunk's end, as in ``_ln_bwd`` (float32: shares in
    float32, not widened per vector; float64 passes ``pg``, ``pb`` and -1)."""
    for c in prange(nchunks):
        _ln_bwd_short_chunk(np.int64(c), dyflat, xflat, gamma, mean, rstd, dxflat, pg, pb, n, d,
                            nchunks, nt, spill, nvec, qg, qb, every)


@jit()
def _ln_bwd_short_chunk(c, dyflat, xflat, gamma, mean, rstd, dxflat, pg, pb, n, d, nchunks, nt,
                        spill, nvec, qg, qb, every):
    """Chunk ``c`` of ``_ln_bwd_short`` (not inlined: docs/kernels.md, "Where compile time
    goes")."""
    lo, hi = chunk_bounds(n, nchunks, c)
    g = qg[c]
    b = qb[c]
    held = 0
    for i in range(lo, hi):
        held = _held_rows(held, every, pg[c], pb[c], g, b)
        base = i * d
        rin = (n - i) * d
        rout = (hi - i) * d if spill else d
        mu = mean[i]
        r = rstd[i]
        if nvec == 1:
            ln_bwd_row(dyflat, xflat, gamma, dxflat, g, b, base, d, rin, rout, mu, r, nt, 1)
        elif nvec == 2:
            ln_bwd_row(dyflat, xflat, gamma, dxflat, g, b, base, d, rin, rout, mu, r, nt, 2)
        elif nvec == 4:
            ln_bwd_row(dyflat, xflat, gamma, dxflat, g, b, base, d, rin, rout, mu, r, nt, 4)
        else:
            ln_bwd_row(dyflat, xflat, gamma, dxflat, g, b, base, d, rin, rout, mu, r, nt, 8)
    if every > 0:  # the rows since the last move
        _move_sums(pg[c], pb[c], g, b)
    if nt:
        sfence()


@jit(parallel=True)
def _ln_bwd_blocks(dyflat, xflat, gamma, dxflat, mean, rstd, pg, pb, qg, qb, every, nblocks,
                   nchunks, nt, feats):
    """Blocks of ``L`` rows transposed in registers (``kernels._avx512.ln_bwd_block``);
    ``pg[c]``, ``pb[c]``: chunk ``c``'s float64 sums per feature and lane, gathered in
    ``qg[c]``, ``qb[c]`` (the input's dtype) and moved into them every ``every`` blocks:
    the block kernel then adds its shares without widening them, and loads and stores
    half the bytes (float32, one core in L2, 2 / 4 / 8 / 10 features: 72 / 162 / 373 /
    471 -> 58 / 139 / 339 / 425 cycles per block; without any updates 10 features took
    333). float64 sums stay in ``qg`` until the chunk ends (``every`` = all blocks).
    ``dx`` streamed out when ``nt`` (``_ln_blocks_nt``)."""
    for c in prange(nchunks):
        lo, hi = chunk_bounds(nblocks, nchunks, c)
        g, b, sg, sb = qg[c], qb[c], pg[c], pb[c]
        left = every
        for blk in range(lo, hi):
            ln_bwd_block(dyflat, xflat, gamma, dxflat, mean, rstd, g, b, blk, nt, feats)
            left -= 1
            if left == 0 or blk == hi - 1:
                left = every
                for k in range(g.shape[0]):
                    sg[k] += g[k]
                    sb[k] += b[k]
                    g[k] = 0.0
                    b[k] = 0.0
        if nt:
            sfence()


_ln_bwd_1 = serial_twin(_ln_bwd)  # (as the forward's: calls of one chunk)
_ln_bwd_wide_1 = serial_twin(_ln_bwd_wide)
_ln_bwd_short_1 = serial_twin(_ln_bwd_short)
_ln_bwd_blocks_1 = serial_twin(_ln_bwd_blocks)


def layer_norm_backward(
    dy: np.ndarray, x: np.ndarray, gamma: np.ndarray, mean: np.ndarray, rstd: np.ndarray,
    *, out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`layer_norm`: ``(dx, dgamma, dbeta)``; ``dx`` goes into ``out``."""
    x = _checks.float_array("x", x, ndim=2)
    dy = _checks.float_array("dy", dy, ndim=2, dtype=x.dtype)
    _checks.shape_is("dy", dy, x.shape)
    n, d = x.shape
    gamma = _checks.float_array("gamma", gamma, ndim=1, dtype=x.dtype)
    _checks.shape_is("gamma", gamma, (d,))
    mean = _checks.float_array("mean", mean, ndim=1, dtype=x.dtype)
    rstd = _checks.float_array("rstd", rstd, ndim=1, dtype=x.dtype)
    _checks.shape_is("mean", mean, (n,))
    _checks.shape_is("rstd", rstd, (n,))
    dx = _checks.out_array("out", out, x.shape, x.dtype, apart_from=x)
    dg: np.ndarray | None = None  # float64 sums, once some rows are summed
    db: np.ndarray | None = None
    if n and d:
        nblk = _ln_blocks(n, d, x.dtype, LN_BWD_BLOCK_MAX_FEATURES)
        lanes = _lanes(x.dtype)
        if nblk:
            nch = n_chunks(nblk, min_rows=8)
            acc = np.zeros((2, nch, d * lanes))
            part = np.zeros((2, nch, d * lanes), x.dtype)
            every = LN_BWD_BLOCK_PARTIAL if x.dtype == np.float32 else nblk
            pick_twin(_ln_bwd_blocks, _ln_bwd_blocks_1, nch)(
                dy.reshape(-1), x.reshape(-1), _block_params(gamma, lanes), dx.reshape(-1),
                mean, rstd, acc[0], acc[1], part[0], part[1], every, nblk, nch,
                _ln_blocks_nt(dx), (0,) * d)
            sums = acc.reshape(2, nch, d * lanes).sum(axis=1)  # by column and lane
            feat = np.array(block_order(d, lanes)).reshape(-1)  # each lane's feature
            dg = np.bincount(feat, sums[0], d)
            db = np.bincount(feat, sums[1], d)
        done = nblk * lanes
        if done == 0:
            dg, db = _ln_bwd_rows(dy, x, gamma, mean, rstd, dx)
        elif done < n:
            g, b = _ln_bwd_rows(dy[done:], x[done:], gamma, mean[done:], rstd[done:], dx[done:])
            dg, db = (g, b) if dg is None or db is None else (dg + g, db + b)
    if dg is None or db is None:
        return dx, np.zeros(d, x.dtype), np.zeros(d, x.dtype)
    return dx, dg.astype(x.dtype, copy=False), db.astype(x.dtype, copy=False)


def _in(v: int, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= v <= bounds[1]


def _ln_bwd_group(row_bytes: int) -> int:
    """Rows per group in ``_ln_bwd_wide``'s streamed path (1: row by row, as for groups
    of fewer than ``LN_BWD_GROUP_MIN`` rows)."""
    g = min(LN_BWD_GROUP_MAX, LN_BWD_GROUP_BYTES // (2 * row_bytes))
    return g if g >= LN_BWD_GROUP_MIN else 1


def _chunk_sum(parts: np.ndarray) -> np.ndarray:
    """``parts.sum(axis=0)``, without NumPy's reduction (a few us) for a single chunk."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(axis=0)


def _zeros_aligned(shape: tuple[int, ...], dtype) -> np.ndarray:
    """``np.zeros`` on a 64-byte boundary (``kernels.empty_aligned``)."""
    out = _checks.empty_aligned(shape, dtype)
    out[...] = 0
    return out


def _ln_bwd_rows(dy, x, gamma, mean, rstd, dx) -> tuple[np.ndarray, np.ndarray]:
    """Layer norm backward row by row (short rows in registers, or the row loops):
    writes ``dx``, returns the float64 sums for dgamma and dbeta."""
    n, d = x.shape
    nt = _nt_rows(dx, LN_BWD_NT_F32_BYTES)
    nch = n_chunks(n)
    nvec = _short_vectors(d, x.dtype, "ln_bwd") if VEC_SHORT else 0
    # scratch: aligned (no line shared by two threads' parts) unless there is one chunk,
    # which goes to the serial twin and streams nothing (3 us a call saved)
    zeros = np.zeros if nch == 1 else _zeros_aligned
    if nvec:
        width = nvec * _lanes(x.dtype)
        pg, pb = zeros((2, nch, width), np.float64)
        spill = not (np.may_share_memory(dx, x) or np.may_share_memory(dx, dy))
        if x.dtype == np.float32 and LN_BWD_SHORT_PARTIAL > 0:  # float32 shares, moved
            q = zeros((2, nch, width), x.dtype)
            qg, qb, every = q[0], q[1], LN_BWD_SHORT_PARTIAL
        else:
            qg, qb, every = pg, pb, -1
        pick_twin(_ln_bwd_short, _ln_bwd_short_1, nch)(
            dy.reshape(-1), x.reshape(-1), _padded(gamma, nvec), mean, rstd, dx.reshape(-1),
            pg, pb, n, d, nch, nt, spill, nvec, qg, qb, every)
        return _chunk_sum(pg[:, :d]), _chunk_sum(pb[:, :d])
    pg = np.zeros((nch, d), np.float64)
    pb = np.zeros((nch, d), np.float64)
    if d * x.itemsize >= LN_BWD_WIDE_BYTES:
        f32 = x.dtype == np.float32  # float32 shares summed over a few rows first
        q = np.zeros((2, nch, d), x.dtype)  # the shares in the input's dtype
        group = _ln_bwd_group(d * x.itemsize)
        pick_twin(_ln_bwd_wide, _ln_bwd_wide_1, nch)(
            dy, x, gamma, mean, rstd, dx, pg, pb, nch, nt, q[0], q[1],
            LN_BWD_PARTIAL_ROWS if f32 else n + 1,
            f32 and d * x.itemsize >= LN_BWD_PAIR_BYTES and not nt, x.dtype.type(0),
            np.empty((nch, 2, group), x.dtype), group, LN_BWD_L2_AHEAD,
            _checks.empty_aligned((nch, 128 // x.itemsize), x.dtype),
            nt and f32 and _in(d * x.itemsize, LN_BWD_NEXT_F32_BYTES))
        return _chunk_sum(pg), _chunk_sum(pb)
    work = (np.empty if nch == 1 else _checks.empty_aligned)((nch, 3, d), x.dtype)
    if x.dtype == np.float32:  # float32 shares, moved into pg, pb every few rows
        q = np.zeros((2, nch, d), x.dtype)
        qg, qb, every = q[0], q[1], LN_BWD_ROW_PARTIAL
    else:  # float64: the shares go straight into pg, pb
        qg, qb, every = pg, pb, -1
    pick_twin(_ln_bwd, _ln_bwd_1, nch)(dy, x, gamma, mean, rstd, dx, pg, pb, nch,
                                       dx.reshape(-1), work, nt, qg, qb, every,
                                       x.dtype.type(0))
    return _chunk_sum(pg), _chunk_sum(pb)
