"""Numba-compiled kernels and the reference AI workloads that use them.

Importing ``kernels`` is cheap: numba is imported only when a kernel module
(``kernels.optim``, ``kernels.nn``, ...) is first used, so the gateway and its CLI can
import this package without paying for the JIT.

Modules:
    kernels.optim     fused AdamW step
    kernels.nn        softmax + cross-entropy, layer norm, GELU, bias + activation
    kernels.fused     bias + GELU + layer norm as one kernel each way
    kernels.cluster   k-means assignment and centroid update
    kernels.search    top-k cosine similarity search
    kernels.quant     int8 symmetric per-channel quantize / dequantize
    kernels.compress  top-k gradient sparsification with error feedback
    kernels.data      take_rows(): mini-batch rows gathered on every core
    kernels.dask      the k-means and search kernels on dask arrays
    kernels.threads   blas_threads(): NumPy's BLAS pinned while kernels run
    kernels.gemm      matmul(): NumPy's BLAS products split over Numba's threads
    kernels.memory    freed heap blocks up to 32 MiB kept by default (keep_heap_blocks);
                      keep_freed_memory(): every freed block kept for the next array
    kernels.apps.*    reference workloads (``python -m kernels.apps.train`` ...)
"""

from __future__ import annotations

from typing import Any

from kernels.errors import KernelError, KernelInputError

__all__ = ["KernelError", "KernelInputError", "blas_threads", "empty_aligned",
           "keep_freed_memory", "release_freed_memory"]


def __getattr__(name: str) -> Any:
    # ``kernels.empty_aligned`` loads NumPy on first use, so ``import kernels`` stays cheap
    if name == "empty_aligned":
        from kernels._checks import empty_aligned

        return empty_aligned
    if name == "blas_threads":  # NumPy's BLAS pinned while kernels run (kernels.threads)
        from kernels.threads import blas_threads

        return blas_threads
    if name in ("keep_freed_memory", "release_freed_memory"):  # glibc's mallopt (memory)
        from kernels import memory

        return getattr(memory, name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
