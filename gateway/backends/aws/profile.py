"""An AWS profile: where and how one account's instances are launched, as one frozen object.

Profiles are plain YAML mappings (``backends.aws.profiles.NAME`` in the hpcgw config, else
``configs/aws/NAME.yaml``). Credentials are never part of a profile: boto3's standard chain
(environment, ``~/.aws``, SSO, instance role) finds them; ``aws_profile`` only names which
``~/.aws/config`` profile to use. Unknown keys are refused with the list of valid ones.
"""

from __future__ import annotations

import getpass
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway import units

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TAG_SAFE = re.compile(r"^[A-Za-z0-9 _.:/=+@-]{1,128}$")
BUCKET = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"


def _owner() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "hpcgw"


class AwsProfile(BaseModel):
    """One AWS account/region: bucket, network, limits, spot policy, budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("default", pattern=NAME)
    region: str = Field("us-east-1", pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")
    aws_profile: str | None = Field(None, description="a profile of ~/.aws/config (the chain otherwise)")
    endpoint_url: str | None = Field(None, description="EC2 and S3 endpoint (a moto server in tests)")
    bucket: str = Field("hpcgw-staging", pattern=BUCKET)
    prefix: str = Field("hpcgw", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    ami: str = Field("ami-12c6146b", pattern=r"^ami-[0-9a-f]{8,17}$")
    zones: tuple[str, ...] = Field((), description="availability zones to try, in order")
    subnets: dict[str, str] = Field(default_factory=dict, description="zone -> subnet id")
    security_groups: tuple[str, ...] = ()
    instance_profile: str | None = Field(None, description="IAM instance profile name (optional)")
    spot: bool = True
    max_price: float | None = Field(None, gt=0, description="spot max price per hour (None: on-demand price)")
    owner: str = Field(default_factory=_owner)
    budget: float | None = Field(None, ge=0, description="USD this profile's owner may spend in total")
    project_budgets: dict[str, float] = Field(
        default_factory=dict, description="project (label `project`) -> USD it may spend")
    catalog: str = Field("aws/catalog.yaml", description="instance catalog, relative to configs/ or absolute")
    runtime: Literal["host", "podman"] = "podman"
    max_walltime: int = Field(6 * 86400, description="at most 6 days: presigned URLs live 7 days at most")
    grace_s: int = Field(60, ge=0, le=3600, description="SIGTERM -> SIGKILL, and poweroff margin")
    boot_s: int = Field(600, ge=0, le=7200, description="allowance for boot and staging before walltime starts")
    log_interval_s: int = Field(30, ge=1, description="seconds between log uploads while the job runs")
    fallback_types: int = Field(3, ge=1, le=20, description="instance types tried before giving up")
    multipart_mb: int = Field(64, ge=5, description="uploads above this size go in parts")
    api_max_attempts: int = Field(5, ge=1, le=20, description="botocore's own retries (standard mode)")
    reap_interval_s: float = Field(60.0, ge=0, description="at most one reaper describe per this period")
    node_root: str = Field("/var/lib/hpcgw", description="the instance's work folder")
    max_nodes: int = Field(16, ge=1, le=64, description="instances (nodes) one job may use")
    placement_group: bool = Field(True, description="multi-node jobs: a cluster placement group per attempt")
    spot_history: bool = Field(False, description="refine spot prices with describe_spot_price_history")
    spot_history_ttl_s: float = Field(300.0, ge=0, description="how long one price history answer is used")

    @field_validator("max_walltime", mode="before")
    @classmethod
    def _walltime(cls, value: Any) -> int:
        return units.parse_walltime(value)

    @field_validator("owner")
    @classmethod
    def _tag_value(cls, value: str) -> str:
        if not TAG_SAFE.match(value):
            raise ValueError(f"owner {value!r}: letters, digits, spaces and _.:/=+@- only (an EC2 tag value)")
        return value

    @field_validator("zones", "security_groups", mode="before")
    @classmethod
    def _tuple(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _checks(self) -> "AwsProfile":
        if self.max_walltime > 6 * 86400:
            raise ValueError("max_walltime may be at most 6d (presigned URLs live 7 days at most)")
        unknown = set(self.subnets) - set(self.zones)
        if self.zones and unknown:
            raise ValueError(f"subnets name zones not in `zones`: {', '.join(sorted(unknown))}")
        return self

    def placements(self) -> list[tuple[str | None, str | None]]:
        """(zone, subnet) pairs to try in order; one (None, None) when nothing is configured."""
        zones = list(self.zones) or list(self.subnets)
        return [(z, self.subnets.get(z)) for z in zones] or [(None, None)]

    def key(self, *parts: str) -> str:
        """An S3 key under this profile's prefix."""
        return "/".join((self.prefix, *parts))
