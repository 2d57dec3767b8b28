"""The AWS backend: short-lived EC2 instances (one per job), S3 staging, spot with fallbacks.

boto3 is imported lazily, here only (``boto3_module``), so ``hpcgw --help`` and every other
backend stay fast and work without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

from gateway.backends.aws.profile import AwsProfile
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.backends.aws.backend import AwsBackend
    from gateway.config import Config

__all__ = ["AwsProfile", "boto3_module", "load_profile", "make_backend"]


def boto3_module() -> Any:
    """boto3, or a ConfigError that says what to install."""
    try:
        import boto3
    except ImportError as exc:
        raise ConfigError("the aws backend needs boto3: pip install 'hpcgw[aws]'") from exc
    return boto3


def load_profile(config: "Config", name: str) -> AwsProfile:
    """The profile ``name`` from the config (``backends.aws.profiles``), else a packaged one."""
    from pydantic import ValidationError

    from gateway.config import packaged_configs

    data = config.backends.aws.profiles.get(name)
    where = f"backends.aws.profiles.{name}"
    if data is None:
        packaged = packaged_configs() / "aws" / f"{name}.yaml"
        if not packaged.is_file():
            known = sorted(config.backends.aws.profiles) or ["(none configured)"]
            raise ConfigError(f"no aws profile {name!r}; known: {', '.join(known)} "
                              "(add one under backends.aws.profiles in your config)")
        data, where = yaml.safe_load(packaged.read_text()) or {}, str(packaged)
    try:
        return AwsProfile.model_validate({**data, "name": name})
    except ValidationError as exc:
        lines = [f"  - {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"invalid aws profile in {where}:\n" + "\n".join(lines)) from None


def make_backend(config: "Config", profile: str) -> "AwsBackend":
    """Factory the backend registry calls for targets ``aws`` and ``aws:PROFILE``."""
    from gateway.backends.aws.backend import AwsBackend

    return AwsBackend(load_profile(config, profile), jobs_root=config.jobs_path,
                      data_dir=config.data_path, images_store=config.images_path)
