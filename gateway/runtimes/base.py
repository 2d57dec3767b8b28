"""The Runtime seam: turn (spec, image, folders) into the argv that runs a job on a node.

Runtimes are pure functions of their input: no I/O, so they are tested as text and the
same argv can be written into a Slurm script or a cloud instance's user-data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from gateway.spec import JobSpec


@dataclass(frozen=True)
class RunContext:
    """Where things are on the node for one attempt."""

    work_dir: str                      # host path of the working folder
    attempt_dir: str                   # host path of the attempt folder
    image_path: str | None = None      # unpacked image / archive, for directory runtimes
    env: dict[str, str] = field(default_factory=dict)


class Runtime(Protocol):
    name: str

    def argv(self, spec: JobSpec, ctx: RunContext) -> list[str]: ...
