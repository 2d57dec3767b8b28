"""Row chunking for kernels that reduce over rows in parallel (per-chunk partial sums)."""

from __future__ import annotations

from kernels._jit import jit, num_threads


@jit()
def chunk_bounds(n, nchunks, c):
    """Half-open row range [lo, hi) of chunk ``c`` when ``n`` rows are split ``nchunks`` ways."""
    return (n * c) // nchunks, (n * (c + 1)) // nchunks


def n_chunks(n_rows: int, *, min_rows: int = 64) -> int:
    """How many chunks to split ``n_rows`` into: a few per thread, none tiny, at least one."""
    return max(1, min(4 * num_threads(), n_rows // min_rows))
