"""The ``host`` runtime: no container, the command runs as is (for development)."""

from __future__ import annotations

from gateway.runtimes.base import RunContext
from gateway.spec import JobSpec


class HostRuntime:
    name = "host"

    def argv(self, spec: JobSpec, ctx: RunContext) -> list[str]:
        return spec.argv
