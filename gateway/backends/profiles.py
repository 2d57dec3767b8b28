"""Backend profiles by name: from the config (``backends.KIND.profiles.NAME``), else a file
packaged in ``configs/KIND/NAME.yaml``; validated into the backend's own profile model."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import Config

M = TypeVar("M", bound=BaseModel)


def load_profile(config: "Config", kind: str, name: str, model: type[M]) -> M:
    from gateway.config import packaged_configs

    configured = getattr(config.backends, kind).profiles
    data, where = configured.get(name), f"backends.{kind}.profiles.{name}"
    if data is None:
        packaged = packaged_configs() / kind / f"{name}.yaml"
        if not packaged.is_file():
            known = sorted(configured) or ["(none configured)"]
            raise ConfigError(f"no {kind} profile {name!r}; known: {', '.join(known)} "
                              f"(add one under backends.{kind}.profiles in your config)")
        data, where = yaml.safe_load(packaged.read_text()) or {}, str(packaged)
    try:
        return model.model_validate({**data, "name": name})
    except ValidationError as exc:
        lines = [f"  - {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"invalid {kind} profile in {where}:\n" + "\n".join(lines)) from None
