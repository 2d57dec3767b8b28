"""Fused AdamW: one pass over params, grads and both moments, updated in place.

PyTorch's decoupled-weight-decay AdamW (``torch.optim.AdamW``): per element

    p <- p * (1 - lr*wd)
    m <- b1*m + (1-b1)*g ;  v <- b2*v + (1-b2)*g*g
    p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)

One fused pass reads p, g, m, v and writes p, m, v (7 streams), the memory-bound
minimum; an unfused NumPy version makes about a dozen passes. Large buffers that share
an offset within a cache line (NumPy allocates at 16 bytes past one) are started on the
line boundary: the few elements before it on one thread, the rest vectorised from there
(``_aligned_head``); :class:`AdamW` allocates its moments at the params' offset for that,
and, for large buffers, far from the params modulo 64 MiB, where the 7 streams do not
slow each other in DRAM (``_moment_buffers``: 1.7-2x on this host). On hosts with
``kernels._prefetch.ROW_HINTS`` a large float32 step goes in blocks that ask for the
lines 8 KiB ahead (``_adamw_hinted``, params of 32 MiB or more). On Intel hosts, grads
that sit just behind the params are read through a small buffer (``_adamw_staged``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernels import _checks
from kernels._checks import empty_aligned, empty_placed
from kernels._chunks import ROW_CHUNK_ELEMENTS, chunk_bounds, n_chunks
from kernels._jit import jit, prange
from kernels._prefetch import PREFETCH_BYTES, ROW_HINTS, row_hint
from kernels._simd import flush_subnormals, restore_fp
from kernels.config import intel_host
from kernels.errors import KernelInputError

__all__ = ["AdamW", "adamw_step"]


@jit(inline=True)
def _adamw_at(i, p, g, m, v, decay, step_size, b1, one_m_b1, b2, one_m_b2, inv_sqrt_bc2, eps):
    gi = g[i]
    mi = b1 * m[i] + one_m_b1 * gi
    vi = b2 * v[i] + one_m_b2 * (gi * gi)
    m[i] = mi
    v[i] = vi
    p[i] = p[i] * decay - step_size * mi / (np.sqrt(vi) * inv_sqrt_bc2 + eps)


@jit(parallel=True)
def _adamw(p, g, m, v, decay, step_size, b1, one_m_b1, b2, one_m_b2, inv_sqrt_bc2, eps,
           nchunks):
    """The update over ``nchunks`` chunks, each with subnormals flushed
    (``kernels._simd.flush_subnormals``): moments that decay through the subnormals
    (a parameter whose gradient stays 0, as the embedding rows of unseen tokens do: ``m``
    gets there after about 800 steps, ``v`` stays there for about 16000) cost an Intel
    core a microcode assist per vector, 20x slower. Flushed, such an ``m`` or ``v`` is 0,
    and the update it would have made is below ``lr * 1e-30``."""
    for c in prange(nchunks):
        fp = flush_subnormals()
        lo, hi = chunk_bounds(p.size, nchunks, c)
        ps, gs, ms, vs = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
        for t in range(hi - lo):
            _adamw_at(t, ps, gs, ms, vs, decay, step_size, b1, one_m_b1, b2, one_m_b2,
                      inv_sqrt_bc2, eps)
        restore_fp(fp)


_HINT_BLOCK = 256  # elements per block of _adamw_hinted
# params from which _adamw_hinted runs: where the four arrays may be in this host's L3
# the hints cost (2^19-2^22 float32 elements, repeated calls: 0.87-0.95x; 2^23, 128 MiB
# in all, 1.02x; 2^24 1.09x; from memory 1.09-1.12x)
_HINT_MIN_BYTES = 32 << 20


@jit(parallel=True)
def _adamw_hinted(p, g, m, v, decay, step_size, b1, one_m_b1, b2, one_m_b2, inv_sqrt_bc2,
                  eps, nchunks):
    """``_adamw`` in blocks of ``_HINT_BLOCK`` elements, each first asking for the lines
    of all four arrays ``PREFETCH_BYTES`` ahead (``row_hint``): what runs where
    ``ROW_HINTS``, float32 only (``adamw_step``). Intel Xeon (Emerald Rapids, 2 cores),
    2^24 elements from memory, A/B in one process: float32 1.07-1.19x over ``_adamw``
    (the blocks alone, without the hints, 0.96-0.99x); float64 0.91-0.94x (asking 4, 8
    or 16 KiB ahead alike), so float64 keeps ``_adamw``. One loop over the lines for all
    four arrays: four calls of ``prefetch_ahead`` (a clamped loop each) measured 0.98x."""
    line = 64 // p.itemsize
    ahead = PREFETCH_BYTES // p.itemsize
    last = p.size - 1
    for c in prange(nchunks):
        fp = flush_subnormals()
        lo, hi = chunk_bounds(p.size, nchunks, c)
        for s in range(lo, hi, _HINT_BLOCK):
            for q in range(s + ahead, s + ahead + _HINT_BLOCK, line):
                j = min(q, last)
                row_hint(p, j)
                row_hint(g, j)
                row_hint(m, j)
                row_hint(v, j)
            e = min(s + _HINT_BLOCK, hi)
            ps, gs, ms, vs = p[s:e], g[s:e], m[s:e], v[s:e]
            for t in range(e - s):
                _adamw_at(t, ps, gs, ms, vs, decay, step_size, b1, one_m_b1, b2, one_m_b2,
                          inv_sqrt_bc2, eps)
        restore_fp(fp)


@jit()
def _adamw_head(p, g, m, v, decay, step_size, b1, one_m_b1, b2, one_m_b2, inv_sqrt_bc2,
                eps):
    """``_adamw`` on one thread (subnormals flushed): small params, or the few elements
    before the 64-byte boundary."""
    fp = flush_subnormals()
    for i in range(p.size):
        _adamw_at(i, p, g, m, v, decay, step_size, b1, one_m_b1, b2, one_m_b2, inv_sqrt_bc2,
                  eps)
    restore_fp(fp)


# The grads are copied through a small buffer per thread (``_adamw_staged``) when the
# params start just past them in the address space taken modulo _ALIAS_PERIOD: between
# 1 and _ALIAS_BYTES bytes further on. On Intel hosts only, where that layout held the
# loads of the grads up (docs/kernels.md, "Grads just behind the params": the buffer
# 1.45-2.49x). A Zen 5 host does not stall on it, and there the buffer was the slow
# part: params 16 bytes past the grads, A/B by rounds in one process, the plain loop
# over the buffer, float32 2^18 elements 1.5-2.2x, 2^20 2.6x, 2^22 1.9-2.4x, 2^24 1.7x;
# float64 2^18 1.5x, 2^22 1.5-1.6x.
STAGE_ALIASED_GRADS = intel_host()
_GRAD_STAGE = 1024  # elements per copy (4-8 KiB: stays in L1)
_ALIAS_PERIOD = 1 << 16
_ALIAS_BYTES = 63


@jit(parallel=True)
def _adamw_staged(p, g, m, v, decay, step_size, b1, one_m_b1, b2, one_m_b2, inv_sqrt_bc2,
                  eps, nchunks):
    """``_adamw`` with the grads read through a per-thread buffer of ``_GRAD_STAGE``
    elements: each piece of ``g`` is copied into it, then the update reads it there.
    For grads that sit just behind the params (``_grads_alias``), where the loads of
    ``g`` waited on the stores to that array: the buffer's addresses bear no relation
    to the params' (see ``adamw_step``)."""
    for c in prange(nchunks):
        fp = flush_subnormals()
        lo, hi = chunk_bounds(p.size, nchunks, c)
        buf = np.empty(_GRAD_STAGE, p.dtype)
        for s in range(lo, hi, _GRAD_STAGE):
            k = min(_GRAD_STAGE, hi - s)
            for t in range(k):
                buf[t] = g[s + t]
            ps, ms, vs = p[s:s + k], m[s:s + k], v[s:s + k]
            for t in range(k):
                _adamw_at(t, ps, buf, ms, vs, decay, step_size, b1, one_m_b1, b2, one_m_b2,
                          inv_sqrt_bc2, eps)
        restore_fp(fp)


