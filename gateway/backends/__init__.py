"""Backends by name: built in (local, slurm, aws) or added through the ``hpcgw.backends``
entry point group. A target is ``KIND`` or ``KIND:PROFILE`` (``slurm:gpu``)."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable

from gateway.errors import ConfigError, SpecError

if TYPE_CHECKING:
    from gateway.backends.base import Backend
    from gateway.config import Config

Factory = Callable[["Config", str], "Backend"]


def _local(config: "Config", profile: str) -> "Backend":
    from gateway.backends.local import LocalBackend

    return LocalBackend(config.jobs_path, cpus=config.local_cpus, gpus=config.local.gpus,
                        runtimes=config.local.runtimes)


def _slurm(config: "Config", profile: str) -> "Backend":
    try:
        from gateway.backends.slurm import make_backend  # type: ignore[attr-defined]
    except ImportError as exc:
        raise ConfigError("the slurm backend is not available in this installation") from exc
    return make_backend(config, profile)  # type: ignore[no-any-return]


def _aws(config: "Config", profile: str) -> "Backend":
    from gateway.backends.aws import make_backend

    return make_backend(config, profile)


BUILTIN: dict[str, Factory] = {"local": _local, "slurm": _slurm, "aws": _aws}


def _entry_point_factory(ep: Any) -> Factory:
    def make(config: "Config", profile: str) -> "Backend":
        return ep.load()(config, profile)  # type: ignore[no-any-return]

    return make


def split_target(target: str, config: "Config") -> tuple[str, str]:
    kind, _, profile = target.partition(":")
    if not profile:
        section = getattr(config.backends, kind, None)
        profile = getattr(section, "default_profile", "default")
    return kind, profile


class BackendRegistry:
    """Creates each backend once per process, on first use (constructors do no I/O)."""

    def __init__(self, config: "Config", overrides: dict[str, Any] | None = None):
        self.config = config
        self._made: dict[str, Backend] = dict(overrides or {})

    def factories(self) -> dict[str, Factory]:
        found = dict(BUILTIN)
        for ep in entry_points(group="hpcgw.backends"):
            if ep.name not in found:
                found[ep.name] = _entry_point_factory(ep)
        return found

    def get(self, target: str) -> "Backend":
        if target in self._made:
            return self._made[target]
        kind, profile = split_target(target, self.config)
        key = kind if kind == "local" else f"{kind}:{profile}"
        if key not in self._made:
            factory = self.factories().get(kind)
            if factory is None:
                valid = ", ".join(sorted(self.factories()))
                raise SpecError([_issue("target", f"unknown backend {kind!r}; valid: {valid}")])
            self._made[key] = factory(self.config, profile)
        self._made[target] = self._made[key]
        return self._made[key]

    def backend_name(self, target: str) -> str:
        kind, profile = split_target(target, self.config)
        return kind if kind == "local" else f"{kind}:{profile}"


def _issue(path: str, message: str) -> Any:
    from gateway.errors import FieldIssue

    return FieldIssue(path, message)
