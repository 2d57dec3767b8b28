"""The job spec: one frozen, validated description of a job, from YAML or Python.

``load_spec(path)`` and ``JobSpec.model_validate(dict)`` give the same object. Its canonical
JSON (sorted keys, units normalised: memory in bytes, walltime in seconds, paths absolute)
is hashed into ``spec_digest``, which identifies *what* runs independent of *when*.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway import units
from gateway.errors import FieldIssue, SpecError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
FEATURE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9._-]+)*"
                       r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?@sha256:[0-9a-f]{64}$")
TARGET_RE = re.compile(r"^(local|auto|slurm(:[A-Za-z0-9_-]+)?|aws(:[A-Za-z0-9_-]+)?)$")
RETRY_KINDS = ("failed", "timeout", "lost", "node_fail", "preempted", "oom")
RUNTIMES = ("host", "podman", "charliecloud", "apptainer")


# Thread pools a job's libraries size from these (OpenMP, Numba, OpenBLAS, MKL). Without
# them each pool takes every core the process can see, and jobs packed side by side on a
# node (the local backend fills its CPUs; a container's --cpus is a quota, not a core set)
# oversubscribe it: pools that spin between calls then stall one another (two 1-CPU
# training jobs on 2 cores ran 4-25x slower than with one thread each; docs/spec.md).
THREAD_VARS = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class GPUs(_Model):
    """GPUs per node: how many, and optionally which type (``a100``, ``fake``)."""

    count: int = Field(0, ge=0, le=64)
    type: str | None = Field(None, pattern=FEATURE_RE.pattern)


class Resources(_Model):
    """What one job needs. Memory is per node; walltime is the hard limit."""

    nodes: int = Field(1, ge=1, le=10000)
    tasks_per_node: int = Field(1, ge=1, le=1024)
    cpus_per_task: int = Field(1, ge=1, le=1024)
    memory: int | None = Field(None, description="per node, e.g. 4G (stored in bytes)")
    gpus: GPUs = GPUs()
    walltime: int = Field(3600, description="HH:MM:SS or 90m (stored in seconds)")

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any, info: ValidationInfo) -> int | None:
        if value is None or _canonical(info, value):
            return value  # type: ignore[no-any-return]
        return units.parse_memory(value)

    @field_validator("walltime", mode="before")
    @classmethod
    def _walltime(cls, value: Any, info: ValidationInfo) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and not _canonical(info, value):
            raise ValueError(f"{value!r} has no unit; {units.WALLTIME_HELP}")
        return units.parse_walltime(value)

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return {"count": value}
        return value

    @property
    def total_cpus(self) -> int:
        return self.nodes * self.tasks_per_node * self.cpus_per_task

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus.count


class Input(_Model):
    """A file or folder made available in the job's work folder under ``target``."""

    source: str = Field(min_length=1)
    target: str | None = None

    @field_validator("target")
    @classmethod
    def _target(cls, value: str | None) -> str | None:
        if value is not None and not _safe_relative(value):
            raise ValueError("target must be a relative path without '..', e.g. data/train.csv")
        return value

    @property
    def is_remote(self) -> bool:
        return self.source.startswith("s3://")

    @property
    def name(self) -> str:
        return self.target or Path(self.source.rstrip("/")).name


class Retries(_Model):
    """How often a failed attempt is tried again, and on which kinds of failure."""

    max: int = Field(0, ge=0, le=20)
    on: tuple[Literal["failed", "timeout", "lost", "node_fail", "preempted", "oom"], ...] = (
        "lost", "node_fail", "preempted")


