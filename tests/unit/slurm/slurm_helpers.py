"""Small builders shared by the Slurm unit tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.backends.base import SubmitRequest
from gateway.spec import JobSpec

HOSTILE = ["a 0", "a'; echo foo", "a\n0", "$(rm -rf /)", 'x"y\\z#w', "`id`;|&>*?~%j"]


def make_request(attempt_dir: Path | str, job_id: str = "j1", attempt: int = 0,
                 env: dict[str, str] | None = None, argv: list[str] | None = None,
                 **spec: Any) -> SubmitRequest:
    """A SubmitRequest for a spec given as keyword fields (name/command defaulted)."""
    fields = {"name": "demo", "command": ["echo", "hi"], **spec}
    parsed = JobSpec.model_validate(fields, context={"check_inputs": False})
    return SubmitRequest(job_id=job_id, attempt=attempt, spec=parsed,
                         attempt_dir=Path(attempt_dir),
                         argv=list(argv) if argv is not None else parsed.argv,
                         env=dict(env or {}))
