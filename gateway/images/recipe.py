"""The image recipe: a small declarative description of an image, validated strictly.

    name: busybox            # stored as name:tag
    tag: "1"
    base:                    # exactly one of:
      rootfs: ./rootfs       #   a folder
      # tarball: ./root.tar.gz   a tar (gzip or not)
      # image: debian:12     #   an image already in the store (name:tag or NAME@sha256:...)
    add:                     # files and folders copied into the image
      - {src: ./app, dest: /opt/app}
      - {src: ./run.sh, dest: /usr/local/bin/run, mode: "0755"}
    dirs: [/dev, /proc, /sys, /tmp, /in, /out, /work]   # the default: mount points
    env: {LANG: C.UTF-8}
    entrypoint: []
    cmd: [/bin/sh]
    workdir: /work
    compress: true           # gzip layers (mtime 0): smaller to ship, still reproducible

Relative paths are taken from the recipe file's folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import ImageError
from gateway.spec import ENV_KEY_RE, load_yaml

NAME_RE = re.compile(r"^[a-z0-9]+(?:[._/-][a-z0-9]+)*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _abs_image_path(value: str, what: str) -> str:
    if not value.startswith("/") or "\x00" in value or "\n" in value:
        raise ValueError(f"{what} must be an absolute path inside the image, e.g. /opt/app")
    if ".." in Path(value).parts:
        raise ValueError(f"{what} {value!r} must not contain '..'")
    return value


class Base(_Model):
    rootfs: str | None = None
    tarball: str | None = None
    image: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "Base":
        given = [k for k in ("rootfs", "tarball", "image") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of rootfs (a folder), tarball (a tar file) "
                             "or image (a name in the store)")
        return self


class Add(_Model):
    src: str = Field(min_length=1)
    dest: str
    mode: str | None = Field(None, pattern=r"^0?[0-7]{3,4}$")

    @field_validator("dest")
    @classmethod
    def _dest(cls, value: str) -> str:
        return _abs_image_path(value, "dest")


class Recipe(_Model):
    name: str = Field(pattern=NAME_RE.pattern)
    tag: str = Field("latest", pattern=TAG_RE.pattern)
    base: Base
    add: tuple[Add, ...] = ()
    dirs: tuple[str, ...] = ("/dev", "/proc", "/sys", "/tmp", "/in", "/out", "/work")
    env: dict[str, str] = Field(default_factory=dict)
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    workdir: str = "/work"
    user: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    compress: bool = True

    @field_validator("dirs")
    @classmethod
    def _dirs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_abs_image_path(v, "dirs entry") for v in value)

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str) -> str:
        return _abs_image_path(value, "workdir")

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not ENV_KEY_RE.match(key):
                raise ValueError(f"env name {key!r} is not a valid variable name")
            if "\x00" in val:
                raise ValueError(f"env {key} contains a NUL byte")
        return dict(sorted(value.items()))

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_recipe(data: Any, *, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise ImageError(f"{source}: a recipe must be a mapping of keys to values")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            path = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = _unknown_key(err["loc"])
            lines.append(f"  - {path}: {msg}")
        raise ImageError(f"invalid image recipe in {source}:\n" + "\n".join(lines)) from None


def _unknown_key(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Recipe
    if len(loc) > 1 and loc[0] == "base":
        model = Base
    elif len(loc) > 2 and loc[0] == "add":
        model = Add
    return f"unknown key; valid keys here are: {', '.join(sorted(model.model_fields))}"


def load_recipe(path: str | Path) -> tuple[Recipe, Path]:
    """Read a recipe file; returns it and the folder its relative paths start from."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ImageError(f"cannot read recipe {str(path)!r}: {exc.strerror}; check the path") from None
    try:
        data = load_yaml(text, str(path))
    except Exception as exc:  # SpecError from the shared YAML loader
        raise ImageError(str(exc).replace("invalid job spec", "invalid image recipe")) from None
    return parse_recipe(data, source=str(path)), path.resolve().parent
