"""The one place numba is imported: applies ``kernels.config`` first, then wraps njit."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import types as _pytypes
from collections.abc import Callable
from typing import Any
from pathlib import Path

from kernels.config import get_config, threads_from_omp


def source_fingerprint() -> str:
    """Hash of the package's sources. Numba invalidates a cached kernel only when its own
    file changes, not a helper it inlines (``_fastmath``, ``_chunks``), so a configured
    cache folder gets one sub-folder per source version and a stale image cache is never
    loaded."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


_CFG = get_config()
if _CFG.keep_freed_memory:  # before numba starts its threads (they take the main heap)
    from kernels.memory import keep_freed_memory

    keep_freed_memory()
elif _CFG.keep_heap_blocks:
    from kernels.memory import keep_heap_blocks, malloc_set_by_environ

    if not malloc_set_by_environ():
        keep_heap_blocks()
# Numba's cache key ignores compile flags, so the flags are part of the folder name too.
_FLAGS = f"p{int(_CFG.parallel)}f{int(_CFG.fastmath)}h{int(_CFG.row_hints)}"
# Without a configured folder the cache still goes to a fingerprinted folder, next to the
# sources: numba's own key is the timestamp of the kernel's file only, so editing an
# inlined helper (_fastmath, _erf, _simd) would otherwise leave stale machine code.
_DEFAULT_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__", "numba")
CACHE_DIR = os.path.join(_CFG.cache_dir or _DEFAULT_BASE,
                         f"src-{source_fingerprint()}-{_FLAGS}")


def _writable_or_fallback(folder: str, *, warn: bool) -> str:
    """The cache folder, or, when it is absent and cannot be made (a read-only install
    or image whose cache was not warmed for these sources), one under the temp folder,
    so a job compiles once instead of failing (a warning if the folder was configured)."""
    if os.path.isdir(folder):
        return folder
    try:
        os.makedirs(folder, exist_ok=True)
        return folder
    except OSError:
        import tempfile
        import warnings

        fallback = os.path.join(tempfile.gettempdir(), "hpcgw-numba-cache", os.path.basename(folder))
        os.makedirs(fallback, exist_ok=True)
        if warn:
            warnings.warn(f"numba cache folder {folder} cannot be created; using {fallback}",
                          stacklevel=2)
        return fallback


def _prune_default_cache(keep: str) -> None:
    """Drop default-location folders of other source versions (a developer's edits would
    pile them up); a configured folder is left alone (an image may hold several)."""
    import shutil

    prefix = os.path.basename(keep).rsplit("-", 1)[0] + "-"  # src-HASH-, any flags
    try:
        for name in os.listdir(_DEFAULT_BASE):
            if name.startswith("src-") and not name.startswith(prefix):
                shutil.rmtree(os.path.join(_DEFAULT_BASE, name), ignore_errors=True)
    except OSError:
        pass


# numba reads NUMBA_CACHE_DIR when it is imported; set it first, then keep it in sync in
# case numba was imported earlier by someone else.
CACHE_DIR = _writable_or_fallback(CACHE_DIR, warn=bool(_CFG.cache_dir))
if not _CFG.cache_dir:
    _prune_default_cache(CACHE_DIR)
os.environ["NUMBA_CACHE_DIR"] = CACHE_DIR
# numba sizes its pool from NUMBA_NUM_THREADS (kernels.config.threads_from_omp); the
# kernel modules import numba before this one, so its config is set too, below
_OMP_THREADS = threads_from_omp()
if _OMP_THREADS is not None:
    os.environ["NUMBA_NUM_THREADS"] = _OMP_THREADS  # and child processes

import numba
from numba import prange, types
from numba.core.caching import FunctionCache
from numba.np.ufunc import parallel as _parallel
from numba.extending import intrinsic, overload

setattr(numba.config, "CACHE_DIR", CACHE_DIR)  # (not in numba's type hints)
if _OMP_THREADS is not None and not _parallel._is_initialized:  # the pool is not up yet
    setattr(numba.config, "NUMBA_NUM_THREADS", int(_OMP_THREADS))
    _parallel.NUM_THREADS = int(_OMP_THREADS)

__all__ = ["fresh_copy", "intrinsic", "jit", "locked_cache", "num_threads", "numba", "overload",
           "pick_twin", "prange", "serial_twin", "types"]

SERIAL_TWINS = True  # off: calls of one chunk run the parallel kernels too (tests, warm-up)


