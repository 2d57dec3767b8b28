"""Configuration: resolved once, in layers, into one frozen typed object.

Layers, later wins: packaged ``configs/defaults.yaml``; ``/etc/hpcgw/config.yaml``;
``~/.config/hpcgw/config.yaml`` (or the file named by ``$HPCGW_CONFIG``); ``HPCGW_*``
environment variables (``HPCGW_DATA_DIR``, or ``HPCGW_SECTION__KEY=value`` for any key, the
value read as YAML); then the overrides a caller passes (CLI flags, ``Gateway(...)``).
``load_config`` does the I/O; the model's constructor does none.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import ConfigError


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(_Frozen):
    path: str = ""
    busy_timeout_s: float = Field(30, gt=0)


class AgentConfig(_Frozen):
    interval_s: float = Field(1.0, gt=0)
    backoff_s: tuple[float, ...] = (2, 5, 15, 60)
    lost_after_misses: int = Field(3, ge=1)


class LocalConfig(_Frozen):
    cpus: int = Field(0, ge=0)
    gpus: int = Field(0, ge=0)
    kill_grace_s: float = Field(10, ge=0)
    runtimes: tuple[str, ...] = ("host",)


class ImagesConfig(_Frozen):
    """The image store and the private podman setup (see docs/images.md)."""

    store: str = ""            # image store root; empty: DATA_DIR/images (shared FS on Slurm)
    podman_dir: str = ""       # private podman config + storage; empty: DATA_DIR/podman
    podman_runroot: str = ""   # podman's run folder (sockets); empty: /run/hpcgw-<hash>
    node_profile: str = ""     # configs/nodes/<name>.yaml (or a path) used when GPUs are asked
    container_user: str = Field("", pattern=r"^$|^[0-9]+(:[0-9]+)?$")  # podman --user UID[:GID]
    cgroup_parent: str = Field("", pattern=r"^$|^/[A-Za-z0-9._/-]+$")   # podman --cgroup-parent


class BackendProfiles(_Frozen):
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    default_profile: str = "default"


class BackendsConfig(_Frozen):
    model_config = ConfigDict(extra="allow", frozen=True)
    slurm: BackendProfiles = BackendProfiles()
    aws: BackendProfiles = BackendProfiles()


class BrokerConfig(_Frozen):
    """Policy for ``target: auto`` (campaigns may override it with their ``policy``)."""

    targets: tuple[str, ...] = ()        # empty: every configured slurm and aws profile
    prefer: str | None = None            # stay here unless its wait exceeds burst_after_s
    burst_after_s: float = Field(1800, ge=0)
    max_cost: float | None = Field(None, ge=0)   # per job, in the catalog's currency
    cloud_boot_s: float = Field(120, ge=0)       # boot + image fetch, until learned


class Config(_Frozen):
    data_dir: str = ""
    store: StoreConfig = StoreConfig()
    default_target: str = "local"
    agent: AgentConfig = AgentConfig()
    local: LocalConfig = LocalConfig()
    backends: BackendsConfig = BackendsConfig()
    broker: BrokerConfig = BrokerConfig()
    images: ImagesConfig = ImagesConfig()
    sources: tuple[str, ...] = ()

    @property
    def data_path(self) -> Path:
        if self.data_dir:
            return Path(self.data_dir).expanduser()
        xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(xdg) / "hpcgw"

    @property
    def store_path(self) -> Path:
        return Path(self.store.path).expanduser() if self.store.path else self.data_path / "hpcgw.db"

    @property
    def jobs_path(self) -> Path:
        return self.data_path / "jobs"

    @property
    def images_path(self) -> Path:
        return Path(self.images.store).expanduser() if self.images.store else self.data_path / "images"

    @property
    def podman_path(self) -> Path:
        if self.images.podman_dir:
            return Path(self.images.podman_dir).expanduser()
        return self.data_path / "podman"

    @property
    def local_cpus(self) -> int:
        return self.local.cpus or os.cpu_count() or 1


def packaged_configs() -> Path:
    """The ``configs/`` folder: inside the installed package, or the source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_configs", here.parent / "configs"):
        if (candidate / "defaults.yaml").is_file():
            return candidate
    raise ConfigError("packaged configs/defaults.yaml not found; reinstall hpcgw")


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    return data


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith("HPCGW_") or name == "HPCGW_CONFIG":
            continue
        path = name[len("HPCGW_"):].lower().split("__")
        if path == ["data_dir"] or len(path) > 1:
            try:
                value = yaml.safe_load(raw) if raw else ""
            except yaml.YAMLError:
                value = raw
            if path[-1] in ("path", "data_dir") or value is None:
                value = raw
            node = layer
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
    return layer


def config_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    env = os.environ if environ is None else environ
    user = env.get("HPCGW_CONFIG")
    home = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "hpcgw" / "config.yaml"
    files = [packaged_configs() / "defaults.yaml", Path("/etc/hpcgw/config.yaml")]
    files.append(Path(user).expanduser() if user else home)
    return files


def load_config(overrides: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Resolve every layer into a frozen Config; a bad key names its file and the fix."""
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    sources = []
    for index, path in enumerate(config_files(env)):
        if path.is_file():
            merged = _merge(merged, _read(path))
            sources.append(str(path))
        elif index == 2 and env.get("HPCGW_CONFIG"):
            raise ConfigError(f"HPCGW_CONFIG names {path}, which does not exist; fix or unset it")
    merged = _merge(merged, _from_env(env))
    merged = _merge(merged, dict(overrides or {}))
    merged["sources"] = tuple(sources)
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        lines = [f"  - {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid configuration (from " + ", ".join(sources or ["defaults"])
                          + "):\n" + "\n".join(lines)) from None
