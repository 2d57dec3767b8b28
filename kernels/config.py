"""Compile flags and the Numba cache folder, resolved once from the environment.

``HPCGW_NUMBA_CACHE_DIR`` sets where compiled kernels are cached (it becomes
``NUMBA_CACHE_DIR`` before numba is imported), so a container image can ship a warm
cache (``python -m kernels.warmup``) and jobs start without compiling.
``HPCGW_NUMBA_PARALLEL=0`` turns off ``prange`` threading (useful under MPI with one
rank per core). ``HPCGW_NUMBA_FASTMATH=0`` turns off the reassociation flags.
``HPCGW_NUMBA_ROW_HINTS`` (``auto``, ``1`` or ``0``) switches the software prefetch hints
whose worth depends on the CPU (``kernels._prefetch.ROW_HINTS``); ``auto`` turns them on
for Intel CPUs, AMD's family 17h (Zen 2, measured; Zen and Zen+ share its
prefetchers' generation) and family 1Ah (Zen 5), where they were measured to pay, and
off elsewhere (Zen 3 and 4, where they cost).
``HPCGW_KEEP_FREED_MEMORY=1`` makes glibc keep freed blocks for the next large array
(``kernels.memory.keep_freed_memory``, applied when the first kernel module loads);
unset, only blocks up to 32 MiB (``kernels.memory.keep_heap_blocks``, unless the
environment sets glibc's malloc itself); ``0`` leaves glibc's settings as they are.

Numba's thread pool follows ``OMP_NUM_THREADS`` where ``NUMBA_NUM_THREADS`` is not set
(:func:`threads_from_omp`; it is an OpenMP pool, and numba itself reads only its own
variable): Dask's nanny starts its workers with ``OMP_NUM_THREADS=1``, one library thread
per task thread, and the kernels in their tasks then keep to that.

This module does not import numba: ``kernels._jit`` applies the config and then does.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from kernels.errors import KernelConfigError

# Fast-math flags that let LLVM vectorise reductions and contract into FMAs, but keep
# NaN/inf semantics ('nnan'/'ninf' are left out so NaN inputs still propagate).
FASTMATH_FLAGS = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

# The folders kernels._jit resolves under a base (src-<sources hash>-p<0|1>f<0|1>h<0|1>).
# It exports its folder as NUMBA_CACHE_DIR (numba reads that): a child process that finds
# one there (an MPI rank, a warm-up worker, a job whose environment kept it) takes its
# base, so it resolves the same folder instead of caching in a sub-folder of it
OWN_FOLDER = re.compile(r"^src-[0-9a-f]{16}-p[01]f[01]h[01]$")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class KernelConfig:
    """How kernels are compiled: cache folder, threading and fast-math."""

    cache_dir: str | None = None
    parallel: bool = True
    fastmath: bool = True
    row_hints: bool = False
    keep_freed_memory: bool = False
    keep_heap_blocks: bool = True

    def jit_options(self, *, parallel: bool = False) -> dict[str, object]:
        """Keyword arguments for ``numba.njit`` for one kernel."""
        return {
            "cache": True,
            "nogil": True,
            "error_model": "numpy",
            "fastmath": set(FASTMATH_FLAGS) if self.fastmath else False,
            "parallel": bool(parallel and self.parallel),
        }


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise KernelConfigError(f"{name}={raw!r} is not a boolean; use one of 0/1/true/false")


@functools.cache
def cpu_field(key: str) -> str:
    """A field of the first CPU in ``/proc/cpuinfo`` (``vendor_id``, ``model name``), or
    "" where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``), or ""."""
    return cpu_field("vendor_id")


def _cpu_family() -> int:
    """The CPU's family number (AMD: 23 for Zen to Zen 2, 25 for Zen 3 and 4), or -1."""
    try:
        return int(cpu_field("cpu family"))
    except ValueError:
        return -1


def intel_host() -> bool:
    """An Intel CPU (``vendor_id`` GenuineIntel)."""
    return _cpu_vendor() == "GenuineIntel"


def _amd_family(family: int) -> bool:
    """An AMD CPU of this family number."""
    return _cpu_vendor() == "AuthenticAMD" and _cpu_family() == family