@contextlib.contextmanager
def _exclusive(path: str):
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block; where
    the file cannot be made or the filesystem has no locks, run the block unlocked (what
    numba does anyway: a read-only cache folder skips the save, see ``Cache.save_overload``)."""
    fd = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # (closing releases the lock)


class _LockedFunctionCache(FunctionCache):
    """numba's per-function cache, its writes serialised across processes.

    numba saves a compiled signature by reading the function's index file, picking the
    first data-file number the index does not list, and writing the index and then the
    data file, with no lock. Two processes that save *different* keys of one function at
    once (float32 and float64 jobs on a cold shared cache, or the same signature from
    two CPU types, since the CPU is part of the key) both read the old index and both
    take number 1: one key is lost from the index, or the index maps a key to the other
    key's machine code, which a later process loads and runs as its own
    (``test_concurrent_saves_of_one_kernel_keep_every_signature``). Here each save
    holds an exclusive ``flock`` on ``<function>.lock`` in the cache folder; loads take
    no lock (a data file is replaced whole, and under the lock a number once given to a
    key stays that key's)."""

    def _save_overload(self, sig, data):
        lock = os.path.join(self._cache_path, self._impl.filename_base + ".lock")
        with _exclusive(lock):
            super()._save_overload(sig, data)


def locked_cache(dispatcher: Any) -> Any:
    """``dispatcher`` (``numba.njit(cache=True)``) with its cache writes serialised
    across processes (``_LockedFunctionCache``)."""
    dispatcher._cache = _LockedFunctionCache(dispatcher.py_func)
    return dispatcher


def jit(*, parallel: bool = False, fastmath: set[str] | None = None,
        inline: bool = False, refcounts: bool = True) -> Callable:
    """``numba.njit`` with the project's flags (cache, nogil, fast-math, parallel).

    ``fastmath`` overrides the flag set for code whose rounding must not be reassociated
    (the bit tricks in ``kernels._fastmath``). ``inline=True`` inlines the function into
    its callers in Numba's IR: LLVM's own inliner may decline a large helper, and a call
    left inside a loop stops that loop from vectorising. ``refcounts=False`` compiles
    without Numba's reference counting (its NRT), for a helper that allocates nothing and
    is called from a hot loop: Numba increments and decrements the count of each array a
    call passes, atomic instructions that cost 4x the work of a small helper
    (``kernels.search._offer``: 43 -> 200 us for 6559 calls, even inlined).
    """
    opts: dict[str, Any] = _CFG.jit_options(parallel=parallel)
    if inline:
        opts["inline"] = "always"
    if not refcounts:
        opts["_nrt"] = False
    opts["cache"] = True
    if fastmath is not None and opts["fastmath"]:
        opts["fastmath"] = set(fastmath)
    return lambda f: locked_cache(numba.njit(**opts)(f))


def serial_twin(kernel: Any) -> Any:
    """``kernel`` (a ``parallel=True`` dispatcher) compiled once more without
    ``parallel``: its ``prange`` loops run as plain loops in the calling thread. A call
    of one chunk pays numba's parallel launch for nothing (1.8 of a 3.8 us call of
    layer norm on 8 x 256 float32: docs/kernels.md, "Small inputs"). The twin is a copy
    of the Python function under another qualified name, so numba caches it in files of
    its own (numba's cache key leaves out the compile flags: one name for both would
    load one's machine code for the other)."""
    f = kernel.py_func
    twin = _pytypes.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial",
                                 f.__defaults__, f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    twin.__module__ = f.__module__
    twin.__doc__ = f"``{f.__name__}`` without ``parallel`` (``kernels._jit.serial_twin``)."
    opts = _own_options(kernel)
    opts.update(parallel=False, cache=True)
    return locked_cache(numba.njit(**opts)(twin))


def _own_options(kernel: Any) -> dict[str, Any]:
    """``kernel``'s options as ``numba.njit`` takes them (its ``targetoptions`` less
    ``nopython``, which ``njit`` warns that it ignores)."""
    return {k: v for k, v in kernel.targetoptions.items() if k != "nopython"}


def fresh_copy(kernel: Any) -> Any:
    """``kernel``'s Python function compiled afresh at its first call, with the kernel's
    own options but no cache: it reads module flags as they are then, and its machine
    code can be inspected (a cached kernel's cannot). It links the functions it calls as
    it finds them then: a kernel whose loop is in a chunk function of its own needs a
    fresh copy of that put in its module first (docs/kernels.md, "Where compile time
    goes")."""
    return numba.njit(**{**_own_options(kernel), "cache": False})(kernel.py_func)


def pick_twin(kernel: Any, twin: Any, nchunks: int) -> Any:
    """``twin`` (``serial_twin(kernel)``) for a call of one chunk, else ``kernel``."""
    return twin if nchunks == 1 and SERIAL_TWINS else kernel


def num_threads() -> int:
    """Threads a ``prange`` loop will use (used to size per-thread partial buffers).

    Once the thread pool is up this reads numba's thread-local count directly, as
    ``numba.get_num_threads()`` does after taking its launch locks: 0.2 us a call instead
    of 1.6, which every kernel call on a small array paid (docs/kernels.md, "Small
    inputs")."""
    get = getattr(_parallel, "_get_num_threads", None) if _parallel._is_initialized else None
    n = get() if get is not None else 0
    return n if n > 0 else int(numba.get_num_threads())
