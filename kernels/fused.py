"""Bias + GELU + layer norm in one kernel each way: a hidden layer's elementwise work.

A layer ``h = layer_norm(gelu(z + b))`` (the training app's, after its first matrix
product) costs two kernel calls forward and two backward with the separate kernels, and
every call streams its whole input in and its output out: ``a = gelu(z + b)`` is written,
then read again by the layer norm; backward, the layer norm's ``da`` is written, then read
again by GELU's backward. At a training step's sizes (a batch of 1024 x 256 float32 is 1
MiB per array) those arrays no longer sit in the core's L2 when the next call reads them,
so each such read comes from L3. Here each row goes through both steps while it is in L1:

- :func:`bias_gelu_layer_norm` writes ``a`` (kept for the backward) and ``h`` and the row
  statistics, reading ``z`` once (GELU over a group of rows, ``GROUP_BYTES``, then their
  layer norm);
- :func:`bias_gelu_layer_norm_backward` builds a row's ``da`` in a scratch row and turns
  it into ``dz`` at once, reading ``dh``, ``a`` and ``z`` once and writing only ``dz``
  (plus the parameter gradients ``db``, ``dgamma``, ``dbeta``).

Results are those of :func:`kernels.nn.bias_act` (``"gelu"``) followed by
:func:`kernels.nn.layer_norm`, and of :func:`kernels.nn.layer_norm_backward` followed by
:func:`kernels.nn.bias_act_backward`, to float rounding: the same GELU code (the
``kernels._avx512`` blocks where the separate kernels use them, else the portable
loops), statistics summed per vector lane in the input's dtype (the mean, then the
variance about it) and divided in float64, parameter gradients summed per chunk of rows
(float32 ``dgamma``, ``dbeta`` shares moved into float64 sums every 16 rows).
"""

from __future__ import annotations

import numpy as np

from kernels import _checks
from kernels._chunks import chunk_bounds, n_chunks
from kernels._jit import jit, num_threads, pick_twin, prange, serial_twin
from kernels._simd import sfence
from kernels.activations import (
    _PEND,
    _TILE,
    _act,
    _act_grad,
    _finish_any,
    _gelu_block,
    _pending,
    _tiled,
    _vec,
    bias_act,
    bias_act_backward,
)
from kernels.nn import (
    LN_BWD_NT_F32_BYTES,
    LN_FWD_NT_BYTES,
    _held_rows,
    _like,
    _ln_out_row,
    _move_sums,
    _nt_rows,
    layer_norm,
    layer_norm_backward,
)

__all__ = ["bias_gelu_layer_norm", "bias_gelu_layer_norm_backward"]

# float32 parameter-gradient shares are summed over this many rows in float32, then
# moved into the float64 sums (as the layer norm's own backward does)
_PARTIAL_ROWS = 16
# the row loops may sum in any order (vectorised reductions), as well as fuse multiply-adds
_SUMS = {"contract", "reassoc"}
# The forward takes rows in groups of about this many bytes: GELU over the group, then
# its layer norm, each loop staying with one kind of code for a while. Row by row it took
# 86 us at 1024 x 256 float32 (2 threads, in cache) against 67-70 in groups of 4-64 rows
# (16 KiB: 16 rows); 4096 rows 471 -> 433
GROUP_BYTES = 16384
# Rows of fewer features go through the separate kernels (bias_act and layer_norm, their
# backwards), which take short rows in blocks of rows (kernels.nn, "Few features"); the
# fused loops go row by row, a masked GELU block and two short reductions a row. Zen 5
# host, fused / separate time (2^17 elements in cache; 2^22 from memory), float32
# forward / backward: 16 features 3.3 / 2.0x (4.8-5.9 / 2.5-3.2x), 32 1.6 / 1.6x (3.1 /
# 2.5x), 64 1.0 / 1.05x (1.1-2.0 / 0.8-0.9x), 128 1.1 / 1.0x (1.2-1.4 / 0.7x); float64:
# 16 2.0 / 2.4x, 32 1.9 / 1.6x, 64 1.3 / 1.5x (1.0 / 0.2-0.75x), 128 0.95 / 0.9x
SEPARATE_BELOW_FEATURES = 128
# The forward alone: separate below this many features (bench_fused.py, 9 rounds, median
# separate / fused: 128 and 192 features 0.86-1.01x in cache and from memory, float32
# and float64; 256 1.03-1.10x). The backward's fused loops pay from 128 (from memory
# 1.3-1.9x; in cache 0.86-1.09x).
SEPARATE_FORWARD_BELOW_FEATURES = 256


