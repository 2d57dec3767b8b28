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


# Rows that need no per-chunk partial sums are split into chunks of at least this many
# elements. Under the 64-row floor above, a call on fewer than 128 rows ran on one
# thread whatever the row length. A/B against that floor (float32, 5 alternated rounds,
# median ratio, softmax + cross-entropy / layer norm): 8 x 32000 1.72x / 1.66x faster,
# 4 x 4096 1.20x / 1.12x, 16 x 1024 1.19x / 1.15x, 64 x 256 1.15x / 1.18x; chunks of
# 2048 elements made 16 x 256 slower (layer norm 0.84x), so 4096.
ROW_CHUNK_ELEMENTS = 4096


def row_chunks(n_rows: int, row_len: int) -> int:
    """``n_chunks`` for kernels whose rows are independent (no per-chunk partial sums
    to add up afterwards): chunks of at least ``ROW_CHUNK_ELEMENTS`` elements. Too few
    rows for two chunks give 1 without asking for the thread count (0.7 -> 0.3 us)."""
    min_rows = max(1, ROW_CHUNK_ELEMENTS // max(row_len, 1))
    if n_rows < 2 * min_rows:
        return 1
    return max(1, min(4 * num_threads(), n_rows // min_rows))  # (n_chunks, one call less)
