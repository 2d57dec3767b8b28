"""Argument checks shared by the public wrappers: clear errors, then C-contiguous arrays.

Kernels are compiled for C-contiguous float32/float64 arrays only, so each signature is
compiled once per dtype; a non-contiguous view is copied here (documented in
docs/kernels.md) instead of compiling a strided variant.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from kernels._jit import jit
from kernels.errors import KernelDtypeError, KernelInputError

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_dtype(name: str, dtype: Any) -> None:
    """Raise, naming ``name``, unless ``dtype`` is float32 or float64 (for any array
    type: a dask array's too)."""
    if dtype not in FLOAT_DTYPES:
        raise KernelDtypeError(
            f"{name} has dtype {dtype}; kernels take float32 or float64, "
            f"cast with {name}.astype(np.float32)"
        )


def float_array(name: str, a: Any, *, ndim: int | None = None, dtype: Any = None) -> np.ndarray:
    """Return ``a`` as a C-contiguous float32/float64 array, or raise naming ``name``."""
    if not isinstance(a, np.ndarray):
        raise KernelDtypeError(
            f"{name} must be a numpy array, got {type(a).__name__}; wrap it with np.asarray"
        )
    float_dtype(name, a.dtype)
    if dtype is not None and a.dtype != dtype:
        raise KernelDtypeError(
            f"{name} has dtype {a.dtype} but must match the other inputs ({np.dtype(dtype)}); "
            f"cast with {name}.astype(np.{np.dtype(dtype)})"
        )
    if ndim is not None and a.ndim != ndim:
        raise KernelInputError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return np.ascontiguousarray(a)


def int_array(name: str, a: Any, *, ndim: int = 1) -> np.ndarray:
    """Return ``a`` as a C-contiguous int64 array (labels, indices), or raise."""
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "iu":
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise KernelDtypeError(
            f"{name} must be an integer numpy array, got {got}; cast with {name}.astype(np.int64)"
        )
    if a.ndim != ndim:
        raise KernelInputError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


def in_range(name: str, a: np.ndarray, hi: int) -> None:
    """Raise unless every entry of int64 ``a`` is in ``[0, hi)``. One pass: viewed as
    unsigned, a negative entry is above any ``hi`` (``min()`` and ``max()`` were two
    passes: 3.4M labels 1.30 -> 0.65 ms, 7% of a 10-class softmax call)."""
    if a.size and int(a.view(np.uint64).max()) >= hi:
        raise KernelInputError(f"{name} must be in [0, {hi}), got values in [{a.min()}, {a.max()}]")


def shape_is(name: str, a: np.ndarray, shape: tuple[int, ...]) -> None:
    """Raise unless ``a.shape == shape``."""
    if a.shape != tuple(shape):
        raise KernelInputError(f"{name} must have shape {tuple(shape)}, got {a.shape}")


def positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int >= 1, or raise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise KernelInputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def finite_float(name: str, value: Any, *, low: float | None = None) -> float:
    """Return ``value`` as a finite float (optionally >= low), or raise."""
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise KernelInputError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(out) or (low is not None and out < low):
        bound = f" and >= {low}" if low is not None else ""
        raise KernelInputError(f"{name} must be finite{bound}, got {value!r}")
    return out


def writable_target(name: str, a: np.ndarray, like: np.ndarray) -> None:
    """Raise unless ``a`` can be updated in place (same shape/dtype as ``like``, writable)."""
    if not isinstance(a, np.ndarray) or a.dtype != like.dtype:
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise KernelDtypeError(f"{name} must be a {like.dtype} array like params, got {got}")
    shape_is(name, a, like.shape)
    if not a.flags.writeable:
        raise KernelInputError(f"{name} is read-only; pass a writable array (np.array(x))")


@jit()
def data_address(a):
    """The address of ``a``'s first element: 0.25 us from Python, against 1.6-2.4 for
    ``a.ctypes.data`` or ``a.__array_interface__``, which build objects each time."""
    return a.ctypes.data


# A new output of this many bytes or more with ``apart_from`` is placed half a page (4 KiB)
# from that input's data (see ``empty_aligned``); smaller ones are not streamed out and
# keep the 64 extra bytes.
APART_MIN_BYTES = 1 << 20
PAGE = 4096  # bytes: addresses that agree modulo this look alike to a store's later loads
# New outputs smaller than this are not placed (``out_array``). Layer norm and GELU, 8-1024
# rows of 256, into an output 16 bytes off a cache line against an aligned one, Zen 2
# host: 0.98-1.03x the time (float32 1024 rows, 1 MiB: 1.03x, 1.7 of the 2.4 us saved).
ALIGN_MIN_BYTES = 1 << 20


def empty_aligned(shape: Any, dtype: Any = np.float64, *, like: np.ndarray | None = None,
                  apart_from: np.ndarray | None = None) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose data starts on a 64-byte boundary (a cache line),
    or, with ``like``, at the same offset within a cache line as ``like``'s data.

    Kernels stream large outputs out with non-temporal stores, which need 64-byte aligned
    addresses; NumPy's own allocations are only 16-byte aligned. Row kernels (layer norm)
    want the output rows aligned; elementwise kernels (float64 GELU) align their blocks
    to the output, so an output at the input's offset makes every load aligned too
    (measured: float64 bias + GELU backward 47.6 GB/s with the output at the inputs'
    offset, 35.2 with it aligned and the inputs not). The kernels allocate their outputs
    this way from 1 MiB (``out_array``); pass such a buffer as ``out=`` to get the same
    speed.

    ``apart_from``: the input a kernel reads as it writes this output. A large output
    (``APART_MIN_BYTES``) then starts about half a page (2048-2111 bytes, modulo 4 KiB)
    past that input's data. Where the output's address modulo 4 KiB ran a little ahead
    of the input's, the non-temporal stores made the later loads wait (addresses that
    agree in their low 12 bits look alike to the CPU until the store is done): on the
    Zen 2 host (2026-12-04) float32 GELU took 49 ms at 16-48 bytes ahead, 26 at 64-80
    and 18-19 from 96 on or behind; layer norm forward, float32 256 features, 15.4 ms
    at 48 bytes (an output from this function beside a NumPy array), 11.2 at 176, 8.1
    at 2096. Plain stores did not care."""
    dt = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    elif type(shape) is not tuple:  # (an array's own .shape is taken as it is: 0.5 us)
        shape = tuple(map(int, shape))
    nbytes = math.prod(shape) * dt.itemsize
    want, period = (0 if like is None else data_address(like)), 64
    if apart_from is not None and nbytes >= APART_MIN_BYTES:
        src = data_address(apart_from)
        # at want's offset in a cache line (2048 is a multiple of 64), half a page on;
        # the pages before it are never touched
        want, period = src + PAGE // 2 + (want - src) % 64, PAGE
    raw = np.empty(nbytes + period, np.uint8)
    # one constructor, not a slice, a view and a reshape: the call went 7 -> 2 us
    return np.ndarray(shape, dt, raw, (want - data_address(raw)) % period)


def empty_placed(like: np.ndarray, offset: int, period: int) -> np.ndarray:
    """An uninitialised C buffer of ``like``'s shape and dtype starting ``offset`` bytes
    past ``like``'s data modulo ``period`` (``offset`` a multiple of 64 keeps ``like``'s
    offset in a cache line). It is carved from ``nbytes + period`` of address space; the
    part before it is never touched, so never mapped (see ``kernels.optim``)."""
    nb = like.nbytes
    raw = np.empty(nb + period, np.uint8)
    skip = (data_address(like) + offset - data_address(raw)) % period
    return raw[skip:skip + nb].view(like.dtype).reshape(like.shape)


def _streamed_from() -> int:
    """``kernels._simd.NT_MIN_BYTES``, read there at each call (tests lower it; that module
    imports this one, so not the other way round); 0, every output placed, before it
    has loaded."""
    simd = sys.modules.get("kernels._simd")
    return simd.NT_MIN_BYTES if simd is not None else 0


def out_array(name: str, out: Any, shape: tuple[int, ...], dtype: Any,
              like: np.ndarray | None = None,
              apart_from: np.ndarray | None = None) -> np.ndarray:
    """A caller's output buffer (checked), or a new one when ``out`` is None: 64-byte
    aligned, or at ``like``'s offset in a cache line, and if large half a page from
    ``apart_from`` (``empty_aligned``). A new output under ``ALIGN_MIN_BYTES`` that no
    kernel streams out (``kernels._simd.NT_MIN_BYTES``, read from there as tests lower
    it) is a plain ``np.empty``: placing it cost 2.4 us a call (Zen 2 host) and saved at
    most 1-3% of a kernel's time under 1 MiB.

    Passing buffers that are reused across calls avoids the page faults of a fresh large
    allocation, which cost as much as the kernel itself on memory-bound kernels.
    """
    if out is None:
        dt = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        if nbytes < ALIGN_MIN_BYTES and nbytes < _streamed_from():
            return np.empty(shape, dt)
        return empty_aligned(shape, dt, like=like, apart_from=apart_from)
    if not isinstance(out, np.ndarray) or out.dtype != np.dtype(dtype):
        got = out.dtype if isinstance(out, np.ndarray) else type(out).__name__
        raise KernelDtypeError(f"{name} must be a {np.dtype(dtype)} array, got {got}")
    shape_is(name, out, tuple(shape))
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise KernelInputError(f"{name} must be C-contiguous and writable (np.empty(shape))")
    return out
