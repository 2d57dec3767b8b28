"""Sharing the cores between NumPy's BLAS and the kernels.

NumPy's matrix products run on OpenBLAS's thread pool, the parallel kernels on Numba's
OpenMP pool, and both pools keep their threads spinning for a while after each call so
that the next call starts at once (libgomp about 300,000 spins, some milliseconds;
OpenBLAS up to about 0.1 s, yielding the core as it spins). A loop that alternates the
two, such as a training step written with ``x @ w`` and ``kernels.nn`` calls, then runs
each call on cores the other pool's threads still hold, and the operating system hands
the cores back in time slices of milliseconds: the training app's step, written out by
hand, took 36-49 ms per step on 2 cores instead of 1.5-2.2 ms (``tests/benchmarks/
bench_mixed.py``, docs/kernels.md "Mixing NumPy's matrix products with the kernels").

:func:`blas_threads` pins BLAS to one thread for a block of code, as the reference apps
and the k-means GEMM path do: the product then runs on the calling thread, and the
kernels keep every core. It uses threadpoolctl (a dependency), which finds the BLAS
libraries loaded in the process at its first use (NumPy's OpenBLAS, or MKL).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

_CONTROLLER: list[Any] = []  # the threadpoolctl controller and len(sys.modules) then


def _controller() -> Any:
    """A threadpoolctl ``ThreadpoolController``, made again only when modules were
    imported since the last one: building one scans the loaded libraries (a few
    milliseconds), and a library that brings a BLAS of its own arrives with an import
    (SciPy's OpenBLAS, which a kernel's first compile loads, came after the first scan and
    was left out of ``blas_threads()``). NumPy is imported first, so its BLAS is always
    among them."""
    if not _CONTROLLER or _CONTROLLER[1] != len(sys.modules):
        import numpy  # noqa: F401  (BLAS must be loaded before the scan)
        from threadpoolctl import ThreadpoolController

        ctl = ThreadpoolController()
        _CONTROLLER[:] = [ctl, len(sys.modules)]
    return _CONTROLLER[0]


def blas_threads(limit: int = 1) -> contextlib.AbstractContextManager[Any]:
    """A context that limits the BLAS libraries NumPy uses to ``limit`` threads (default
    1) and restores their previous counts on exit::

        with kernels.blas_threads():
            for x, y in batches:
                z = x @ w1                          # BLAS, on the calling thread
                a = kernels.nn.bias_act(z, b1, "gelu")   # Numba, on every core

    Use it around code that alternates NumPy matrix products with kernel calls; leave
    large products that run alone outside it (they use all cores). Raises
    ``KernelInputError`` for a ``limit`` below 1."""
    from kernels.errors import KernelInputError

    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise KernelInputError(f"limit must be a positive integer (BLAS threads), got {limit!r}")
    return _controller().limit(limits=limit, user_api="blas")