def zen2_host() -> bool:
    """An AMD family 17h CPU (Zen 2, measured; Zen and Zen+ share the family)."""
    return _amd_family(0x17)


def zen5_host() -> bool:
    """An AMD family 1Ah CPU (Zen 5)."""
    return _amd_family(0x1A)


def _hints_pay_here() -> bool:
    """Whether this host's CPU is one where the row hints were measured to pay: Intel;
    AMD family 17h (the Zen 2 host, 2026-12-04: from memory, without the hints over
    with them, quantisation 1.16-1.34x, the vector search scan 1.15-1.29x, layer norm
    forward at 256 features 1.16-1.33x, the streamed float64 softmax rows 1.08x, though
    since 2026-12-05 softmax rows are not streamed there, ``kernels.nn``; its own new
    outputs written plainly, as on Intel hosts, dequantisation 1.19x); and AMD family
    1Ah (a Zen 5 host, 2026-12-07, ``bench_prefetch.py`` from memory, per-round ratio
    without / with: the vector search scan 1.61-1.81x, bias + ReLU into streamed outputs
    1.11-1.74x, quantisation 1.07-1.16x, GELU's backward 1.09-1.22x, float32 AdamW
    1.10x). Not Zen 3 and 4 (family 19h: the Zen 4 host measured the quantisation hint
    at 0.79-0.89)."""
    return intel_host() or zen2_host() or zen5_host()


def _row_hints(env: Mapping[str, str]) -> bool:
    """``HPCGW_NUMBA_ROW_HINTS``: ``auto`` (or unset) means on for a host that numba
    compiles for where they pay (``_hints_pay_here``; not for a named
    ``NUMBA_CPU_NAME`` target, as a portable cache has: that keeps the hints off)."""
    raw = (env.get("HPCGW_NUMBA_ROW_HINTS") or "auto").strip().lower()
    if raw == "auto":
        target = (env.get("NUMBA_CPU_NAME") or "host").strip().lower()
        return target == "host" and _hints_pay_here()
    if raw in _TRUE or raw in _FALSE:
        return raw in _TRUE
    raise KernelConfigError(
        f"HPCGW_NUMBA_ROW_HINTS={env.get('HPCGW_NUMBA_ROW_HINTS')!r} is not valid; "
        "use auto, 1 or 0")


def threads_from_omp(env: Mapping[str, str] | None = None) -> str | None:
    """The ``NUMBA_NUM_THREADS`` to set before numba is imported: ``OMP_NUM_THREADS`` when
    it is a positive whole number and ``NUMBA_NUM_THREADS`` is not set, else None (a
    list such as ``4,2`` is OpenMP's nesting syntax and is left to OpenMP)."""
    env = os.environ if env is None else env
    if env.get("NUMBA_NUM_THREADS"):
        return None
    omp = env.get("OMP_NUM_THREADS", "").strip()
    return omp if omp.isdigit() and int(omp) >= 1 else None


def load_config(env: Mapping[str, str] | None = None) -> KernelConfig:
    """Resolve the config from ``env`` (default ``os.environ``) without side effects."""
    env = os.environ if env is None else env
    numba_dir = env.get("NUMBA_CACHE_DIR")
    if numba_dir and OWN_FOLDER.match(os.path.basename(os.path.normpath(numba_dir))):
        # a folder kernels._jit resolved and exported (a parent process's): its base
        numba_dir = os.path.dirname(os.path.normpath(numba_dir))
    cache_dir = env.get("HPCGW_NUMBA_CACHE_DIR") or numba_dir or None
    return KernelConfig(
        cache_dir=os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else None,
        parallel=_flag(env, "HPCGW_NUMBA_PARALLEL", True),
        fastmath=_flag(env, "HPCGW_NUMBA_FASTMATH", True),
        row_hints=_row_hints(env),
        keep_freed_memory=_flag(env, "HPCGW_KEEP_FREED_MEMORY", False),
        keep_heap_blocks=_flag(env, "HPCGW_KEEP_FREED_MEMORY", True),
    )


_CONFIG: KernelConfig | None = None


def get_config() -> KernelConfig:
    """The process-wide config, resolved on first use and then fixed."""
    global _CONFIG
    if _CONFIG is None:
        _CONFIG = load_config()
    return _CONFIG