def _grads_alias(g: np.ndarray, p: np.ndarray) -> bool:
    """Whether ``p`` starts 1 to ``_ALIAS_BYTES`` bytes past ``g`` modulo
    ``_ALIAS_PERIOD``: the layout that slows the loads of ``g`` (see ``adamw_step``)."""
    return 0 < (p.ctypes.data - g.ctypes.data) % _ALIAS_PERIOD <= _ALIAS_BYTES


_PEEL_MIN = 1 << 16  # elements: below this one call costs less than two
# bytes per array up to which one thread does the whole step (``_adamw_head``): numba's
# parallel launch costs more than the second core saves. Intel host, us per call,
# parallel / one thread: float32 1024 elements 3.3 / 1.2, 8192 4.8 / 4.1, 16384 7.0 /
# 7.6; float64 1024 3.6 / 2.2, 4096 5.6 / 6.0
_SERIAL_MAX_BYTES = 32 << 10


def _aligned_head(arrays: list[np.ndarray]) -> int:
    """Elements before ``arrays[0]`` reaches a 64-byte boundary when every array is at
    the same offset within a cache line (NumPy's 16-byte aligned buffers usually are);
    else 0. The vectorised loop starts where its slices start, so starting all of them
    on a line boundary keeps its 32-byte loads and stores from straddling two lines
    (one thread, 16.7M float32 from memory: 19.4 -> 15.7 ms; float64 56 -> 44)."""
    if arrays[0].size < _PEEL_MIN:
        return 0
    offs = {a.ctypes.data % 64 for a in arrays}
    if len(offs) != 1:
        return 0
    off = offs.pop()
    item = arrays[0].itemsize
    return 0 if off % item else ((64 - off) % 64) // item


