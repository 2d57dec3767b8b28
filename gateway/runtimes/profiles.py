"""Node profiles (``configs/nodes/*.yaml``): what a kind of node adds to every container,
today the GPU layer (device files, driver libraries, environment, apptainer's ``--nv``)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import ConfigError
from gateway.runtimes.base import GpuLayer, Mount


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Library(_Model):
    source: str
    target: str

    @field_validator("source", "target")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or "\n" in value or "\x00" in value:
            raise ValueError("must be an absolute path, e.g. /usr/lib/x86_64-linux-gnu/nvidia")
        return value


class NodeProfile(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    devices: tuple[str, ...] = ()
    libraries: tuple[Library, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    apptainer_flags: tuple[str, ...] = ()

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for dev in value:
            if not dev.startswith("/dev/"):
                raise ValueError(f"device {dev!r} must be a path under /dev/")
        return value

    def gpu_layer(self) -> GpuLayer:
        return GpuLayer(name=self.name, devices=self.devices,
                        mounts=tuple(Mount(lib.source, lib.target, True) for lib in self.libraries),
                        env=dict(self.env), apptainer_flags=self.apptainer_flags)


def load_node_profile(name_or_path: str) -> NodeProfile:
    """``gpu-nvidia`` (from the packaged configs/nodes/) or a path to a YAML file."""
    from gateway.config import packaged_configs

    path = Path(name_or_path)
    if not name_or_path.endswith((".yaml", ".yml")):
        path = packaged_configs() / "nodes" / f"{name_or_path}.yaml"
    if not path.is_file():
        folder = packaged_configs() / "nodes"
        known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise ConfigError(f"node profile {name_or_path!r} not found (looked at {path}); "
                          f"known profiles: {', '.join(known) or 'none'}")
    try:
        return NodeProfile.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"node profile {path}: {exc}") from None
