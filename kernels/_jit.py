"""The one place numba is imported: applies ``kernels.config`` first, then wraps njit."""

from __future__ import annotations

import os
from typing import Callable

from kernels.config import get_config

_CFG = get_config()
if _CFG.cache_dir:
    # numba reads NUMBA_CACHE_DIR when it is imported; set it first, then keep it in
    # sync in case numba was imported earlier by someone else.
    os.makedirs(_CFG.cache_dir, exist_ok=True)
    os.environ["NUMBA_CACHE_DIR"] = _CFG.cache_dir

import numba  # noqa: E402
from numba import prange  # noqa: E402

if _CFG.cache_dir:
    numba.config.CACHE_DIR = _CFG.cache_dir

__all__ = ["jit", "numba", "prange", "num_threads"]


def jit(*, parallel: bool = False) -> Callable:
    """``numba.njit`` with the project's flags (cache, nogil, fast-math, parallel)."""
    return numba.njit(**_CFG.jit_options(parallel=parallel))


def num_threads() -> int:
    """Threads a ``prange`` loop will use (used to size per-thread partial buffers)."""
    return int(numba.get_num_threads())
