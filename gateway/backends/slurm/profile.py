"""A Slurm profile: where and how one site's jobs are submitted, as one frozen object.

Profiles are plain YAML mappings (``configs/slurm/*.yaml``) that the config loader passes to
``SlurmProfile.model_validate``. Unknown keys are refused with the list of valid ones.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway import units

SLURM_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
FEATURE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# `--flag` or `--flag=value`; values may not hold characters the #SBATCH parser treats
# specially or that no directive line can carry.
SBATCH_FLAG = re.compile(r"^--[a-z][a-z0-9-]*(=[^\s\"'#\\]+)?$")
# Flags the script sets itself from the request; a profile may not override them.
RESERVED_FLAGS = frozenset({
    "job-name", "comment", "partition", "account", "qos", "time", "mem", "nodes",
    "ntasks-per-node", "cpus-per-task", "gres", "constraint", "output", "error", "chdir",
    "array", "parsable", "wrap",
})


class SlurmProfile(BaseModel):
    """One Slurm site: partition, account, limits, and how jobs start on its nodes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("default", pattern=SLURM_NAME)
    partition: str | None = Field(None, pattern=SLURM_NAME)
    account: str | None = Field(None, pattern=SLURM_NAME)
    qos: str | None = Field(None, pattern=SLURM_NAME)
    max_walltime: int | None = Field(None, description="e.g. 2d or 48:00:00 (stored in seconds)")
    gpu_partitions: dict[str, str] = Field(
        default_factory=dict, description="GPU type -> partition; '*' for GPUs of any type")
    constraint: tuple[str, ...] = Field((), description="features every job needs (ANDed)")
    extra_sbatch: tuple[str, ...] = ()
    python: str = Field(default_factory=lambda: sys.executable,
                        description="interpreter on the compute nodes that has `gateway`")
    runtime: Literal["host", "podman", "charliecloud", "apptainer"] = "host"
    mpi: Literal["pmix", "mpirun"] = "pmix"
    env: dict[str, str] = Field(default_factory=dict,
                                description="extra environment for sbatch/squeue/..., e.g. SLURM_CONF")
    capabilities_ttl: float = Field(300.0, ge=0, description="seconds a `sinfo` answer is reused")
    array_throttle: int | None = Field(None, ge=1, description="at most N tasks of an array at once")
    launch_releases: int = Field(
        2, ge=0, description="times a job Slurm held after a failed launch is released; "
        "after that its attempt fails (node_fail) and Slurm's job is cancelled")

    @field_validator("max_walltime", mode="before")
    @classmethod
    def _walltime(cls, value: Any) -> int | None:
        return None if value is None else units.parse_walltime(value)

    @field_validator("gpu_partitions")
    @classmethod
    def _gpu_partitions(cls, value: dict[str, str]) -> dict[str, str]:
        for gpu, part in value.items():
            if gpu != "*" and not FEATURE.match(gpu):
                raise ValueError(f"GPU type {gpu!r} may hold only letters, digits, '.', '_', '-'")
            if not re.match(SLURM_NAME, part):
                raise ValueError(f"partition {part!r} for GPU type {gpu!r} is not a valid name")
        return value

    @field_validator("constraint", mode="before")
    @classmethod
    def _constraint(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        for item in items or ():
            if not isinstance(item, str) or not FEATURE.match(item):
                raise ValueError(f"feature {item!r} may hold only letters, digits, '.', '_', '-'")
        return tuple(items or ())

    @field_validator("extra_sbatch", mode="before")
    @classmethod
    def _extra(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        for item in items or ():
            if not isinstance(item, str) or not SBATCH_FLAG.match(item):
                raise ValueError(f"extra_sbatch item {item!r} must look like --flag or --flag=value "
                                 "(no spaces, quotes, '#' or backslashes)")
            flag = item[2:].split("=", 1)[0]
            if flag in RESERVED_FLAGS:
                raise ValueError(f"extra_sbatch may not set --{flag}: the gateway sets it from the "
                                 "job spec or from this profile's own keys")
        return tuple(items or ())

    @field_validator("python")
    @classmethod
    def _python(cls, value: str) -> str:
        if not value.startswith("/") or "\n" in value:
            raise ValueError("python must be an absolute path, e.g. /opt/hpcgw/bin/python")
        return value

    def partition_for(self, gpu_count: int, gpu_type: str | None) -> str | None:
        """The partition a job goes to: the GPU type's partition when it asks for GPUs."""
        if gpu_count:
            if gpu_type and gpu_type in self.gpu_partitions:
                return self.gpu_partitions[gpu_type]
            if "*" in self.gpu_partitions:
                return self.gpu_partitions["*"]
        return self.partition
