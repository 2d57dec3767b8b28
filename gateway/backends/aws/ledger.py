"""Cost: what an instance costs, and a small ledger that lets a budget refuse a launch.

The ledger (``DATA_DIR/aws/<profile>/ledger.json``) holds one entry per launched attempt:
its project, the most it may cost (price x the hours until its expiry) while it runs, and
its actual cost once it ended. A launch is refused when the profile's (or the project's)
spent + reserved + this job's maximum would go over its budget.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from gateway.node import write_json_atomic

MIN_BILLED_S = 60   # EC2 Linux: per-second billing, one minute at least


def instance_cost(price_per_hour: float, seconds: float) -> float:
    return round(price_per_hour * max(MIN_BILLED_S, seconds) / 3600.0, 6)


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                data: dict[str, Any] = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = {}
            before = json.dumps(data, sort_keys=True)
            yield data
            if json.dumps(data, sort_keys=True) != before:
                write_json_atomic(self.path, data, durable=True)
        finally:
            os.close(fd)

    def spent(self, project: str | None = None) -> float:
        """Actual costs of ended attempts plus the maximum of running ones."""
        with self._locked() as data:
            return _total(data, project)

    def reserve(self, key: str, amount: float, project: str | None, budget: float | None,
                project_budget: float | None) -> str | None:
        """Record ``amount`` for ``key`` unless a budget would be exceeded: then the reason."""
        with self._locked() as data:
            if key in data:
                return None
            for limit, scope, proj in ((budget, "the profile", None),
                                       (project_budget, f"project {project!r}", project)):
                if limit is None:
                    continue
                used = _total(data, proj) if proj is None else _total(data, proj, only=True)
                if used + amount > limit:
                    return (f"budget of {scope} would be exceeded: {used:.2f} USD spent or "
                            f"reserved, this job may cost up to {amount:.2f}, limit {limit:.2f}")
            data[key] = {"project": project, "reserved": amount, "actual": None}
            return None

    def settle(self, key: str, actual: float) -> None:
        with self._locked() as data:
            entry = data.setdefault(key, {"project": None, "reserved": actual})
            entry["actual"] = actual

    def entries(self) -> dict[str, Any]:
        with self._locked() as data:
            return dict(data)


def _total(data: dict[str, Any], project: str | None, only: bool = False) -> float:
    total = 0.0
    for entry in data.values():
        if only and entry.get("project") != project:
            continue
        actual = entry.get("actual")
        total += float(actual if actual is not None else entry.get("reserved") or 0.0)
    return total
