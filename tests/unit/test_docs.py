"""The job spec reference in docs/spec.md lists exactly the model's fields."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from gateway.spec import JobSpec

DOC = Path(__file__).resolve().parents[2] / "docs" / "spec.md"


def model_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    paths = set()
    for name, info in model.model_fields.items():
        path = prefix + name
        paths.add(path)
        annotation = info.annotation
        sep = "[]." if typing.get_origin(annotation) in (tuple, list) else "."
        for candidate in typing.get_args(annotation) or (annotation,):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                paths |= model_paths(candidate, path + sep)
    return paths


def documented_paths() -> set[str]:
    return set(re.findall(r"^\| `([^`]+)` \|", DOC.read_text(), flags=re.M))


def test_every_spec_field_is_documented_and_nothing_else():
    expected = model_paths(JobSpec)
    documented = documented_paths()
    assert expected - documented == set(), "fields missing from docs/spec.md"
    assert documented - expected == set(), "docs/spec.md documents fields that do not exist"
