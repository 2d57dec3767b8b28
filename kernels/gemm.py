"""Matrix products on Numba's threads: :func:`matmul`.

A loop that alternates matrix products with the parallel kernels (a training step) has
two thread pools to feed: NumPy's BLAS and Numba's. Both spin after each call, so run
threaded side by side they take each other's cores for milliseconds at a time
(``kernels.threads``), and the reference apps pin BLAS to one thread instead, which
leaves the products on one core. :func:`matmul` runs a product on Numba's pool: a
parallel kernel splits the output into one block of rows (or columns) per thread, and
each thread calls NumPy's own BLAS (``cblas_?gemm``, found through threadpoolctl, taken
at its address) on its block with BLAS pinned to one thread for the call
(:func:`one_thread`; the count is put back after). The products then use every core,
BLAS's own pool never wakes, and the only threads spinning between calls are the ones
the next kernel uses: no ``kernels.blas_threads()`` is needed around a loop whose
products all go through :func:`matmul`.

It is the same BLAS and the same arithmetic per output element as ``a @ b`` (each element
is one dot product computed by one ``gemm`` call), so results are equal to NumPy's up
to the order BLAS sums in. A product under ``SPLIT_MIN_FLOPS`` is one BLAS call on the
calling thread (BLAS pinned to one thread for it); an operand that is neither
C-contiguous nor the transpose of a C-contiguous, aligned array is copied first. Where
it cannot run this way at all it simply calls ``np.matmul``: BLAS not NumPy's OpenBLAS
with 64-bit integers (the ``cblas_?gemm64_`` symbols), or one Numba thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from kernels import _checks
from kernels._checks import data_address
from kernels._jit import intrinsic, jit, num_threads, prange, types
from kernels.errors import KernelInputError

__all__ = ["SPLIT_MIN_FLOPS", "matmul", "split_available"]

# below this many flops (2 m n k) one BLAS call on the calling thread is as quick
SPLIT_MIN_FLOPS = 1 << 21
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enum values


@intrinsic
def _gemm_call(typingctx, fn, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Call the ``cblas_?gemm64_`` at address ``fn`` (row-major; every integer and
    address passed as a 64-bit integer, ``alpha``/``beta`` as the operands' float type).
    The address is an argument, not a global, so the kernels that call this cache."""
    from llvmlite import ir

    ints = (fn, ta, tb, m, n, k, a, lda, b, ldb, c, ldc)
    if not (all(isinstance(t, types.Integer) for t in ints)
            and alpha in (types.float32, types.float64) and beta == alpha):
        return None
    sig = types.void(fn, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        ft = context.get_value_type(sig.args[6])
        vals = [context.cast(builder, v, t, types.int64) if t != sig.args[6] else v
                for v, t in zip(args, sig.args)]
        fty = ir.FunctionType(ir.VoidType(), [i64] * 6 + [ft] + [i64] * 4 + [ft] + [i64] * 2)
        ptr = builder.inttoptr(vals[0], fty.as_pointer())
        builder.call(ptr, [ir.Constant(i64, _ROW_MAJOR)] + vals[1:])
        return context.get_dummy_value()

    return sig, codegen


@jit(parallel=True)
def _gemm_split(fn, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, rows, nparts,
                item):
    """``c = alpha a b + beta c`` as ``nparts`` BLAS calls, one per thread: blocks of ``c``'s rows
    (``rows``) or columns. Addresses are byte addresses of the first elements."""
    for p in prange(nparts):
        if rows:
            lo = m * p // nparts
            hi = m * (p + 1) // nparts
            ao = a + (lo if ta == _TRANS else lo * lda) * item
            _gemm_call(fn, ta, tb, hi - lo, n, k, alpha, ao, lda, b, ldb, beta,
                       c + lo * ldc * item, ldc)
        else:
            lo = n * p // nparts
            hi = n * (p + 1) // nparts
            bo = b + (lo * ldb if tb == _TRANS else lo) * item
            _gemm_call(fn, ta, tb, m, hi - lo, k, alpha, a, lda, bo, ldb, beta,
                       c + lo * item, ldc)


class _Blas:
    """NumPy's OpenBLAS, if it has 64-bit-integer CBLAS entry points: the addresses of
    ``cblas_sgemm64_`` / ``cblas_dgemm64_`` and its thread-count getter and setter."""

    def __init__(self, lib: ctypes.CDLL, prefix: str) -> None:
        self.gemm = {
            np.dtype(np.float32): ctypes.cast(getattr(lib, f"{prefix}cblas_sgemm64_"),
                                              ctypes.c_void_p).value,
            np.dtype(np.float64): ctypes.cast(getattr(lib, f"{prefix}cblas_dgemm64_"),
                                              ctypes.c_void_p).value,
        }
        self.threads = getattr(lib, f"{prefix}openblas_get_num_threads64_")
        self.threads.restype = ctypes.c_int
        self.threads.argtypes = []
        self.set_threads = getattr(lib, f"{prefix}openblas_set_num_threads64_")
        self.set_threads.restype = None
        self.set_threads.argtypes = [ctypes.c_int]


_PIN_LOCK = threading.Lock()
_PIN = [0, 1]  # calls inside one_thread(), and the count to put back when the last leaves


@contextlib.contextmanager
def one_thread(blas: _Blas) -> Iterator[None]:
    """NumPy's OpenBLAS on one thread (each call runs on its caller's thread) while any
    thread is inside; the first in saves the count, the last out puts it back. Direct
    calls (0.3 us for the pair), not threadpoolctl: its limit costs 8 us, and with
    OpenBLAS's own thread pool it changes the count from one Python thread only (the
    first that set it while a limit is held; from any other, such as a Dask worker's
    while the main thread holds a limit, it does nothing)."""
    with _PIN_LOCK:
        if _PIN[0] == 0:
            _PIN[1] = blas.threads()
            if _PIN[1] != 1:
                blas.set_threads(1)
        _PIN[0] += 1
    try:
        yield
    finally:
        with _PIN_LOCK:
            _PIN[0] -= 1
            if _PIN[0] == 0 and _PIN[1] != 1:
                blas.set_threads(_PIN[1])


_FOUND: list[_Blas | None] = []
_LOCK = threading.Lock()


def _numpy_blas() -> _Blas | None:
    """NumPy's OpenBLAS (found once, through threadpoolctl), or None."""
    if not _FOUND:
        with _LOCK:
            if not _FOUND:
                _FOUND.append(_find())
    return _FOUND[0]


def _find() -> _Blas | None:
    from kernels.threads import _controller

    for lib in _controller().lib_controllers:
        info = lib.info()
        path = info.get("filepath") or ""
        if info.get("internal_api") != "openblas" or "numpy" not in path:
            continue
        try:
            cdll = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            try:
                return _Blas(cdll, prefix)
            except AttributeError:
                continue
    return None


def split_available() -> bool:
    """Whether :func:`matmul` can split products over Numba's threads in this process
    (NumPy's BLAS has the entry points it needs); it still falls back to ``np.matmul``
    call by call where BLAS may use more than one thread (see the module docstring)."""
    return _numpy_blas() is not None


def _layout(x: np.ndarray) -> tuple[int, int] | None:
    """``(CBLAS transpose flag, leading dimension)`` of a 2-D operand that is C-contiguous
    or the transpose of a C-contiguous array, and aligned; None otherwise."""
    item = x.itemsize
    r, c = x.shape
    if not x.flags.aligned:
        return None
    if x.strides[1] == item and (r == 1 or x.strides[0] == c * item):
        return _NO_TRANS, max(c, 1)
    if x.strides[0] == item and (c == 1 or x.strides[1] == r * item):
        return _TRANS, max(r, 1)
    return None


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a @ b`` for 2-D float32/float64 arrays of one dtype, into ``out`` if given
    (C-contiguous, shape ``(a.shape[0], b.shape[1])``, not overlapping ``a`` or ``b``),
    computed by NumPy's BLAS on Numba's threads (module docstring). Use it for the
    products of a loop that also calls the kernels::

        for x, y in batches:
            z = matmul(x, w1)                     # BLAS, on every core
            a = kernels.nn.bias_act(z, b1, "gelu")
    """
    a = _operand("a", a)
    b = _operand("b", b, dtype=a.dtype)
    m, k = a.shape
    if b.shape[0] != k:
        raise KernelInputError(f"b has shape {b.shape} but a has shape {a.shape}: b needs "
                               f"{k} rows (a's columns) to multiply")
    n = b.shape[1]
    if out is None:
        out = np.empty((m, n), a.dtype)
    else:
        out = _checks.out_array("out", out, (m, n), a.dtype)
        if any(np.may_share_memory(out, x) and np.shares_memory(out, x) for x in (a, b)):
            raise KernelInputError("out must not overlap a or b; pass a new buffer "
                                   "(or leave out=None)")
    blas = _numpy_blas()
    parts = num_threads()
    if blas is None or parts < 2 or k == 0:
        return np.matmul(a, b, out=out)
    if 2 * m * n * k < SPLIT_MIN_FLOPS:
        # on the calling thread: BLAS's own pool would wake for it, then spin beside the
        # next kernel's threads (a step of the app's model at batch 256, whose three
        # products with the 10 classes are all this small, took 12 ms instead of 0.35)
        with one_thread(blas):
            return np.matmul(a, b, out=out)
    la, lb = _layout(a), _layout(b)
    if la is None:  # a copy costs m k moves against the product's m n k multiply-adds
        a = np.require(a, requirements=["C", "A"])
        la = (_NO_TRANS, max(k, 1))
    if lb is None:
        b = np.require(b, requirements=["C", "A"])
        lb = (_NO_TRANS, max(n, 1))
    rows = m >= n
    parts = min(parts, m if rows else n)
    item = a.itemsize
    with one_thread(blas):
        _gemm_split(blas.gemm[a.dtype], la[0], lb[0], m, n, k, a.dtype.type(1.0),
                    data_address(a), la[1], data_address(b), lb[1], a.dtype.type(0.0),
                    data_address(out), n, rows, parts, item)
    return out


def _operand(name: str, x: Any, dtype: Any = None) -> np.ndarray:
    """A 2-D float32/float64 operand as given (strided views are kept: ``matmul`` takes
    transposed views as they are and hands any other layout to ``np.matmul``)."""
    if not (isinstance(x, np.ndarray) and x.ndim == 2 and x.dtype in _checks.FLOAT_DTYPES
            and (dtype is None or x.dtype == dtype)):
        _checks.float_array(name, x, ndim=2, dtype=dtype)  # raises, naming what is wrong
    return x


def warm(dtype: Any) -> None:
    """Compile (or load from the cache) the split kernel for ``dtype``, whatever this
    process's thread count (``kernels.warmup``'s entry)."""
    blas = _numpy_blas()
    if blas is None:
        return
    a = np.ones((4, 3), dtype)
    b = np.ones((3, 2), dtype)
    out = np.empty((4, 2), dtype)
    with one_thread(blas):
        _gemm_split(blas.gemm[a.dtype], _NO_TRANS, _NO_TRANS, 4, 2, 3, a.dtype.type(1.0),
                    data_address(a), 3, data_address(b), 2, a.dtype.type(0.0),
                    data_address(out), 2, True, 2, a.itemsize)
    if not (out == 3).all():
        raise RuntimeError(f"kernels.gemm: the split product came out wrong: {out}")
