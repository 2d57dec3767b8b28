"""The instance catalog: which EC2 types a profile may launch, what they offer and cost.

``match(spec, spot)`` is pure: the types that fit one node of the job, cheapest first (the
first is the choice, the rest are the fallbacks on capacity errors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.backends.base import Capabilities
from gateway.errors import CapabilityError, ConfigError
from gateway.spec import JobSpec

GIB = 1 << 30


class _Gpus(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    count: int = Field(0, ge=0)
    type: str | None = None


class InstanceType(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    vcpus: int = Field(ge=1)
    memory_gib: float = Field(gt=0)
    gpus: _Gpus = _Gpus()
    features: frozenset[str] = frozenset()
    on_demand: float = Field(gt=0, description="USD per hour")
    spot: float | None = Field(None, gt=0, description="USD per hour; None: no spot market")

    def price(self, spot: bool) -> float:
        return self.spot if spot and self.spot is not None else self.on_demand

    def fits(self, spec: JobSpec) -> bool:
        res = spec.resources
        gpus = res.gpus
        return (self.vcpus >= res.tasks_per_node * res.cpus_per_task
                and (res.memory is None or self.memory_gib * GIB >= res.memory)
                and self.gpus.count >= gpus.count
                and (not gpus.count or not gpus.type or gpus.type == self.gpus.type)
                and set(spec.requires) <= self.features)


@dataclass(frozen=True)
class Choice:
    """One way to launch: instance type, market and its hourly price."""

    type: InstanceType
    spot: bool
    observed: float | None = None   # from the spot price history, when the profile asks

    @property
    def price(self) -> float:
        return self.observed if self.observed is not None else self.type.price(self.spot)

    @property
    def source(self) -> str:
        return "spot price history" if self.observed is not None else "catalog"


class Catalog:
    def __init__(self, types: list[InstanceType], source: str = "") -> None:
        self.types = {t.name: t for t in types}
        self.source = source

    def match(self, spec: JobSpec, spot: bool, limit: int = 3) -> list[InstanceType]:
        """Types that fit one node of ``spec``, cheapest first (ties: fewer vCPUs)."""
        fitting = [t for t in self.types.values() if t.fits(spec)]
        if not spec.resources.gpus.count:   # no GPU instance for a CPU job while others fit
            fitting = [t for t in fitting if not t.gpus.count] or fitting
        if not fitting:
            raise CapabilityError(f"no instance type in {self.source or 'the catalog'} fits job "
                                  f"{spec.name!r} ({_needs(spec)})")
        fitting.sort(key=lambda t: (t.price(spot), t.vcpus, t.name))
        return fitting[:limit]

    def launch_plan(self, spec: JobSpec, spot: bool, placements: list[tuple[str | None, str | None]],
                    limit: int = 3) -> list[tuple[Choice, str | None, str | None]]:
        """(choice, zone, subnet) in the order they are tried on capacity errors: another
        type, then another zone, then the same on demand."""
        types = self.match(spec, spot, limit)
        plan = []
        for market in ([True, False] if spot else [False]):
            for zone, subnet in placements:
                plan += [(Choice(t, market), zone, subnet) for t in types
                         if not market or t.spot is not None]
        return plan

    def capabilities(self, *, max_walltime: int, runtimes: frozenset[str],
                     max_nodes: int = 1) -> Capabilities:
        types = list(self.types.values())
        features: set[str] = set().union(*(t.features for t in types)) if types else set()
        return Capabilities(
            max_nodes=max_nodes, max_cpus=max_nodes * max((t.vcpus for t in types), default=0),
            mpi=frozenset({"mpirun"}),
            max_gpus=max((t.gpus.count for t in types), default=0),
            gpu_types=frozenset(t.gpus.type for t in types if t.gpus.type),
            features=frozenset(features), max_walltime=max_walltime, runtimes=runtimes,
            remote_inputs=True)


def _needs(spec: JobSpec) -> str:
    res = spec.resources
    parts = [f"{res.tasks_per_node * res.cpus_per_task} vCPUs"]
    if res.memory:
        parts.append(f"{res.memory / GIB:g} GiB")
    if res.gpus.count:
        parts.append(f"{res.gpus.count} GPU(s){' ' + res.gpus.type if res.gpus.type else ''}")
    if spec.requires:
        parts.append("features " + ", ".join(spec.requires))
    return ", ".join(parts)


def load_catalog(path: str | Path) -> Catalog:
    """Read ``path`` (relative paths start at the packaged configs/ folder)."""
    from gateway.config import packaged_configs

    full = Path(path).expanduser()
    if not full.is_absolute():
        full = packaged_configs() / full
    try:
        data: Any = yaml.safe_load(full.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the instance catalog {full}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("types"), dict):
        raise ConfigError(f"{full}: a catalog is a mapping with `types: {{NAME: {{...}}}}`")
    types = []
    for name, fields in data["types"].items():
        try:
            types.append(InstanceType.model_validate({**(fields or {}), "name": name}))
        except ValidationError as exc:
            lines = [f"  - {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
            raise ConfigError(f"{full}: instance type {name}:\n" + "\n".join(lines)) from None
    return Catalog(types, str(full))
