"""Spot prices from the API: ``describe_spot_price_history``, at most one call per period.

When the profile says ``spot_history: true``, the catalog's typical spot prices are
replaced by the current ones AWS reports per type and zone (one call for all of the
catalog's spot types, kept ``spot_history_ttl_s`` seconds, so a reconciler pass makes at
most one). The refined price orders nothing (the launch order stays the catalog's) but it is
what the dry-run shows, what the budget reserves and what the ``hpcgw:price`` tag records,
so the cost of an attempt follows it. A failed call is logged and the catalog's prices are
used until the period ends.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from gateway.backends.aws.catalog import Choice
from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.backends.aws.backend import AwsBackend

log = logging.getLogger(__name__)
Option = tuple[Choice, "str | None", "str | None"]


class SpotPrices:
    def __init__(self, backend: "AwsBackend") -> None:
        self.b = backend
        self._cache: tuple[float, dict[tuple[str, str], float]] | None = None

    def current(self) -> dict[tuple[str, str], float]:
        """(instance type, zone) -> USD per hour now; {} when not asked or unavailable."""
        p = self.b.profile
        if not p.spot_history:
            return {}
        now = time.monotonic()
        if self._cache is not None and now - self._cache[0] < p.spot_history_ttl_s:
            return self._cache[1]
        types = sorted(t.name for t in self.b.catalog.types.values() if t.spot is not None)
        prices: dict[tuple[str, str], float] = {}
        try:
            answer = self.b.call("ec2", "describe_spot_price_history", InstanceTypes=types,
                                 ProductDescriptions=["Linux/UNIX"],
                                 StartTime=datetime.now(timezone.utc))
            prices = newest(answer.get("SpotPriceHistory", []))
        except GatewayError as exc:
            log.warning("%s: spot price history unavailable, using the catalog: %s", self.b.name, exc)
        self._cache = (now, prices)
        return prices

    def refine(self, options: list[Option]) -> list[Option]:
        """The options with spot prices from the history where it has one."""
        prices = self.current()
        if not prices:
            return options
        out: list[Option] = []
        for choice, zone, subnet in options:
            if choice.spot:
                seen = [v for (t, z), v in prices.items() if t == choice.type.name
                        and (zone is None or z == zone)]
                if seen:   # no zone given: AWS picks one; estimate with the dearest
                    choice = replace(choice, observed=max(seen) if zone is None else seen[0])
            out.append((choice, zone, subnet))
        return out


def newest(history: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """The newest price per (type, zone) of a describe_spot_price_history answer."""
    best: dict[tuple[str, str], tuple[Any, float]] = {}
    for item in history:
        key = (str(item.get("InstanceType")), str(item.get("AvailabilityZone")))
        try:
            price = float(item["SpotPrice"])
        except (KeyError, TypeError, ValueError):
            continue
        stamp = item.get("Timestamp") or 0
        if key not in best or _ts(stamp) >= _ts(best[key][0]):
            best[key] = (stamp, price)
    return {k: v for k, (_, v) in best.items()}


def _ts(value: Any) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value or 0)
