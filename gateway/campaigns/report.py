"""A campaign's results as one table: a row per member with its parameters, its job, and
the scalar fields of any JSON output (metrics.json) flattened into columns."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.attempts import output_paths

if TYPE_CHECKING:
    from gateway.api import Gateway

MAX_JSON_BYTES = 1 << 20


def _metrics(paths: list[Path]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for path in paths:
        if path.suffix != ".json" or not path.exists() or path.stat().st_size > MAX_JSON_BYTES:
            continue
        try:
            data = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
        if isinstance(data, dict):
            for key, value in data.items():
                if isinstance(value, (int, float, str, bool)) or value is None:
                    found[f"{path.stem}.{key}"] = value
    return found


def rows(gw: "Gateway", name: str, params_by_member: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    latest: dict[str, Any] = {}
    for job in gw.store.campaign_jobs(name):
        latest[job.member or job.id] = job
    table = []
    for member, job in sorted(latest.items(), key=lambda kv: kv[1].id):
        paths = output_paths(gw.config.jobs_path, job)
        row: dict[str, Any] = {f"param.{k}": v for k, v in params_by_member.get(member, {}).items()}
        row.update({"member": member, "job": job.id, "state": job.state.value,
                    "cached": bool(job.cached_from), "exit_code": job.exit_code,
                    "runtime_s": round(job.ended_at - job.started_at, 3)
                    if job.ended_at and job.started_at else None,
                    "outputs": ";".join(str(p) for p in paths if p.exists())})
        row.update(_metrics(paths))
        table.append(row)
    return table


def write(table: list[dict[str, Any]], out: Path, fmt: str) -> Path:
    columns: list[str] = []
    for row in table:
        columns += [c for c in row if c not in columns]
    if fmt == "parquet":
        try:
            import pyarrow as pa  # type: ignore[import-not-found]
            import pyarrow.parquet as pq  # type: ignore[import-not-found]
        except ImportError as exc:
            from gateway.errors import ConfigError

            raise ConfigError("--format parquet needs pyarrow: pip install pyarrow") from exc
        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in table]), out)
        return out
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    return out
