"""The AWS backend: short-lived EC2 instances (one per job), S3 staging, spot with fallbacks.

boto3 is imported lazily, here only (``boto3_module``), so ``hpcgw --help`` and every other
backend stay fast and work without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


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
    """The profile ``name`` from the config, else a packaged one (gateway.backends.profiles)."""
    from gateway.backends.profiles import load_profile as load

    return load(config, "aws", name, AwsProfile)


def make_backend(config: "Config", profile: str) -> "AwsBackend":
    """Factory the backend registry calls for targets ``aws`` and ``aws:PROFILE``."""
    from gateway.backends.aws.backend import AwsBackend

    return AwsBackend(load_profile(config, profile), jobs_root=config.jobs_path,
                      data_dir=config.data_path, images_store=config.images_path)
