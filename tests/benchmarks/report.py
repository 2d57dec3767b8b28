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


def replace_section(path: str | Path, heading: str, lines: list[str]) -> None:
    """Write ``lines`` (starting with ``heading``, a ``## `` line) into the Markdown file
    ``path`` in place of its section of that heading, up to the next ``## `` heading, or
    append them when the file has no such section; the rest of the file is kept."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    block = "\n".join(lines) + "\n"
    if heading in text:
        head, rest = text.split(heading, 1)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        text = head + block + tail
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block
    path.write_text(text)
