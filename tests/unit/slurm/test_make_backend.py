"""The registry's factory: profiles from the config, else packaged; errors name the fix."""

from __future__ import annotations

import pytest

from gateway.backends.slurm import SlurmBackend, make_backend
from gateway.config import Config, load_config
from gateway.errors import ConfigError


def _config(profiles: dict[str, object]) -> Config:
    return load_config({"backends": {"slurm": {"profiles": profiles}}}, environ={})


def test_profile_from_config_named_by_its_key() -> None:
    cfg = _config({"gpu": {"partition": "p1", "max_walltime": "2h", "env": {"SLURM_CONF": "/x"}}})
    backend = make_backend(cfg, "gpu")
    assert isinstance(backend, SlurmBackend) and backend.name == "slurm:gpu"
    assert backend.profile.partition == "p1" and backend.profile.max_walltime == 7200
    assert backend.env["SLURM_CONF"] == "/x" and sum(backend.calls.values()) == 0


def test_packaged_default_profile() -> None:
    assert make_backend(_config({}), "default").profile.mpi == "pmix"


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="known: gpu"):
        make_backend(_config({"gpu": {}}), "nosuch")


def test_bad_profile_names_the_field() -> None:
    with pytest.raises(ConfigError, match="partiton"):
        make_backend(_config({"x": {"partiton": "p"}}), "x")