def _flat(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """A contiguous 1-D view of ``a``, or a copy plus 'write back' when it is strided."""
    if a.flags.c_contiguous:
        return a.reshape(-1), False
    return np.ascontiguousarray(a).reshape(-1), True


def _step_consts(dtype, step, lr, beta1, beta2, eps, weight_decay) -> tuple:
    """The kernels' constants after ``p``, ``g``, ``m``, ``v``, in ``dtype``: the decay
    factor, the step size over the first bias correction, the betas and one minus each,
    one over the square root of the second bias correction, and ``eps``."""
    t = np.dtype(dtype).type
    bc1 = 1.0 - float(beta1) ** step
    bc2 = 1.0 - float(beta2) ** step
    return (t(1.0 - lr * weight_decay), t(lr / bc1), t(beta1), t(1.0 - beta1),
            t(beta2), t(1.0 - beta2), t(1.0 / np.sqrt(bc2)), t(eps))


def adamw_step(
    params: np.ndarray,
    grads: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> None:
    """Apply one AdamW step in place to ``params``, ``exp_avg`` and ``exp_avg_sq``.

    ``step`` is the 1-based step count (for bias correction). All four arrays share one
    shape and dtype (float32 or float64). Strided arrays work (copied, then written back).

    Grads that sit just behind the params (1 to 63 bytes, modulo 64 KiB), as when they
    were allocated right before params of a power-of-two size, are read through a small
    per-thread buffer (``_adamw_staged``): in that layout the loads of the grads wait on
    the stores just made to the params. Emerald Rapids host, huge pages, 2^22 / 2^18
    float32 (from memory / in L2), A/B medians: params 16-48 bytes past the grads modulo
    1 MiB 1.7x / 2.4-2.5x faster staged; 64 bytes past 0.91x / 1.44x and a moment 16
    bytes past the grads 0.99x / 1.51x (not staged); other layouts no effect.
    """
    _checks.float_array("params", params)
    _checks.float_array("grads", grads, dtype=params.dtype)
    _checks.shape_is("grads", grads, params.shape)
    for name, arr in (("params", params), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _checks.writable_target(name, arr, params)
    step = _checks.positive_int("step", step)
    lr = _checks.finite_float("lr", lr, low=0.0)
    eps = _checks.finite_float("eps", eps, low=0.0)
    weight_decay = _checks.finite_float("weight_decay", weight_decay, low=0.0)
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= float(b) < 1.0:
            raise KernelInputError(f"{name} must be in [0, 1), got {b!r}")
    if params.size == 0:
        return
    flats = [_flat(a) for a in (params, exp_avg, exp_avg_sq)]
    g = np.ascontiguousarray(grads).reshape(-1)
    arrays = [flats[0][0], g, flats[1][0], flats[2][0]]
    consts = _step_consts(params.dtype, step, lr, beta1, beta2, eps, weight_decay)
    if g.nbytes <= _SERIAL_MAX_BYTES:
        _adamw_head(*arrays, *consts)
    elif STAGE_ALIASED_GRADS and arrays[0].size >= _PEEL_MIN and _grads_alias(g, arrays[0]):
        _adamw_staged(*arrays, *consts, n_chunks(g.size, min_rows=_GRAD_STAGE))
    else:
        head = _aligned_head(arrays)
        body = arrays
        if head:
            _adamw_head(*(a[:head] for a in arrays), *consts)
            body = [a[head:] for a in arrays]
        if ROW_HINTS and body[0].nbytes >= _HINT_MIN_BYTES and body[0].dtype == np.float32:
            _adamw_hinted(*body, *consts, n_chunks(body[0].size, min_rows=_PEEL_MIN))
        else:
            _adamw(*body, *consts, n_chunks(body[0].size, min_rows=ROW_CHUNK_ELEMENTS))
    for (flat, copied), target in zip(flats, (params, exp_avg, exp_avg_sq)):
        if copied:
            target[...] = flat.reshape(target.shape)


# Where AdamW puts its moments relative to the params, in the address space taken modulo
# a period (see _moment_buffers): m a third of the way round, v two thirds; multiples of
# 64 bytes, so both keep the params' offset in a cache line
_SPREAD_PERIOD = 64 << 20  # the longest period; shorter for params under 64 MiB
_SPREAD_AT = (1 / 3, 2 / 3)  # of the period: a third apart modulo every power of two
_SPREAD_MIN_BYTES = 1 << 20  # below this no placement measured faster


def _spread_period(nbytes: int) -> int:
    """The period the moments are placed in: the power of two at or above ``nbytes``,
    at most ``_SPREAD_PERIOD`` (so the slack before a moment is at most its size)."""
    return min(_SPREAD_PERIOD, 1 << max(nbytes - 1, 1).bit_length())


def _moment_buffers(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two zeroed buffers like ``params`` (the moments), each at ``params``' offset in a
    cache line (see ``_aligned_head``) and, for ``params`` of 1 MiB or more, placed away
    from it in the address space taken modulo a period ``P`` (``_spread_period``: the
    power of two at or above its size, at most 64 MiB), at ``P / 3`` and ``2 P / 3``.

    The update streams 7 arrays at once, and it is slow when they sit within a few KiB
    of each other modulo a large power of two, which NumPy's one-after-another
    allocations often do (64 or 128 MiB plus 4-8 KiB apart): measured on a Zen 4 host with
    the params and grads allocated by NumPy, 16.7M elements, both cores, ms (moments 4 and
    -8 KiB from the params / 64 and 128 KiB / 16.5 and 40.75 MiB / as ``np.empty`` placed
    them): float32 16.9 / 8.9 / 8.9 / 14.8, float64 42.5 / 14.9 (256, 512 KiB) / 14.7 /
    30.0. On an Intel host (Emerald Rapids) the same held for params of 4 MiB, which
    stream from memory there too: moments that ``np.empty`` put 8 MiB from the params
    (the same offset modulo 2 MiB) took 554-689 us a step against 392-452 placed apart.
    A period at or above the params' size is enough: ``m - p`` is then ``P / 3`` plus a
    multiple of ``P``, never near a multiple of any longer power of two, and a third of
    the way round modulo every shorter one too (binary 0.0101...): at ``0.258 P`` (16.5
    MiB of 64, the first choice) the moments of 4 MiB params sat 32 KiB from the params
    modulo 1 MiB. DRAM banks are picked by physical address bits, which here follow the
    virtual ones (huge pages faulted in order); where they do not, the placement costs
    nothing. The slack before each buffer is address space only (at most the buffer's
    size): never touched, so never mapped."""
    if params.nbytes < _SPREAD_MIN_BYTES:
        m, v = (empty_aligned(params.shape, params.dtype, like=params) for _ in range(2))
    else:
        period = _spread_period(params.nbytes)
        m, v = (empty_placed(params, int(period * at) // 64 * 64, period)
                for at in _SPREAD_AT)
    m.fill(0)
    v.fill(0)
    return m, v


@dataclass
class AdamW:
    """AdamW state for one flat parameter buffer (what the training app optimises)."""

    params: np.ndarray
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    step_count: int = 0
    exp_avg: np.ndarray = field(init=False)
    exp_avg_sq: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        # at the params' offset in a cache line, so adamw_step's loop starts every
        # array on a line boundary (see _aligned_head), and apart from them in memory
        self.exp_avg, self.exp_avg_sq = _moment_buffers(self.params)

    def step(self, grads: np.ndarray) -> None:
        """Advance one step with ``grads`` (same shape and dtype as ``params``)."""
        self.step_count += 1
        adamw_step(
            self.params, grads, self.exp_avg, self.exp_avg_sq, step=self.step_count,
            lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
            weight_decay=self.weight_decay,
        )
