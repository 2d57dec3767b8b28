"""Runtimes: how a job's command is wrapped to run on a node (host, podman, ...)."""

from __future__ import annotations

from gateway.errors import RuntimeConfigError
from gateway.runtimes.base import GpuLayer, Mount, RunContext, Runtime

RUNTIMES = ("host", "podman", "charliecloud", "apptainer")
CONTAINER_RUNTIMES = ("podman", "charliecloud", "apptainer")


def get_runtime(name: str) -> Runtime:
    if name == "host":
        from gateway.runtimes.host import HostRuntime

        return HostRuntime()
    if name == "podman":
        from gateway.runtimes.podman import PodmanRuntime

        return PodmanRuntime()
    if name == "charliecloud":
        from gateway.runtimes.charliecloud import CharliecloudRuntime

        return CharliecloudRuntime()
    if name == "apptainer":
        from gateway.runtimes.apptainer import ApptainerRuntime

        return ApptainerRuntime()
    raise RuntimeConfigError(f"unknown runtime {name!r}; valid runtimes: {', '.join(RUNTIMES)}")


__all__ = ["CONTAINER_RUNTIMES", "GpuLayer", "Mount", "RUNTIMES", "RunContext", "Runtime",
           "get_runtime"]
