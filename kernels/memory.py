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

Smaller blocks hit the same faults another way. Once a freed block has raised glibc's
thresholds to its size, blocks of that size come from the heap, but freed memory at the
heap's top over twice that size goes back to the OS at once: a training step that makes
and drops a few 1 MiB arrays faults all of them in again the next step (a step of the
training app's model, batch 4096, hidden 256: 2.8x slower; docs/kernels.md, "Keeping
freed memory"). So by default, when the first kernel module loads, :func:`keep_heap_blocks`
starts the thresholds where glibc's own adjustment ends (blocks up to 32 MiB from the heap,
64 MiB of freed memory kept at its top), unless the environment sets glibc's malloc
itself (:func:`malloc_set_by_environ`) or ``HPCGW_KEEP_FREED_MEMORY=0``.

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
from collections.abc import Mapping

__all__ = ["glibc_tunables", "keep_freed_memory", "keep_heap_blocks", "keeping",
           "malloc_set_by_environ", "release_freed_memory", "worker_environ"]

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1  # mallopt takes a C int
# Where glibc's own adjustment of its thresholds ends on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX,
# and twice that for trimming): keep_heap_blocks starts there
HEAP_MMAP_THRESHOLD = 32 << 20
HEAP_TRIM_THRESHOLD = 2 * HEAP_MMAP_THRESHOLD
# the variables glibc reads for its malloc settings (a launcher's or user's choice)
_MALLOC_VARS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX")

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


def keep_heap_blocks() -> bool:
    """Start glibc's thresholds where its own adjustment ends (the default when the first
    kernel module loads; see the module text): blocks up to 32 MiB come from the heap,
    and up to 64 MiB of freed memory stays at its top. Returns True where applied."""
    libc = _glibc()
    if libc is None:
        return False
    with _lock:
        if _state["keeping"]:  # keep_freed_memory's settings already cover these
            return True
        ok = libc.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD) == 1
        return libc.mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD) == 1 and ok


def malloc_set_by_environ(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment (default ``os.environ``) sets glibc's malloc: a
    ``MALLOC_*_`` variable (Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_`` for its workers)
    or ``glibc.malloc.`` tunables. The kernels leave such a process's settings alone."""
    env = os.environ if environ is None else environ
    return (any(env.get(name) for name in _MALLOC_VARS)
            or "glibc.malloc." in env.get("GLIBC_TUNABLES", ""))


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
