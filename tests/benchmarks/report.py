"""Shared by the benchmark scripts: print results as Markdown tables, save them as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping


def emit(results: Mapping[str, Mapping[str, Any]], out: str | None) -> None:
    for section, values in results.items():
        print(f"\n| {section} | value |\n|---|---|")
        for key, value in values.items():
            print(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
