"""Running Dask clusters, one small JSON file each under ``DATA_DIR/dask/<name>.json``.

The file says where the scheduler is and who owns it (host, pid and the pid's start time,
so a reused pid is not mistaken for the owner). Worker jobs are NOT listed here: they are
gateway jobs labelled ``hpcgw.dask=<name>``, and the store is their one record. Files are
written atomically (write, then rename), so a reader sees the old or the new file.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.errors import NotFoundError
from gateway.node import alive, proc_start_ticks, read_json, write_json_atomic

if TYPE_CHECKING:
    from gateway.store import Store


@dataclass(frozen=True)
class Owner:
    """The process whose exit ends the cluster (the notebook's kernel, or the scheduler job)."""

    host: str
    pid: int
    ticks: int | None = None
    job_id: str | None = None       # when the scheduler itself runs as a gateway job

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), proc_start_ticks(os.getpid()))

    def alive_here(self) -> bool | None:
        """True/False when this host can tell; None for an owner on another host."""
        if self.host != socket.gethostname():
            return None
        return alive(self.pid, self.ticks)

    def alive_in(self, store: Store) -> bool | None:
        """Is the cluster's owner alive? A scheduler job is alive while it is unfinished in
        the store (whoever created it); a process, while it runs (None: another host)."""
        if self.job_id is None:
            return self.alive_here()
        try:
            return not store.get(self.job_id).state.terminal
        except NotFoundError:
            return False

    def describe(self) -> str:
        return f"job {self.job_id}" if self.job_id else f"{self.host}:{self.pid}"


@dataclass(frozen=True)
class ClusterRecord:
    name: str
    address: str
    target: str
    owner: Owner
    dashboard: str | None = None
    created_at: float = field(default_factory=time.time)
    scheduler: str = "local"        # "local": beside the notebook; "job": a gateway job
    options: dict[str, Any] = field(default_factory=dict)   # workers, walltime, image, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterRecord:
        owner = Owner(**data["owner"])
        rest = {k: v for k, v in data.items() if k != "owner" and k in cls.__dataclass_fields__}
        return cls(owner=owner, **rest)


class Registry:
    """The folder of cluster files; every method is one small filesystem operation."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def write(self, record: ClusterRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path(record.name), record.to_dict(), durable=True)

    def get(self, name: str) -> ClusterRecord | None:
        data = read_json(self.path(name))
        if not isinstance(data, dict):
            return None
        try:
            return ClusterRecord.from_dict(data)
        except (KeyError, TypeError):
            return None

    def all(self) -> list[ClusterRecord]:
        if not self.root.is_dir():
            return []
        found = (self.get(p.stem) for p in sorted(self.root.glob("*.json")))
        return [r for r in found if r is not None]

    def scheduler_file(self, name: str) -> Path:
        """Where a scheduler job (``scheduler="job"``) writes its address."""
        return self.root / "scheduler" / f"{name}.json"

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)
        self.scheduler_file(name).unlink(missing_ok=True)