class JobSpec(_Model):
    """A whole job. Frozen: a changed job is a new spec with a new ``spec_digest``."""

    name: str = Field(pattern=NAME_RE.pattern)
    image: str | None = None
    runtime: Literal["host", "podman", "charliecloud", "apptainer"] | None = None
    command: Union[tuple[str, ...], str]
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = None
    resources: Resources = Resources()
    mpi: Literal["pmix", "mpirun"] | None = None
    requires: tuple[str, ...] = ()
    inputs: tuple[Input, ...] = ()
    outputs: tuple[str, ...] = ()
    retries: Retries = Retries()
    target: str = Field("local", pattern=TARGET_RE.pattern)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "@sha256:" not in value:
            raise ValueError(
                f"image {value!r} is not pinned by digest; run `hpcgw image pin {value}` "
                "or write it as NAME@sha256:<64 hex digits>")
        if not DIGEST_RE.match(value):
            raise ValueError("image must look like registry/name[:tag]@sha256:<64 lowercase hex>")
        return value

    @field_validator("command", mode="before")
    @classmethod
    def _command(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("command is empty; give an argv list or a shell script")
            return value
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("command is an empty list; give at least the program to run")
            if not all(isinstance(a, str) for a in value):
                raise ValueError("every argument must be a string (quote numbers in YAML)")
            if not value[0].strip():
                raise ValueError("the program (first argument) is empty")
            return tuple(value)
        raise ValueError("command must be an argv list or a script string")

    @field_validator("command")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        parts = [value] if isinstance(value, str) else list(value)
        if any("\x00" in p for p in parts):
            raise ValueError("command contains a NUL byte, which no process can receive")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not ENV_KEY_RE.match(key):
                raise ValueError(f"env name {key!r} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)")
            if key.startswith("HPCGW_"):
                raise ValueError(f"env name {key!r} uses the reserved HPCGW_ prefix; rename it")
            if "\x00" in val:
                raise ValueError(f"env {key} contains a NUL byte")
        return dict(sorted(value.items()))

    @field_validator("env", "labels", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            bad = [k for k, v in value.items() if isinstance(v, (dict, list, tuple))]
            if bad:
                raise ValueError(f"values must be strings, not lists or maps (key {bad[0]!r})")
            return {str(k): ("" if v is None else str(v).lower() if isinstance(v, bool) else str(v))
                    for k, v in value.items()}
        return value

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or "\x00" in value or "\n" in value):
            raise ValueError("workdir must be an absolute path without newlines, e.g. /work")
        return value

    @field_validator("requires")
    @classmethod
    def _features(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for feature in value:
            if not FEATURE_RE.match(feature):
                raise ValueError(f"feature {feature!r} may hold only letters, digits, '.', '_', '-'")
        return tuple(sorted(set(value)))

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple({"source": v} if isinstance(v, str) else v for v in value)
        return value

    @field_validator("inputs")
    @classmethod
    def _resolve_inputs(cls, value: tuple[Input, ...], info: ValidationInfo) -> tuple[Input, ...]:
        base = Path((info.context or {}).get("base_dir") or Path.cwd())
        check = (info.context or {}).get("check_inputs", True)
        resolved, seen = [], set()
        for item in value:
            if item.is_remote:
                resolved.append(item)
            else:
                path = (base / Path(item.source).expanduser()).resolve()
                if check and not path.exists():
                    raise ValueError(f"input {item.source!r} does not exist (looked at {path}); "
                                     "fix the path or create the file first")
                resolved.append(Input(source=str(path), target=item.target))
            if resolved[-1].name in seen:
                raise ValueError(f"two inputs would both be staged as {resolved[-1].name!r}; "
                                 "give one of them a different target")
            seen.add(resolved[-1].name)
        return tuple(resolved)

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not _safe_relative(pattern):
                raise ValueError(f"output {pattern!r} must be a relative path or glob without '..'")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not LABEL_KEY_RE.match(key):
                raise ValueError(f"label key {key!r} may hold only letters, digits, '.', '_', '-', '/'")
        return dict(sorted(value.items()))

    @model_validator(mode="after")
    def _image_or_host(self) -> "JobSpec":
        if self.image is None and self.runtime not in (None, "host"):
            raise ValueError(f"runtime {self.runtime!r} needs an image; add image: NAME@sha256:...")
        if self.image is not None and self.runtime == "host":
            raise ValueError("runtime 'host' runs without an image; drop the image or the runtime")
        return self

    # -- derived -------------------------------------------------------------------------
    @property
    def effective_runtime(self) -> str | None:
        """``host`` when there is no image; otherwise the spec's choice or None (profile)."""
        return "host" if self.image is None else self.runtime

    @property
    def argv(self) -> list[str]:
        """The command as an argv list; a script runs under ``/bin/sh -c``."""
        if isinstance(self.command, str):
            return ["/bin/sh", "-c", self.command]
        return list(self.command)

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def canonical_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @property
    def spec_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_json().encode()).hexdigest()


def _canonical(info: ValidationInfo, value: Any) -> bool:
    """Stored (canonical) specs carry plain numbers: bytes and seconds."""
    return bool((info.context or {}).get("canonical")) and isinstance(value, int)


def _safe_relative(path: str) -> bool:
    if not path or path.startswith("/") or "\x00" in path or "\n" in path:
        return False
    return ".." not in Path(path).parts


# -- loading ---------------------------------------------------------------------------------

def valid_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


_MODELS_BY_FIELD: dict[str, type[BaseModel]] = {
    "resources": Resources, "gpus": GPUs, "retries": Retries, "inputs": Input}


def _issue_from(error: Mapping[str, Any]) -> FieldIssue:
    loc = [str(p) for p in error.get("loc", ())]
    # pydantic puts union member names and "function-after" tags in loc; drop them
    loc = [p for p in loc if not p.startswith(("function-", "tuple[", "str")) or p == "str"]
    loc = [p for p in loc if p not in ("str",)]
    path = ".".join(loc)
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        parent = next((p for p in reversed(loc[:-1]) if p in _MODELS_BY_FIELD), None)
        model = _MODELS_BY_FIELD.get(parent, JobSpec) if parent else JobSpec
        return FieldIssue(path, f"unknown key; valid keys here are: {', '.join(valid_keys(model))}")
    if kind == "missing":
        return FieldIssue(path, "required but missing")
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    if kind == "literal_error":
        message = message.replace("Input should be", "must be one of")
    if kind == "string_pattern_mismatch":
        message = f"{message}; use letters, digits, '.', '_', '-' (start with a letter or digit)"
    return FieldIssue(path, message)


def parse_spec(data: Any, *, base_dir: str | Path | None = None, source: str | None = None,
               check_inputs: bool = True) -> JobSpec:
    """Validate a mapping into a JobSpec, turning pydantic's errors into one SpecError."""
    if isinstance(data, JobSpec):
        return data
    if not isinstance(data, Mapping):
        raise SpecError(f"a job spec must be a mapping of keys to values, got {type(data).__name__}",
                        source=source)
    context = {"base_dir": str(base_dir) if base_dir else None, "check_inputs": check_inputs}
    try:
        return JobSpec.model_validate(dict(data), context=context)
    except ValidationError as exc:
        raise SpecError([_issue_from(e) for e in exc.errors()], source=source) from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads booleans as YAML 1.2 does: only
    true/false, so ``on:``, ``yes`` and ``no`` stay strings (``retries.on`` must work)."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"malformed YAML{at}: {problem}; fix the syntax", source=source) from None


def load_spec(path: str | Path, *, check_inputs: bool = True) -> JobSpec:
    """Read a YAML job spec; relative input paths are taken from the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec file {str(path)!r} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read spec file {str(path)!r}: {exc}") from None
    data = load_yaml(text, str(path))
    return parse_spec(data, base_dir=path.resolve().parent, source=str(path),
                      check_inputs=check_inputs)
