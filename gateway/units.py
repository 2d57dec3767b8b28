"""Strict parsers for walltimes and memory sizes.

Walltime: ``HH:MM:SS``, ``D-HH:MM:SS`` (Slurm's form) or a sum of ``<int><unit>`` parts with
units ``s m h d`` (``90m``, ``1h30m``, ``2d``). A bare number is refused: is it seconds or
minutes? Memory: ``<number><unit>`` with ``K M G T`` (optionally ``i``/``B``), all binary
powers as Slurm reads them (``4G`` = 4 GiB). A bare number is refused for the same reason.
"""

from __future__ import annotations

import re

_CLOCK = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)$")
_PARTS = re.compile(r"(\d+)([smhd])")
_PARTS_FULL = re.compile(r"^(?:\d+[smhd])+$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

_MEM = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT])(?:i?B)?$", re.IGNORECASE)
_MEM_POW = {"K": 1, "M": 2, "G": 3, "T": 4}

WALLTIME_HELP = "write it as HH:MM:SS (e.g. 01:30:00), D-HH:MM:SS, or with units like 90m, 1h30m, 2d"
MEMORY_HELP = "write it as a number with a unit, e.g. 512M, 4G, 1.5T (binary units, as Slurm reads them)"


def parse_walltime(value: object) -> int:
    """Return a walltime in whole seconds; raise ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a walltime; {WALLTIME_HELP}")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str):
        text = value.strip().lower()
        clock = _CLOCK.match(text)
        if clock:
            days, hours, minutes, secs = (int(g) if g else 0 for g in clock.groups())
            seconds = days * 86400 + hours * 3600 + minutes * 60 + secs
        elif _PARTS_FULL.match(text):
            seconds = sum(int(n) * _UNIT_S[u] for n, u in _PARTS.findall(text))
        else:
            raise ValueError(f"cannot read walltime {value!r}; {WALLTIME_HELP}")
    else:
        raise ValueError(f"{value!r} is not a walltime; {WALLTIME_HELP}")
    if seconds <= 0:
        raise ValueError(f"walltime must be positive, got {value!r}")
    if seconds > 366 * 86400:
        raise ValueError(f"walltime {value!r} is over a year; ask for at most 365d")
    return seconds


def format_walltime(seconds: int) -> str:
    """Slurm's ``D-HH:MM:SS`` / ``HH:MM:SS`` form."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock


def parse_memory(value: object) -> int:
    """Return a memory size in bytes; raise ValueError with the accepted forms."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"{value!r} is not a memory size; {MEMORY_HELP}")
    match = _MEM.match(value.strip())
    if not match:
        raise ValueError(f"cannot read memory {value!r}; {MEMORY_HELP}")
    number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * 1024 ** _MEM_POW[unit])
    if size < 1024 * 1024:
        raise ValueError(f"memory {value!r} is under 1M; {MEMORY_HELP}")
    if size > 64 * 1024**4:
        raise ValueError(f"memory {value!r} is over 64T per node; that is surely a typo")
    return size


def format_memory(size: int) -> str:
    """Largest binary unit that divides the size exactly (Slurm's form: ``4G``, ``1536M``)."""
    for unit, power in (("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        if size % (1024**power) == 0:
            return f"{size // 1024**power}{unit}"
    return f"{max(1, size // 1024)}K"
