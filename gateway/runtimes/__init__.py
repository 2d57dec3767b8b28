"""Runtimes: how a job's command is wrapped to run on a node (host, podman, ...)."""

from __future__ import annotations

from gateway.errors import RuntimeConfigError
from gateway.runtimes.base import RunContext, Runtime


def get_runtime(name: str) -> Runtime:
    if name == "host":
        from gateway.runtimes.host import HostRuntime

        return HostRuntime()
    raise RuntimeConfigError(f"runtime {name!r} is not available yet; valid runtimes: host")


__all__ = ["RunContext", "Runtime", "get_runtime"]
