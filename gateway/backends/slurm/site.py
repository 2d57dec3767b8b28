"""What a Slurm site offers, read from ONE ``sinfo`` call and turned into Capabilities.

``sinfo`` prints one line per partition and node configuration: partition (``*`` marks the
default), time limit, node count, CPUs and memory per node, features, gres. A partition's
capabilities are the union of its lines; a profile's are the union of its partitions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.backends.base import Capabilities

SEP = "\x1f"
SINFO_ARGV = ["sinfo", "--noheader", "--all",
              f"--format=%P{SEP}%l{SEP}%D{SEP}%c{SEP}%m{SEP}%f{SEP}%G{SEP}%a"]
_GRES = re.compile(r"^gpu(?::([^:(]+))?:(\d+)")


def slurm_limit(text: str) -> int | None:
    """Seconds from sinfo's time limit (``2-00:00:00``, ``1:00:00``, ``30:00``, ``infinite``)."""
    text = text.strip()
    if not text or text.lower() in ("infinite", "unlimited", "n/a"):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if len(parts) == 1:           # minutes
        parts = [0, parts[0], 0]
    while len(parts) < 3:         # MM:SS
        parts.insert(0, 0)
    hours, minutes, seconds = parts
    return (int(days) if days else 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def gpus_of(gres: str) -> dict[str | None, int]:
    """``gpu:a100:4(S:0-1),gpu:2`` -> {"a100": 4, None: 2}; non-GPU gres are ignored."""
    found: dict[str | None, int] = {}
    for item in gres.split(","):
        match = _GRES.match(item.strip())
        if match:
            found[match.group(1)] = found.get(match.group(1), 0) + int(match.group(2))
    return found


@dataclass
class Partition:
    name: str
    default: bool = False
    up: bool = True
    max_time: int | None = None
    nodes: int = 0
    cpus: int = 0                       # all nodes together
    max_gpus: int = 0                   # per node
    gpu_types: set[str] = field(default_factory=set)
    features: set[str] = field(default_factory=set)


def parse_sinfo(text: str) -> dict[str, Partition]:
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        cols = line.split(SEP)
        if len(cols) != 8:
            continue
        name, limit, nodes, cpus, _mem, features, gres, avail = (c.strip() for c in cols)
        default = name.endswith("*")
        name = name.rstrip("*")
        part = parts.setdefault(name, Partition(name, default=default))
        part.up = avail.lower() == "up"
        part.max_time = slurm_limit(limit)
        count, per_node = int(nodes or 0), int(cpus.rstrip("+") or 0)
        part.nodes += count
        part.cpus += count * per_node
        gpus = gpus_of(gres)
        part.max_gpus = max(part.max_gpus, sum(gpus.values()))
        part.gpu_types |= {t for t in gpus if t}
        if features and features != "(null)":
            part.features |= set(features.split(","))
    return parts


def capabilities_of(partitions: Iterable[Partition], *, max_walltime: int | None,
                    runtimes: frozenset[str]) -> Capabilities:
    """Union of partitions, clipped by the profile's own walltime limit."""
    chosen = list(partitions)
    limits = [p.max_time for p in chosen]
    site_limit = None if not chosen or None in limits else max(t for t in limits if t is not None)
    walltime = min((t for t in (site_limit, max_walltime) if t is not None), default=None)
    return Capabilities(
        max_nodes=max((p.nodes for p in chosen), default=0),
        max_cpus=max((p.cpus for p in chosen), default=0),
        max_gpus=max((p.max_gpus for p in chosen), default=0),
        gpu_types=frozenset().union(*(p.gpu_types for p in chosen)),
        features=frozenset().union(*(p.features for p in chosen)),
        max_walltime=walltime, mpi=frozenset({"pmix", "mpirun"}), runtimes=runtimes,
        arrays=True, remote_inputs=False)
