"""What the apps share: deterministic synthetic rows, atomic JSON/NPZ writes, timing."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

BLOCK = 4096  # rows per generator block: rows [lo, hi) are the same however they are split


def synthetic_rows(
    seed: int, lo: int, hi: int, make_block: Callable[[np.random.Generator, int], np.ndarray]
) -> np.ndarray:
    """Rows ``lo..hi`` of a dataset built block by block from ``(seed, block)`` streams.

    Any rank can build exactly its shard, and the concatenation over ranks equals the
    one-process dataset, which is what makes 1-rank and N-rank runs comparable.
    """
    parts = []
    for b in range(lo // BLOCK, (hi + BLOCK - 1) // BLOCK):
        rng = np.random.default_rng(np.random.SeedSequence([seed, b]))
        block = make_block(rng, BLOCK)
        start = b * BLOCK
        parts.append(block[max(lo, start) - start: min(hi, start + BLOCK) - start])
    if not parts:
        return make_block(np.random.default_rng(seed), 0)
    return np.concatenate(parts)


def shard(n: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous row range [lo, hi) of ``rank`` out of ``size`` for ``n`` rows."""
    return (n * rank) // size, (n * (rank + 1)) // size


def _atomic_write(path: str, write: Callable[[Any], None], mode: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON via temp file + os.replace (readers never see half a file)."""
    _atomic_write(path, lambda fh: fh.write(json.dumps(data, indent=2, sort_keys=True)), "w")


def write_npz(path: str, **arrays: Any) -> None:
    """Write arrays as .npz via temp file + os.replace."""
    _atomic_write(path, lambda fh: np.savez(fh, **arrays), "wb")
