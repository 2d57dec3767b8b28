"""The Slurm backend: batch scripts, one squeue per pass, job arrays, adoption by job name."""

from __future__ import annotations

from typing import TYPE_CHECKING


from gateway.backends.slurm.backend import SlurmBackend
from gateway.backends.slurm.profile import SlurmProfile

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["SlurmBackend", "SlurmProfile", "load_profile", "make_backend"]


def load_profile(config: Config, name: str) -> SlurmProfile:
    """The profile ``name`` from the config, else a packaged one (gateway.backends.profiles)."""
    from gateway.backends.profiles import load_profile as load

    return load(config, "slurm", name, SlurmProfile)


def make_backend(config: Config, profile: str) -> SlurmBackend:
    """Factory the backend registry calls for targets ``slurm`` and ``slurm:PROFILE``."""
    return SlurmBackend(load_profile(config, profile))