def _group_rows(d: int, itemsize: int) -> int:
    return max(1, GROUP_BYTES // max(1, d * itemsize))


@jit(inline=True, fastmath={"contract"})
def _gelu_row_vec(dy, z, b, out, acc, bufs, backward, nt):
    """``out = gelu(z + b)``, or backward ``dy * gelu'(z + b)`` also added to ``acc``,
    for one row through the ``_avx512`` blocks (float64 lanes put aside are finished
    before returning, so the row is complete). ``nt``: whole blocks written with
    non-temporal stores (``out`` on a 64-byte boundary), the masked tail plainly."""
    pz, pdy, pi, pj = bufs
    d = z.size
    blk = 256 // z.itemsize
    cnt = 0
    j = 0
    while j + blk <= d:
        if nt:
            cnt = _gelu_block(2, True, backward, dy, z, b, out, acc, j, j, blk, pz, pdy, pi,
                              pj, cnt)
        else:
            cnt = _gelu_block(0, True, backward, dy, z, b, out, acc, j, j, blk, pz, pdy, pi,
                              pj, cnt)
        if cnt > _PEND:
            cnt = _finish_any(pz, pdy, pi, pj, cnt, out, acc, backward, backward)
        j += blk
    if j < d:
        cnt = _gelu_block(1, True, backward, dy, z, b, out, acc, j, j, d - j, pz, pdy, pi, pj,
                          cnt)
    _finish_any(pz, pdy, pi, pj, cnt, out, acc, backward, backward)


@jit(inline=True)
def _ln_fwd_rest(a, gamma, beta, eps, y, mean, rstd, i, nt, flat, ahead):
    """Row ``i`` of the layer norm of ``a`` (just written, in L1) into ``y``: the mean,
    then the variance about it, each summed in ``a``'s dtype (vectorised: partial sums
    per lane, ``_SUMS``), divided in float64. ``nt``, ``flat``, ``ahead``: as
    ``nn._ln_out_row`` takes them (streamed stores, a later row's line asked for)."""
    ar = a[i]
    d = ar.size
    zero = ar.dtype.type(0)
    s = zero
    for j in range(d):
        s += ar[j]
    mu = _like(zero, np.float64(s) / d)
    q = zero
    for j in range(d):
        t = ar[j] - mu
        q += t * t
    mean[i] = mu
    rstd[i] = 1.0 / np.sqrt(np.float64(q) / d + eps)
    _ln_out_row(ar, gamma, beta, y[i], mean[i], rstd[i], nt, flat, ahead)


@jit(fastmath=_SUMS)
def _fwd_chunk_vec(c, z, b, gamma, beta, eps, a, y, mean, rstd, nchunks, bufs, group, nt,
                   zflat):
    """Chunk ``c``, ``group`` rows at a time: GELU over the group's rows, then their
    layer norm (``_group_rows``). With ``nt``, ``h`` is streamed out as ``layer_norm``
    streams its output (``nn._nt_rows``), each row asking for ``z``'s row a group ahead.
    2^23 elements from memory, A/B in one process, plain / streamed (medians): reused
    outputs float32 128-4096 features 1.03-1.64x, float64 1.05-1.87x; fresh outputs each
    call (as the function allocates them) float32 0.96-1.29x, float64 1.04-1.28x.
    Streaming ``a`` too (GELU into a scratch group, copied out with non-temporal stores)
    was 0.85-1.70x against ``h`` alone: not taken."""
    lo, hi = chunk_bounds(z.shape[0], nchunks, c)
    mine = (bufs[0][c], bufs[1][c], bufs[2][c], bufs[3][c])
    for g0 in range(lo, hi, group):
        g1 = min(g0 + group, hi)
        for i in range(g0, g1):
            _gelu_row_vec(z[i], z[i], b, a[i], b, mine, False, False)
        for i in range(g0, g1):
            _ln_fwd_rest(a, gamma, beta, eps, y, mean, rstd, i, nt, zflat,
                         (i + group) * z.shape[1])
    if nt:
        sfence()  # this thread's streamed lines, before the call returns


@jit(fastmath=_SUMS)
def _fwd_chunk(c, z, b, gamma, beta, eps, a, y, mean, rstd, nchunks, group):
    lo, hi = chunk_bounds(z.shape[0], nchunks, c)
    for g0 in range(lo, hi, group):
        g1 = min(g0 + group, hi)
        for i in range(g0, g1):
            zr = z[i]
            ar = a[i]
            for j in range(zr.size):
                ar[j] = _act(zr[j] + b[j], 2)
        for i in range(g0, g1):
            _ln_fwd_rest(a, gamma, beta, eps, y, mean, rstd, i, False, a[i], 0)


@jit(parallel=True)
def _fwd_vec(z, b, gamma, beta, eps, a, y, mean, rstd, nchunks, bufs, group, nt, zflat):
    if nt:
        for c in prange(nchunks):
            _fwd_chunk_vec(np.int64(c), z, b, gamma, beta, eps, a, y, mean, rstd, nchunks,
                           bufs, group, True, zflat)
    else:
        for c in prange(nchunks):
            _fwd_chunk_vec(np.int64(c), z, b, gamma, beta, eps, a, y, mean, rstd, nchunks,
                           bufs, group, False, zflat)


@jit(parallel=True)
def _fwd(z, b, gamma, beta, eps, a, y, mean, rstd, nchunks, group):
    for c in prange(nchunks):
        _fwd_chunk(np.int64(c), z, b, gamma, beta, eps, a, y, mean, rstd, nchunks, group)


_fwd_vec_1 = serial_twin(_fwd_vec)
_fwd_1 = serial_twin(_fwd)


@jit(inline=True)
def _ln_bwd_row(dy, a, gamma, mean, rstd, i, da, qg, qb, zero):
    """Row ``i`` of the layer norm's backward into the scratch row ``da``; the row's
    dgamma/dbeta shares added to ``qg``, ``qb``."""
    dr = dy[i]
    ar = a[i]
    mu = mean[i]
    r = rstd[i]
    s1 = zero
    s2 = zero
    for j in range(ar.size):
        xh = (ar[j] - mu) * r
        g = dr[j] * gamma[j]
        s1 += g
        s2 += g * xh
        qg[j] += dr[j] * xh
        qb[j] += dr[j]
    m1 = _like(zero, np.float64(s1) / ar.size)
    m2 = _like(zero, np.float64(s2) / ar.size)
    for j in range(ar.size):
        xh = (ar[j] - mu) * r
        da[j] = r * (dr[j] * gamma[j] - m1 - xh * m2)


@jit(fastmath=_SUMS)
def _bwd_chunk_vec(c, dy, a, z, b, gamma, mean, rstd, dz, pg, pb, qg, qb, pdb, work, every,
                   nchunks, bufs, nt):
    """Chunk ``c`` row by row: the layer norm's backward into the scratch row
    ``work[c]``, then GELU's backward from it into ``dz`` (in groups of rows, as the
    forward goes, it was within 2% either way). ``nt``: ``dz`` streamed out where
    ``layer_norm_backward`` streams its ``dx``; 2^23 elements from memory, A/B in one
    process, plain / streamed (medians): reused outputs 1.03-1.24x, fresh ones (as the
    function allocates) 0.98-1.20x, float32 1.02-1.04x."""
    lo, hi = chunk_bounds(z.shape[0], nchunks, c)
    mine = (bufs[0][c], bufs[1][c], bufs[2][c], bufs[3][c])
    zero = z.dtype.type(0)
    da = work[c]
    held = 0
    for i in range(lo, hi):
        held = _held_rows(held, every, pg[c], pb[c], qg[c], qb[c])
        _ln_bwd_row(dy, a, gamma, mean, rstd, i, da, qg[c], qb[c], zero)
        _gelu_row_vec(da, z[i], b, dz[i], pdb[c], mine, True, nt)
    if every > 0:
        _move_sums(pg[c], pb[c], qg[c], qb[c])
    if nt:
        sfence()


@jit(fastmath=_SUMS)
def _bwd_chunk(c, dy, a, z, b, gamma, mean, rstd, dz, pg, pb, qg, qb, pdb, work, every,
               nchunks):
    lo, hi = chunk_bounds(z.shape[0], nchunks, c)
    zero = z.dtype.type(0)
    acc = pdb[c]
    da = work[c]
    held = 0
    for i in range(lo, hi):
        held = _held_rows(held, every, pg[c], pb[c], qg[c], qb[c])
        _ln_bwd_row(dy, a, gamma, mean, rstd, i, da, qg[c], qb[c], zero)
        zr = z[i]
        dzr = dz[i]
        for j in range(zr.size):
            v = da[j] * _act_grad(zr[j] + b[j], 2)
            dzr[j] = v
            acc[j] += v
    if every > 0:
        _move_sums(pg[c], pb[c], qg[c], qb[c])


@jit(parallel=True)
def _bwd_vec(dy, a, z, b, gamma, mean, rstd, dz, pg, pb, qg, qb, pdb, work, every, nchunks,
             bufs, nt):
    if nt:
        for c in prange(nchunks):
            _bwd_chunk_vec(np.int64(c), dy, a, z, b, gamma, mean, rstd, dz, pg, pb, qg, qb,
                           pdb, work, every, nchunks, bufs, True)
    else:
        for c in prange(nchunks):
            _bwd_chunk_vec(np.int64(c), dy, a, z, b, gamma, mean, rstd, dz, pg, pb, qg, qb,
                           pdb, work, every, nchunks, bufs, False)


@jit(parallel=True)
def _bwd(dy, a, z, b, gamma, mean, rstd, dz, pg, pb, qg, qb, pdb, work, every, nchunks):
    for c in prange(nchunks):
        _bwd_chunk(np.int64(c), dy, a, z, b, gamma, mean, rstd, dz, pg, pb, qg, qb, pdb, work,
                   every, nchunks)


_bwd_vec_1 = serial_twin(_bwd_vec)
_bwd_1 = serial_twin(_bwd)


@jit()
def _new_pending(nchunks):
    return _pending(nchunks)


_NONE_PENDING: dict[int, tuple] = {}


def _pending_for(dtype: np.dtype, nchunks: int) -> tuple:
    """Per-chunk buffers for float64 GELU lanes put aside (``activations._pending``);
    float32 puts none aside, so it gets shared empty ones (one allocation per chunk
    count, not four per call)."""
    if dtype == np.float64:
        return _new_pending(nchunks)
    bufs = _NONE_PENDING.get(nchunks)
    if bufs is None:
        bufs = _NONE_PENDING[nchunks] = (np.empty((nchunks, 1)), np.empty((nchunks, 1)),
                                         np.empty((nchunks, 1), np.int64),
                                         np.empty((nchunks, 1), np.int64))
    return bufs


def _params(z: np.ndarray, **vecs: np.ndarray) -> list[np.ndarray]:
    """Each per-feature vector checked: 1-D, ``z``'s dtype, one entry per column."""
    out = []
    for name, v in vecs.items():
        vc = _checks.float_array(name, v, ndim=1, dtype=z.dtype)
        _checks.shape_is(name, vc, (z.shape[1],))
        out.append(vc)
    return out


# The forward's chunks: at least 16 rows, or CHUNK_ELEMENTS elements where rows are
# wider than CHUNK_ELEMENTS / 16. With 16 rows a chunk, 16 x 16384 took one thread
# (0.61-0.73x the separate kernels, which split it over both cores; now 1.1-1.35x).
CHUNK_ELEMENTS = 16384


def _fwd_chunks(n: int, d: int) -> int:
    return n_chunks(n, min_rows=max(1, min(16, CHUNK_ELEMENTS // max(d, 1))))


def _bwd_chunks(n: int, d: int) -> int:
    """The backward's chunks: at least 16 rows, as each chunk has its own partial sums
    (``dgamma``, ``dbeta``, ``db``: 28 bytes a feature in float32, zeroed and added up,
    about two rows' traffic), but never fewer than one per thread for at least
    ``2 * CHUNK_ELEMENTS`` elements (16 x 16384: 1.05x -> 1.2x the separate kernels in
    float64; chunks of ``CHUNK_ELEMENTS`` made float32 8 x 32768 0.65x)."""
    nch = n_chunks(n, min_rows=16)
    if nch == 1 and n >= 2 and n * d >= 2 * CHUNK_ELEMENTS:
        return min(n, num_threads())
    return nch


def bias_gelu_layer_norm(
    z: np.ndarray, b: np.ndarray, gamma: np.ndarray, beta: np.ndarray, *, eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``a = gelu(z + b)`` and ``h = layer_norm(a)`` of 2-D ``z`` in one pass over it.

    Returns ``(a, h, mean, rstd)``: ``a`` and the row statistics are what
    :func:`bias_gelu_layer_norm_backward` needs (as from :func:`kernels.nn.bias_act` with
    ``"gelu"`` and :func:`kernels.nn.layer_norm`, exact-erf GELU, biased variance).
    Rows of fewer than ``SEPARATE_FORWARD_BELOW_FEATURES`` features go through those two
    kernels (faster there than the fused row loops), with their results bit for bit.
    """
    zc = _checks.float_array("z", z, ndim=2)
    bc, gc, btc = _params(zc, b=b, gamma=gamma, beta=beta)
    eps = _checks.finite_float("eps", eps, low=0.0)
    n, d = zc.shape
    if n and d < SEPARATE_FORWARD_BELOW_FEATURES:
        a = bias_act(zc, bc, "gelu")
        return (a, *layer_norm(a, gc, btc, eps=eps))
    a = _checks.empty_aligned(zc.shape, zc.dtype)
    h = _checks.empty_aligned(zc.shape, zc.dtype)
    mean = np.empty(n, zc.dtype)
    rstd = np.empty(n, zc.dtype)
    if n and d:
        nch = _fwd_chunks(n, d)
        group = _group_rows(d, zc.itemsize)
        if _vec(zc):
            zflat = zc.reshape(-1) if zc.flags.c_contiguous else a.reshape(-1)
            pick_twin(_fwd_vec, _fwd_vec_1, nch)(zc, _tiled(bc), gc, btc, eps, a, h,
                                                 mean, rstd, nch, _pending_for(zc.dtype, nch),
                                                 group, _nt_rows(h, LN_FWD_NT_BYTES), zflat)
        else:
            pick_twin(_fwd, _fwd_1, nch)(zc, bc, gc, btc, eps, a, h, mean, rstd, nch, group)
    elif n:
        mean[:] = np.nan
        rstd[:] = np.nan
    return a, h, mean, rstd


def bias_gelu_layer_norm_backward(
    dh: np.ndarray, a: np.ndarray, z: np.ndarray, b: np.ndarray, gamma: np.ndarray,
    mean: np.ndarray, rstd: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`bias_gelu_layer_norm` for the upstream gradient ``dh``:
    ``(dz, db, dgamma, dbeta)``. ``a``, ``mean``, ``rstd`` are the forward's outputs, ``z``
    and ``b`` its inputs. Rows of fewer than ``SEPARATE_BELOW_FEATURES`` features go
    through :func:`kernels.nn.layer_norm_backward` and :func:`kernels.nn.bias_act_backward`."""
    zc = _checks.float_array("z", z, ndim=2)
    n, d = zc.shape
    arrays = []
    for name, v in (("dh", dh), ("a", a)):
        vc = _checks.float_array(name, v, ndim=2, dtype=zc.dtype)
        _checks.shape_is(name, vc, zc.shape)
        arrays.append(vc)
    dhc, ac = arrays
    bc, gc = _params(zc, b=b, gamma=gamma)
    stats = []
    for name, v in (("mean", mean), ("rstd", rstd)):
        vc = _checks.float_array(name, v, ndim=1, dtype=zc.dtype)
        _checks.shape_is(name, vc, (n,))
        stats.append(vc)
    mc, rc = stats
    if n and d < SEPARATE_BELOW_FEATURES:
        da, dg, dbeta = layer_norm_backward(dhc, ac, gc, mc, rc)
        return (*bias_act_backward(da, zc, bc, "gelu"), dg, dbeta)
    dz = _checks.empty_aligned(zc.shape, zc.dtype)
    if not (n and d):
        zeros = np.zeros(d, zc.dtype)
        return dz, zeros, zeros.copy(), zeros.copy()
    nch = _bwd_chunks(n, d)
    pg = np.zeros((nch, d))
    pb = np.zeros((nch, d))
    if zc.dtype == np.float32:  # float32 shares, moved into pg, pb every few rows
        q = np.zeros((2, nch, d), zc.dtype)
        qg, qb, every = q[0], q[1], _PARTIAL_ROWS
    else:  # float64: the shares go straight into pg, pb
        qg, qb, every = pg, pb, -1
    pdb = np.zeros((nch, d + _TILE), zc.dtype)
    work = _checks.empty_aligned((nch, d + _TILE), zc.dtype)
    if _vec(zc):
        pick_twin(_bwd_vec, _bwd_vec_1, nch)(dhc, ac, zc, _tiled(bc), gc, mc, rc, dz, pg,
                                             pb, qg, qb, pdb, work, every, nch,
                                             _pending_for(zc.dtype, nch),
                                             _nt_rows(dz, LN_BWD_NT_F32_BYTES))
    else:
        pick_twin(_bwd, _bwd_1, nch)(dhc, ac, zc, bc, gc, mc, rc, dz, pg, pb, qg, qb, pdb,
                                     work, every, nch)
    db = pdb[:, :d].sum(axis=0)
    return (dz, db, pg.sum(axis=0).astype(zc.dtype, copy=False),
            pb.sum(axis=0).astype(zc.dtype, copy=False))
