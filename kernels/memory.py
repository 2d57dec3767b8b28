"""Keep freed memory for the next large array instead of handing it back to the OS.

glibc's ``malloc`` serves a request above its mmap threshold (128 KiB, rising with use
to at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` when freed.
A kernel's new 100+ MB output therefore starts as pages the OS has not mapped: each
write to a new page stops for a fault, and the OS zeroes the page first, which costs
about one more pass over memory. Call after call, a loop that makes a new output each
time (``y = gelu(x)``, ``np.add(a, b)``) pays this every time: on this project's
machines a fresh 128-256 MiB output made a memory-bound kernel 1.8-2.5x slower than
writing into memory that was already mapped (docs/benchmarks.md, "Keeping freed
memory").

:func:`keep_freed_memory` sets glibc's ``mallopt`` so that large blocks come from the
heap and stay there when freed (``M_MMAP_MAX = 0``), up to ``keep_bytes`` of free memory
at the heap's top (``M_TRIM_THRESHOLD``), and, with ``one_arena``, so that threads
allocate from the same heap (``M_ARENA_MAX = 1``: a thread's own arena cannot hold a
block over 64 MiB and would ``mmap`` it anyway). It is the effect of running under
jemalloc or tcmalloc, which PyTorch's CPU tuning guides recommend for the same reason,
without preloading another allocator. It is process-wide, so it is opt-in: call it, or
set ``HPCGW_KEEP_FREED_MEMORY=1`` and it is applied when the first kernel module loads.

The cost is memory: freed blocks stay in the process (its resident size does not fall
when arrays are dropped) and a heap can fragment, so a process can hold more than it
uses at any moment. :func:`release_freed_memory` gives the free parts back
(``malloc_trim``). Threads that had already allocated before the call keep their own
arenas: call it before starting a thread pool. For a process started elsewhere (a Dask
worker, whose threads exist before any task imports the kernels; a job's script), put
:func:`worker_environ` in its environment (``GLIBC_TUNABLES``): glibc reads it at
start, before any thread. Elsewhere than glibc (musl, macOS) the functions do
nothing and return False.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading

__all__ = ["glibc_tunables", "keep_freed_memory", "keeping", "release_freed_memory",
           "worker_environ"]

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1  # mallopt takes a C int

_lock = threading.Lock()
# started with glibc_tunables()'s settings in its environment: kept from the start
_state = {"keeping": "glibc.malloc.mmap_max=0" in os.environ.get("GLIBC_TUNABLES", "").split(":")}


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``gnu_get_libc_version`` and ``mallopt``)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError elsewhere
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def default_keep_bytes() -> int:
    """An eighth of the physical memory, at least 256 MiB and at most 2 GiB (mallopt's
    limit)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = 8 << 30
    return max(256 << 20, min(_INT_MAX, total // 8))


def _keep_bytes(keep_bytes: int | None) -> int:
    if keep_bytes is None:
        return default_keep_bytes()
    if isinstance(keep_bytes, bool) or not isinstance(keep_bytes, int) or keep_bytes < 0:
        raise ValueError(f"keep_bytes must be a whole number of bytes >= 0, not {keep_bytes!r}")
    return min(keep_bytes, _INT_MAX)


def keep_freed_memory(keep_bytes: int | None = None, *, one_arena: bool = True) -> bool:
    """Make glibc keep freed blocks for later allocations (see the module text).

    ``keep_bytes``: most free memory kept at the top of the heap before the rest goes
    back to the OS (default :func:`default_keep_bytes`; at most 2 GiB). ``one_arena``:
    threads allocate from the main heap too. Returns True where applied (glibc), False
    elsewhere; calling it again only changes ``keep_bytes``."""
    keep_bytes = _keep_bytes(keep_bytes)
    libc = _glibc()
    if libc is None:
        return False
    with _lock:
        ok = libc.mallopt(M_TRIM_THRESHOLD, keep_bytes) == 1
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and ok
        if one_arena:
            ok = libc.mallopt(M_ARENA_MAX, 1) == 1 and ok
        _state["keeping"] = _state["keeping"] or ok
    return ok


def glibc_tunables(keep_bytes: int | None = None) -> str:
    """The same settings as :func:`keep_freed_memory` (with ``one_arena``) as a value for
    the ``GLIBC_TUNABLES`` environment variable of a process to be started (it must be
    there when the process starts: :func:`worker_environ`). Where that process does not
    use glibc the variable is ignored."""
    keep = _keep_bytes(keep_bytes)
    return (f"glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:"
            f"glibc.malloc.trim_threshold={keep}")


def worker_environ(keep_bytes: int | None = None) -> dict[str, str]:
    """The environment a process to be started needs to keep freed memory from its start:
    ``GLIBC_TUNABLES`` (:func:`glibc_tunables`) and ``MALLOC_TRIM_THRESHOLD_``, which
    glibc reads too and which Dask's nanny sets to 64 KiB for its workers (it trims
    freed memory at once), so both say the same. For Dask workers::

        dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v
                         for k, v in worker_environ().items()})
    """
    keep = _keep_bytes(keep_bytes)
    return {"GLIBC_TUNABLES": glibc_tunables(keep), "MALLOC_TRIM_THRESHOLD_": str(keep)}


def keeping() -> bool:
    """Whether :func:`keep_freed_memory` has been applied in this process, or it was
    started with :func:`glibc_tunables`'s settings."""
    return _state["keeping"]


def release_freed_memory() -> bool:
    """Give the heap's free memory back to the OS (``malloc_trim(0)``); True if any was.
    False where the C library is not glibc."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))
