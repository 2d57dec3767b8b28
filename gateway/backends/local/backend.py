"""The local backend: each attempt is a detached supervisor process on this machine.

Submission spawns ``python -m gateway.node supervise DIR`` in its own session, so the job
outlives the CLI or agent that started it. The reference of an attempt is its key, which
names its folder, so submitting the same attempt twice cannot run it twice (the node
runner's exclusive claim) and adoption after a crash is a look at the folder.
"""

from __future__ import annotations

import os
import signal
import sys
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from gateway.attempts import observation_from_status
from gateway.backends.base import (Capabilities, Capacity, Observation, SubmitOutcome,
                                   SubmitRequest, parse_attempt_key)
from gateway.node import alive, proc_start_ticks, read_json, write_json_atomic
from gateway.spec import JobSpec
from gateway.states import State

# Start the node runner from this very installation, even from a source checkout.
_BOOT = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r}); "
         "from gateway.node import main; sys.exit(main())")


@lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """Node features of this machine: a few CPU flags users ask for, plus ``local``."""
    wanted = {"avx", "avx2", "avx512f", "fma", "sse4_2", "neon", "sve"}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset({"local"})
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    found = flags & wanted
    if "avx512f" in found:
        found.add("avx512")
    return frozenset(found | {"local"})


class LocalBackend:
    name = "local"

    def __init__(self, jobs_root: str | Path, *, cpus: int, gpus: int = 0,
                 runtimes: Sequence[str] = ("host",), python: str | None = None):
        self.jobs_root = Path(jobs_root)
        self.cpus, self.gpus = cpus, gpus
        self.runtimes = frozenset(runtimes)
        self.python = python or sys.executable
        self._children: list[int] = []

    @property
    def default_runtime(self) -> str:
        """For jobs with an image and no runtime: podman, else charliecloud, else apptainer."""
        return next((r for r in ("podman", "charliecloud", "apptainer") if r in self.runtimes),
                    "host")

    def capabilities(self) -> Capabilities:
        return Capabilities(max_nodes=1, max_cpus=self.cpus, max_gpus=self.gpus,
                            features=cpu_features(), mpi=frozenset({"mpirun"}),
                            runtimes=self.runtimes)

    def capacity(self) -> Capacity:
        return Capacity(cpus=self.cpus, gpus=self.gpus)

    def launcher(self, spec: JobSpec, argv: list[str]) -> list[str]:
        """``mpi: mpirun`` runs the command as nodes x tasks_per_node ranks under mpirun."""
        if spec.mpi != "mpirun":
            return argv
        ranks = spec.resources.nodes * spec.resources.tasks_per_node
        prefix = ["mpirun", "-n", str(ranks), "--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            prefix += ["--allow-run-as-root"]
        return prefix + argv

    def attempt_dir(self, ref: str) -> Path:
        parsed = parse_attempt_key(ref)
        if parsed is None:
            raise ValueError(f"not a local attempt reference: {ref!r}")
        return self.jobs_root / parsed[0] / str(parsed[1])

    # -- submit ---------------------------------------------------------------------------
    def submit(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]:
        self._reap()
        outcomes = []
        for request in requests:
            adir = request.attempt_dir
            try:
                pid = self._spawn(adir)
            except OSError as exc:
                outcomes.append(SubmitOutcome(request.key, error=f"cannot start: {exc}",
                                              transient=True))
                continue
            self._children.append(pid)
            write_json_atomic(adir / "spawned.json", {"pid": pid, "ticks": proc_start_ticks(pid)})
            outcomes.append(SubmitOutcome(request.key, ref=request.key))
        return outcomes

    def _spawn(self, adir: Path) -> int:
        """Start the supervisor in its own session (posix_spawn: vfork-fast, no shell)."""
        argv = [self.python, "-S", "-E", "-c", _BOOT, "supervise", str(adir)]
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 2, str(adir / "supervisor.log"),
                    os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)]
        return os.posix_spawn(self.python, argv, dict(os.environ), file_actions=actions,
                              setsid=True)

    def _reap(self) -> None:
        """Collect supervisors this process started that have ended (no zombies)."""
        running = []
        for pid in self._children:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if not done:
                running.append(pid)
        self._children = running

    # -- observe --------------------------------------------------------------------------
    def poll(self, refs: Sequence[str]) -> dict[str, Observation]:
        self._reap()
        seen = {}
        for ref in refs:
            observation = self._observe(ref, self.attempt_dir(ref))
            if observation is not None:
                seen[ref] = observation
        return seen

    def _observe(self, ref: str, adir: Path) -> Observation | None:
        status = read_json(adir / "status.json")
        if status is not None:
            return observation_from_status(ref, status)
        running = read_json(adir / "running.json")
        owner = read_json(adir / "claim")
        if owner is not None:
            if alive(owner.get("pid"), owner.get("ticks")):
                if running is None:
                    return Observation(ref, State.QUEUED, native="staging")
                return Observation(ref, State.RUNNING, native="running", node=running.get("host"),
                                   started_at=running.get("started_at"))
            return None  # its supervisor died without a word: missing, soon LOST
        spawned = read_json(adir / "spawned.json")
        if spawned is not None and alive(spawned.get("pid"), spawned.get("ticks")):
            return Observation(ref, State.QUEUED, native="starting")
        return None

    # -- cancel ---------------------------------------------------------------------------
    def cancel(self, refs: Sequence[str]) -> None:
        for ref in refs:
            adir = self.attempt_dir(ref)
            if not adir.exists() or (adir / "status.json").exists():
                continue
            (adir / "cancel").touch()
            owner = read_json(adir / "claim") or read_json(adir / "spawned.json")
            if owner and alive(owner.get("pid"), owner.get("ticks")):
                _signal(owner["pid"], signal.SIGTERM)
                continue
            running = read_json(adir / "running.json")  # supervisor gone, child maybe not
            if running and alive(running.get("pid"), running.get("ticks")):
                _signal(-int(running["pid"]), signal.SIGKILL)

    def adopt(self, keys: Sequence[str]) -> dict[str, str]:
        found = {}
        for key in keys:
            adir = self.attempt_dir(key)
            if (adir / "claim").exists() or (adir / "status.json").exists():
                found[key] = key
            else:
                spawned = read_json(adir / "spawned.json")
                if spawned and alive(spawned.get("pid"), spawned.get("ticks")):
                    found[key] = key
        return found

    def log_paths(self, ref: str, attempt_dir: Path) -> dict[str, Path]:
        return {"stdout": attempt_dir / "stdout", "stderr": attempt_dir / "stderr"}


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
