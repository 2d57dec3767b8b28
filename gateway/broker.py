"""The broker for ``target: auto``: send each job where its result comes soonest, within
the budget and the user's policy, and record why.

For every candidate backend that can run the job it estimates the time to result:

- Slurm: the expected wait (the backend's ``estimate_wait``: one ``squeue``, a fluid model
  of the partition), corrected by the waits this store saw recently, plus the runtime;
- cloud: boot and image-fetch time (learned from this store's recent cloud jobs, else the
  configured guess) plus the runtime on the matching instance type, and the cost (the
  backend's ``plan``);
- local: zero wait while slots are free, plus the runtime.

The runtime is learned too: the median of earlier successful runs with the same result key,
else of the same campaign, else of the same name, else the walltime (pessimistic). Policy:
``prefer`` a target and leave it only when its wait exceeds ``burst_after_s``; never pick a
target whose estimated cost exceeds ``max_cost``. Every decision, with every estimate,
becomes an event on the job (shown by ``hpcgw show``).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.backends.base import check_capabilities
from gateway.errors import GatewayError
from gateway.states import State

if TYPE_CHECKING:
    from gateway.backends import BackendRegistry
    from gateway.config import Config
    from gateway.store import JobRecord, Store

HISTORY = 50  # recent jobs looked at for learning


@dataclass
class Estimate:
    target: str
    feasible: bool
    wait_s: float = 0.0
    run_s: float = 0.0
    cost: float = 0.0
    why: str = ""
    price_per_hour: float = 0.0

    @property
    def total_s(self) -> float:
        return self.wait_s + self.run_s


@dataclass
class Decision:
    target: str | None
    reason: str
    estimates: list[Estimate] = field(default_factory=list)

    def data(self) -> dict[str, Any]:
        return {"chosen": self.target, "reason": self.reason,
                "estimates": [{**asdict(e), "total_s": round(e.total_s, 1)} for e in self.estimates]}


class Broker:
    def __init__(self, store: "Store", backends: "BackendRegistry", config: "Config"):
        self.store, self.backends, self.config = store, backends, config
        self._memo: dict[tuple[Any, ...], Estimate] = {}  # one pass: one squeue per target

    def new_pass(self) -> None:
        self._memo.clear()

    def candidates(self) -> list[str]:
        conf = self.config.broker
        if conf.targets:
            return list(conf.targets)
        found = [f"slurm:{name}" for name in sorted(self.config.backends.slurm.profiles)]
        found += [f"aws:{name}" for name in sorted(self.config.backends.aws.profiles)]
        return found or ["local"]

    def policy(self, job: "JobRecord") -> dict[str, Any]:
        conf = self.config.broker
        policy = {"prefer": conf.prefer, "burst_after_s": conf.burst_after_s,
                  "max_cost": conf.max_cost}
        campaign = self.store.campaign(job.campaign) if job.campaign else None
        if campaign:
            import json

            policy.update(json.loads(campaign["spec_json"]).get("policy") or {})
        return policy

    def place(self, job: "JobRecord") -> Decision:
        policy = self.policy(job)
        run_s = self.runtime(job)
        estimates = [self.estimate(target, job, run_s) for target in self.candidates()]
        usable = [e for e in estimates if e.feasible and
                  (policy.get("max_cost") is None or e.cost <= float(policy["max_cost"]))]
        if not usable:
            why = "; ".join(f"{e.target}: {e.why}" for e in estimates) or "no candidate backend"
            return Decision(None, f"no backend can run it within the policy ({why})", estimates)
        prefer = policy.get("prefer")
        preferred = next((e for e in usable if e.target == prefer), None)
        burst = float(policy.get("burst_after_s") or 0)
        if preferred is not None and preferred.wait_s <= burst:
            return Decision(preferred.target, f"preferred {prefer}: expected wait "
                            f"{preferred.wait_s:.0f} s is within burst_after_s={burst:.0f}", estimates)
        best = min(usable, key=lambda e: (e.total_s, e.cost))
        head = (f"{prefer} would wait {preferred.wait_s:.0f} s > burst_after_s={burst:.0f}; "
                if preferred is not None and best is not preferred else "")
        return Decision(best.target, f"{head}fastest: {best.target} in ~{best.total_s:.0f} s"
                        f" for ~${best.cost:.4f}", estimates)

    # -- estimates ------------------------------------------------------------------------
    def estimate(self, target: str, job: "JobRecord", run_s: float) -> Estimate:
        res = job.spec.resources
        key = (target, res.total_cpus, res.gpus.count, res.gpus.type, tuple(job.spec.requires),
               job.spec.image, res.walltime, res.memory)
        if key not in self._memo:
            self._memo[key] = self._estimate(target, job, 0.0)
        known = self._memo[key]
        run_cost = known.price_per_hour * run_s / 3600.0
        return Estimate(known.target, known.feasible, known.wait_s, run_s,
                        round(known.cost + run_cost, 6), known.why, known.price_per_hour)

    def _estimate(self, target: str, job: "JobRecord", run_s: float) -> Estimate:
        spec = job.spec
        try:
            backend = self.backends.get(target)
            check_capabilities(backend, spec)
            kind = target.split(":")[0]
            if kind == "slurm":
                wait, why = backend.estimate_wait(spec)  # type: ignore[attr-defined]
                learned = self._recent_waits(target)
                if learned is not None and wait > 0:
                    wait = max(wait, learned)
                return Estimate(target, True, wait, run_s, 0.0, why)
            if kind == "aws":
                plan = backend.plan(spec)  # type: ignore[attr-defined]
                boot = self._recent_waits(target) or self.config.broker.cloud_boot_s
                price = float(plan["price_per_hour"])
                return Estimate(target, True, boot, run_s, round(price * boot / 3600.0, 6),
                                f"{plan['instance_type']} {plan['market']} at ${price}/h, "
                                f"boot ~{boot:.0f} s", price)
            return Estimate(target, True, 0.0, run_s, 0.0, "this machine")
        except GatewayError as exc:
            return Estimate(target, False, why=str(exc).splitlines()[0])
        except (KeyError, ValueError, TypeError) as exc:
            return Estimate(target, False, why=f"cannot estimate: {exc}")

    def runtime(self, job: "JobRecord") -> float:
        """Median runtime of comparable successful jobs, else the walltime."""
        for column, value in (("result_key", job.result_key), ("campaign", job.campaign),
                              ("name", job.name)):
            if not value:
                continue
            rows = self.store.conn.execute(
                f"SELECT started_at, ended_at FROM jobs WHERE {column} = ? AND state = ?"
                " AND started_at IS NOT NULL AND ended_at IS NOT NULL AND cached_from IS NULL"
                " ORDER BY id DESC LIMIT ?", (value, State.SUCCEEDED.value, HISTORY)).fetchall()
            if rows:
                return float(statistics.median(r[1] - r[0] for r in rows))
        return float(job.spec.resources.walltime)

    def _recent_waits(self, target: str) -> float | None:
        """Median (start - submit) of this backend's recent jobs: queue wait or boot time."""
        rows = self.store.conn.execute(
            "SELECT submitted_at, started_at FROM jobs WHERE backend = ? AND started_at IS NOT NULL"
            " AND submitted_at IS NOT NULL ORDER BY id DESC LIMIT ?", (target, HISTORY)).fetchall()
        if len(rows) < 3:
            return None
        return float(statistics.median(max(0.0, r[1] - r[0]) for r in rows))
