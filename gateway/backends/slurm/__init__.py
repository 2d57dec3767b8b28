"""The Slurm backend: batch scripts, one squeue per pass, job arrays, adoption by job name."""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

from gateway.backends.slurm.backend import SlurmBackend
from gateway.backends.slurm.profile import SlurmProfile
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["SlurmBackend", "SlurmProfile", "load_profile", "make_backend"]


def load_profile(config: Config, name: str) -> SlurmProfile:
    """The profile ``name`` from the config (``backends.slurm.profiles``), else a packaged one."""
    from pydantic import ValidationError

    from gateway.config import packaged_configs

    data = config.backends.slurm.profiles.get(name)
    where = f"backends.slurm.profiles.{name}"
    if data is None:
        packaged = packaged_configs() / "slurm" / f"{name}.yaml"
        if not packaged.is_file():
            known = sorted(config.backends.slurm.profiles) or ["default"]
            raise ConfigError(f"no slurm profile {name!r}; known: {', '.join(known)}")
        data, where = yaml.safe_load(packaged.read_text()) or {}, str(packaged)
    try:
        return SlurmProfile.model_validate({**data, "name": name})
    except ValidationError as exc:
        lines = [f"  - {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"invalid slurm profile in {where}:\n" + "\n".join(lines)) from None


def make_backend(config: Config, profile: str) -> SlurmBackend:
    """Factory the backend registry calls for targets ``slurm`` and ``slurm:PROFILE``."""
    return SlurmBackend(load_profile(config, profile))
