"""The gateway's one error tree.

    GatewayError                     root: everything the gateway raises on purpose
    ├── SpecError                    a job spec is invalid (carries field path + fix)
    ├── ConfigError                  configuration files or HPCGW_* variables are invalid
    ├── NotFoundError                no job / image / profile with that name
    ├── StoreError                   the durable store cannot be read or written
    │   └── TransitionError          a state change the state machine forbids
    ├── BackendError                 a backend refused or failed an operation
    │   ├── BackendUnavailable       the backend cannot be reached now (retry later)
    │   └── CapabilityError          the backend cannot run this spec (refused up front)
    ├── RuntimeConfigError           a runtime cannot build a command for this spec
    ├── ImageError                   an image recipe is invalid, or an image is damaged
    └── CommandError                 a subprocess failed (argv, returncode, stderr)

Exit codes used by the CLI are attached to the classes (``exit_code``) so the mapping
lives in one place: 2 bad input, 3 not found, 4 backend unavailable, 5 store error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


class GatewayError(Exception):
    """Root of every error the gateway raises deliberately."""

    exit_code = 1


@dataclass(frozen=True)
class FieldIssue:
    """One problem with one field: where it is, what is wrong, how to fix it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(GatewayError):
    """A job spec (or campaign spec) is invalid. Carries one issue per bad field."""

    exit_code = 2

    def __init__(self, issues: Sequence[FieldIssue] | str, *, source: str | None = None):
        if isinstance(issues, str):
            issues = [FieldIssue("", issues)]
        self.issues = list(issues)
        self.source = source
        head = f"invalid job spec{f' in {source}' if source else ''}"
        body = "\n".join(f"  - {issue}" for issue in self.issues)
        super().__init__(f"{head}:\n{body}")


class ConfigError(GatewayError):
    exit_code = 2


class NotFoundError(GatewayError):
    exit_code = 3


class StoreError(GatewayError):
    exit_code = 5


class TransitionError(StoreError):
    def __init__(self, job_id: str, old: str, new: str):
        self.job_id, self.old, self.new = job_id, old, new
        super().__init__(f"job {job_id}: transition {old} -> {new} is not allowed")


class BackendError(GatewayError):
    exit_code = 4


class BackendUnavailable(BackendError):
    """Transient: the backend could not be reached; the caller should back off and retry."""


class CapabilityError(BackendError):
    """The backend cannot run this spec at all; refused before anything is submitted."""

    exit_code = 2


class RuntimeConfigError(GatewayError):
    exit_code = 2


class CommandError(GatewayError):
    """A subprocess exited non-zero or could not start."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-3:] if stderr else []
        super().__init__(
            f"command {self.argv[0]!r} failed (exit {returncode})"
            + (": " + " | ".join(tail) if tail else "")
        )


class ImageError(GatewayError):
    """An image is invalid, damaged (a blob does not match its digest) or cannot be built."""

    exit_code = 2
