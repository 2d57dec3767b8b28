"""The Runtime seam: turn (spec, image, folders) into the argv that runs a job on a node.

Runtimes are pure functions of their input: no I/O, so they are tested as text and the
same argv can be written into a Slurm script or a cloud instance's user-data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from gateway.spec import JobSpec


@dataclass(frozen=True)
class Mount:
    """A host path made visible inside the container."""

    source: str
    target: str
    readonly: bool = False


@dataclass(frozen=True)
class GpuLayer:
    """What a node profile adds when a job asks for GPUs (the hardware-enablement layer):
    device files, driver libraries bound read-only, environment, and apptainer's flag."""

    name: str = "none"
    devices: tuple[str, ...] = ()
    mounts: tuple[Mount, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    apptainer_flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunContext:
    """Where things are on the node for one attempt."""

    work_dir: str                      # host path of the working folder
    attempt_dir: str                   # host path of the attempt folder
    image_path: str | None = None      # unpacked image / archive, for directory runtimes
    env: dict[str, str] = field(default_factory=dict)
    # -- container runtimes (all optional, additive) --
    image_ref: str | None = None       # NAME@sha256:..., as the runtime's storage knows it
    container_workdir: str = "/work"   # where work_dir appears inside the container
    mounts: tuple[Mount, ...] = ()     # extra binds (inputs, shared data)
    runtime_env: dict[str, str] = field(default_factory=dict)  # for the runtime program itself
    gpu: GpuLayer | None = None        # the node profile's GPU layer, when GPUs are asked
    user: str | None = None            # uid[:gid] inside the container
    cgroup_parent: str | None = None   # podman: keep containers under the caller's cgroup


class Runtime(Protocol):
    name: str

    def argv(self, spec: JobSpec, ctx: RunContext) -> list[str]: ...


def env_prefix(runtime_env: dict[str, str]) -> list[str]:
    """``env K=V ... --`` so the runtime program sees its private configuration."""
    if not runtime_env:
        return []
    return ["env", *(f"{k}={v}" for k, v in sorted(runtime_env.items()))]


def wants_gpu(spec: JobSpec, ctx: RunContext) -> GpuLayer | None:
    return ctx.gpu if spec.resources.gpus.count > 0 and ctx.gpu is not None else None
