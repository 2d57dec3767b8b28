"""Short, unique, sortable job ids: 8 Crockford-base32 characters of milliseconds since
2024-01-01 followed by 3 random ones (11 characters, e.g. ``0kz3m9q1x7c``).

Sorting ids as strings sorts jobs by creation time; within one process ids are strictly
increasing even within a millisecond. The store's primary key catches the rare clash
between processes and the caller draws again.
"""

from __future__ import annotations

import secrets
import threading
import time

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford: no i, l, o, u
EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
_lock = threading.Lock()
_last = 0


def _encode(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars))


def new_job_id(now_ms: int | None = None) -> str:
    global _last
    with _lock:
        stamp = (now_ms if now_ms is not None else int(time.time() * 1000)) - EPOCH_MS
        stamp = max(stamp, _last + 1) if now_ms is None else stamp
        _last = stamp
    return _encode(stamp, 8) + _encode(secrets.randbelow(32**3), 3)


def looks_like_id(text: str) -> bool:
    return 1 <= len(text) <= 11 and all(c in ALPHABET for c in text)
