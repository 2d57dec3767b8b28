"""SlurmProfile: typed, frozen, strict; the packaged YAML profiles validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gateway.backends.slurm.profile import SlurmProfile

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "slurm"


def test_defaults() -> None:
    prof = SlurmProfile()
    assert prof.runtime == "host" and prof.mpi == "pmix" and prof.python.startswith("/")
    assert prof.partition_for(0, None) is None


def test_walltime_parsed_like_spec() -> None:
    assert SlurmProfile(max_walltime="2d").max_walltime == 2 * 86400
    assert SlurmProfile(max_walltime="01:30:00").max_walltime == 5400
    with pytest.raises(ValidationError, match="walltime"):
        SlurmProfile(max_walltime="90")


def test_gpu_partitions() -> None:
    prof = SlurmProfile(partition="cpu", gpu_partitions={"a100": "gpu-a100", "*": "gpu"})
    assert prof.partition_for(0, "a100") == "cpu"
    assert prof.partition_for(2, "a100") == "gpu-a100"
    assert prof.partition_for(1, "v100") == "gpu"
    assert prof.partition_for(1, None) == "gpu"
    assert SlurmProfile(partition="cpu").partition_for(1, None) == "cpu"


def test_unknown_key_names_the_valid_ones() -> None:
    with pytest.raises(ValidationError, match="partiton"):
        SlurmProfile.model_validate({"partiton": "x"})


@pytest.mark.parametrize("flag", ["--mail-type=END", "--exclusive", "--export=ALL"])
def test_extra_sbatch_accepts_flags(flag: str) -> None:
    assert SlurmProfile(extra_sbatch=[flag]).extra_sbatch == (flag,)


@pytest.mark.parametrize("flag", ["-p x", "--mail-user=a b", "--x='y'", "--job-name=x",
                                  "--output=/tmp/o", "--begin=now#x", "--a=\n"])
def test_extra_sbatch_refuses_unsafe_or_reserved(flag: str) -> None:
    with pytest.raises(ValidationError):
        SlurmProfile(extra_sbatch=[flag])


@pytest.mark.parametrize("field, value", [("partition", "a b"), ("account", "x;y"),
                                          ("qos", "$(id)"), ("constraint", ["a&b"]),
                                          ("python", "python3")])
def test_refuses_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        SlurmProfile.model_validate({field: value})


def test_frozen() -> None:
    prof = SlurmProfile()
    with pytest.raises(ValidationError):
        prof.partition = "x"  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_packaged_profiles_validate(path: Path) -> None:
    SlurmProfile.model_validate(yaml.safe_load(path.read_text()))


def test_packaged_profiles_exist() -> None:
    assert {p.name for p in CONFIGS.glob("*.yaml")} >= {"default.yaml", "example-site.yaml"}
