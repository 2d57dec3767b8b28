"""Campaign spec: a job template swept over parameters, applied idempotently from cron.

    campaign: lr-sweep
    template:                       # a job spec; "{{name}}" is replaced by a parameter value
      name: "train-{{lr}}-{{seed}}"
      command: [python3, -m, kernels.apps.train, --lr, "{{lr}}", --seed, "{{seed}}"]
    parameters:
      grid: {lr: [0.1, 0.01], seed: [0, 1, 2]}     # or zip: / list: / file: params.csv|.jsonl
    concurrency: 4
    budget: {core_hours: 10}
    retries: {max: 1, on: [failed, timeout]}
    target: local
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import FieldIssue, SpecError
from gateway.spec import NAME_RE, Retries, load_yaml, parse_spec

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Parameters(_Model):
    """Exactly one way of listing parameter sets."""

    grid: Dict[str, List[Any]] | None = None
    zip: Dict[str, List[Any]] | None = None
    list: tuple[dict[str, Any], ...] | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "Parameters":
        given = [k for k in ("grid", "zip", "list", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of grid, zip, list or file")
        if self.zip is not None and len({len(v) for v in self.zip.values()}) > 1:
            raise ValueError("zip: every list must have the same length")
        return self


class Budget(_Model):
    core_hours: float | None = Field(None, gt=0)
    money: float | None = Field(None, gt=0)


class CampaignSpec(_Model):
    campaign: str = Field(pattern=NAME_RE.pattern)
    template: dict[str, Any]
    parameters: Parameters
    concurrency: int = Field(0, ge=0, le=100000, description="0: no limit")
    budget: Budget = Budget()
    deadline: datetime | None = None
    retries: Retries = Retries(max=0, on=("failed", "timeout", "lost", "node_fail", "preempted"))
    target: str = "local"
    cache: bool = True
    policy: dict[str, Any] = Field(default_factory=dict)


def member_key(params: Mapping[str, Any]) -> str:
    """Stable identity of one parameter set (order of keys does not matter)."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _render(value: Any, params: Mapping[str, Any], path: str) -> Any:
    if isinstance(value, str):
        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in params:
                raise SpecError([FieldIssue(path, f"unknown parameter {{{{{name}}}}}; "
                                 f"parameters are: {', '.join(sorted(params))}")])
            return str(params[name])
        return PLACEHOLDER.sub(sub, value)
    if isinstance(value, list):
        return [_render(v, params, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _render(v, params, f"{path}.{k}") for k, v in value.items()}
    return value


def _read_file(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise SpecError([FieldIssue("parameters.file", f"{path} does not exist; fix the path")])
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            return [dict(row) for row in csv.DictReader(fh)]
    if path.suffix in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SpecError([FieldIssue("parameters.file", f"{path}:{number}: {exc}")]) from None
        return rows
    raise SpecError([FieldIssue("parameters.file", "use a .csv or .jsonl file")])


def expand(spec: CampaignSpec, base_dir: Path) -> list[dict[str, Any]]:
    """All parameter sets, in a stable order; duplicates are refused."""
    p = spec.parameters
    if p.grid is not None:
        names = sorted(p.grid)
        sets = [dict(zip(names, combo)) for combo in itertools.product(*(p.grid[n] for n in names))]
    elif p.zip is not None:
        names = sorted(p.zip)
        sets = [dict(zip(names, combo)) for combo in zip(*(p.zip[n] for n in names))]
    elif p.list is not None:
        sets = [dict(item) for item in p.list]
    else:
        sets = _read_file((base_dir / str(p.file)).resolve())
    keys = [member_key(s) for s in sets]
    if len(set(keys)) != len(keys):
        raise SpecError([FieldIssue("parameters", "the same parameter set appears twice")])
    return sets


def render_member(spec: CampaignSpec, params: Mapping[str, Any], base_dir: Path) -> Any:
    """The JobSpec of one member: template rendered, campaign labels and policy applied."""
    data = _render(dict(spec.template), params, "template")
    key = member_key(params)
    data.setdefault("name", f"{spec.campaign}-{key[:8]}")
    if not NAME_RE.match(str(data["name"])):
        data["name"] = re.sub(r"[^A-Za-z0-9._-]", "-", str(data["name"]))[:63].lstrip("-._") or key
    data.setdefault("target", spec.target)
    labels = dict(data.get("labels") or {})
    labels.update({"hpcgw.campaign": spec.campaign, "hpcgw.member": key})
    data["labels"] = labels
    return parse_spec(data, base_dir=base_dir, source=f"campaign {spec.campaign} member {params}")


def load_campaign(path: str | Path) -> tuple[CampaignSpec, Path]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read campaign file {str(path)!r}: {exc}") from None
    data = load_yaml(text, str(path))
    if not isinstance(data, dict):
        raise SpecError("a campaign file must be a mapping", source=str(path))
    try:
        return CampaignSpec.model_validate(data), path.resolve().parent
    except ValidationError as exc:
        issues = [FieldIssue(".".join(str(p) for p in e["loc"]),
                             "unknown key; valid keys here are: " + ", ".join(sorted(
                                 CampaignSpec.model_fields)) if e["type"] == "extra_forbidden"
                             and len(e["loc"]) == 1 else str(e["msg"]).removeprefix("Value error, "))
                  for e in exc.errors()]
        raise SpecError(issues, source=str(path)) from None


Kind = Literal["submit", "keep", "retry", "replace", "remove", "cached", "refused", "done"]
