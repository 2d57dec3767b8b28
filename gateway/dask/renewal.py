"""Walltime-aware workers: which worker to replace when, as plain bookkeeping (no Dask).

Each worker runs with ``--lifetime`` below its job's walltime, so it retires gracefully
(its tasks and data move to the others) before the backend would kill it. So that the
cluster never shrinks, a replacement is asked for ``renew_after`` seconds after a worker
first connected, i.e. ahead of its retirement. Once the replacement has connected, the old
worker is retired at once (gracefully, through the scheduler); if the replacement is slow,
the old one still retires by its own lifetime and the replacement takes over when it comes.

The cluster calls ``observe``, then ``settle`` and ``due`` on every tick and acts on the
answers; the counts seen by ``scale``/``adapt`` exclude workers being renewed, so a
renewal never looks like a scale-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable


@dataclass
class Renewal:
    renew_after: float                                   # seconds after first connection
    first_seen: dict[str, float] = field(default_factory=dict)
    renewing: dict[str, str] = field(default_factory=dict)   # old worker -> its replacement
    spent: set[str] = field(default_factory=set)         # replacement scaled away: not again

    def observe(self, seen: Iterable[str], now: float) -> None:
        """Note when each worker was first seen connected; forget workers that left
        (a name that comes back later is a new worker)."""
        seen = set(seen)
        for name in seen:
            self.first_seen.setdefault(name, now)
        for name in list(self.first_seen):
            if name not in seen and name not in self.renewing:
                del self.first_seen[name]

    def due(self, live: Iterable[str], now: float) -> list[str]:
        """Connected workers whose replacement should be submitted now."""
        busy = set(self.renewing) | set(self.renewing.values()) | self.spent
        return sorted(n for n in live if n not in busy and n in self.first_seen
                      and now - self.first_seen[n] >= self.renew_after)

    def start(self, old: str, new: str) -> None:
        self.renewing[old] = new

    def settle(self, planned: Iterable[str], seen: Iterable[str]) -> list[str]:
        """Old workers to remove from the plan now: their replacement connected, or they
        already retired by themselves. A renewal whose replacement was scaled away ends,
        and the old worker keeps running until its lifetime."""
        planned, seen = set(planned), set(seen)
        drop = []
        for old, new in list(self.renewing.items()):
            if new not in planned:
                del self.renewing[old]
                self.spent.add(old)
            elif new in seen or old not in seen:
                del self.renewing[old]
                self.first_seen.pop(old, None)
                drop.append(old)
        self.spent &= planned
        return sorted(drop)

    def clear(self) -> None:
        self.renewing.clear()
