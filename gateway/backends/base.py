"""The Backend seam: a handful of methods every place that runs jobs implements.

A backend never touches the store. The reconciler hands it attempts to submit, asks it in
ONE call per pass what its active attempts are doing, and asks it to find attempts it may
already have (``adopt``) after a crash between "intent written" and "reference recorded".
Every attempt carries the gateway's key (``hpcgw.<job_id>.<attempt>``) so it can be found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from gateway.errors import CapabilityError
from gateway.spec import JobSpec
from gateway.states import State


def attempt_key(job_id: str, attempt: int) -> str:
    """The name every backend gives an attempt (Slurm job name, EC2 tag, local folder)."""
    return f"hpcgw.{job_id}.{attempt}"


def parse_attempt_key(key: str) -> tuple[str, int] | None:
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "hpcgw" and parts[2].isdigit():
        return parts[1], int(parts[2])
    return None


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run at all; specs outside this are refused before submission."""

    max_nodes: int = 1
    max_cpus: int | None = None        # per job, all nodes together
    max_gpus: int = 0                  # per node
    gpu_types: frozenset[str] | None = None   # None: any type is accepted
    features: frozenset[str] | None = None    # None: any feature is accepted
    max_walltime: int | None = None    # seconds
    mpi: frozenset[str] = frozenset()
    runtimes: frozenset[str] = frozenset({"host"})
    arrays: bool = False
    remote_inputs: bool = False        # s3:// inputs

    def check(self, spec: JobSpec, backend: str) -> None:
        """Raise CapabilityError naming the field and the reason when ``spec`` cannot run."""
        res, problems = spec.resources, []
        if res.nodes > self.max_nodes:
            problems.append(f"resources.nodes={res.nodes}: {backend} runs at most {self.max_nodes} node(s)")
        if self.max_cpus is not None and res.total_cpus > self.max_cpus:
            problems.append(f"resources: {res.total_cpus} CPUs asked, {backend} has {self.max_cpus}")
        if res.gpus.count > self.max_gpus:
            problems.append(f"resources.gpus.count={res.gpus.count}: {backend} offers at most {self.max_gpus} per node")
        if res.gpus.count and res.gpus.type and self.gpu_types is not None \
                and res.gpus.type not in self.gpu_types:
            offered = ", ".join(sorted(self.gpu_types)) or "none"
            problems.append(f"resources.gpus.type={res.gpus.type!r}: {backend} offers {offered}")
        if self.features is not None:
            missing = sorted(set(spec.requires) - self.features)
            if missing:
                problems.append(f"requires: no {backend} node offers {', '.join(missing)}"
                                f" (offered: {', '.join(sorted(self.features)) or 'none'})")
        if self.max_walltime is not None and res.walltime > self.max_walltime:
            problems.append(f"resources.walltime={res.walltime}s is over {backend}'s limit of {self.max_walltime}s")
        if spec.mpi and spec.mpi not in self.mpi:
            problems.append(f"mpi={spec.mpi!r}: {backend} supports {', '.join(sorted(self.mpi)) or 'no MPI'}")
        if not self.remote_inputs and any(i.is_remote for i in spec.inputs):
            problems.append(f"inputs: {backend} cannot stage s3:// inputs; target aws or use local paths")
        if problems:
            raise CapabilityError(f"{backend} cannot run job {spec.name!r}:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Capacity:
    """Slots a backend that does no queueing of its own offers (the local machine)."""

    cpus: int
    gpus: int = 0


@dataclass(frozen=True)
class SubmitRequest:
    job_id: str
    attempt: int
    spec: JobSpec
    attempt_dir: Path      # per-attempt folder: logs, status, work; seen by the node
    argv: list[str]        # the command wrapped by the runtime, ready for the node
    env: dict[str, str]    # HPCGW_* variables plus the spec's env
    throttle: int | None = None  # at most this many of its group at once (a campaign's limit)

    @property
    def key(self) -> str:
        return attempt_key(self.job_id, self.attempt)


@dataclass(frozen=True)
class SubmitOutcome:
    """One per request: a reference, or why not (transient errors leave the job queued)."""

    key: str
    ref: str | None = None
    error: str | None = None
    transient: bool = False


@dataclass(frozen=True)
class Observation:
    """What the backend says about one attempt, already translated to gateway states."""

    ref: str
    state: State
    native: str | None = None         # the backend's own word (e.g. Slurm's OUT_OF_MEMORY)
    kind: str | None = None           # failure kind for retry policies
    exit_code: int | None = None
    reason: str | None = None         # pending reason or failure reason
    node: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    name: str

    def capabilities(self) -> Capabilities: ...
    def capacity(self) -> Capacity | None: ...
    def submit(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]: ...
    def poll(self, refs: Sequence[str]) -> dict[str, Observation]: ...
    def cancel(self, refs: Sequence[str]) -> None: ...
    def adopt(self, keys: Sequence[str]) -> dict[str, str]: ...
    def log_paths(self, ref: str, attempt_dir: Path) -> dict[str, Path]: ...


def check_capabilities(backend: Backend, spec: JobSpec) -> None:
    caps = backend.capabilities()
    caps.check(spec, backend.name)
    if spec.image is not None and spec.runtime is None \
            and not caps.runtimes & {"podman", "charliecloud", "apptainer"}:
        raise CapabilityError(f"{backend.name} has no container runtime for image {spec.image!r} "
                              "(configure one, e.g. local.runtimes: [host, podman])")
    if spec.effective_runtime and spec.effective_runtime not in caps.runtimes:
        raise CapabilityError(f"{backend.name} cannot use runtime {spec.effective_runtime!r} "
                              f"(configured: {', '.join(sorted(caps.runtimes))})")
