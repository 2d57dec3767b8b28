"""A real, private Slurm cluster on this machine, for tests and for trying the backend by hand.

Everything lives under one folder (config, munge key and socket, state, spool, logs, pid
files) and uses free non-default ports, so it never meets a site's Slurm or another test run.
Modes:

- ``single``: one slurmd ``c1`` declaring 16 CPUs, 64 GiB, two fake GPUs (``gpu:fake:2``,
  device files are /dev/null symlinks) and features ``ib,avx512``
  (``SlurmdParameters=config_overrides`` lets it declare more than the machine has).
- ``two-node``: slurmd ``n1`` and ``n2``, each in its own UTS namespace, for multi-node MPI.

By hand::

    python -m gateway.testing.slurm_cluster up --dir /tmp/sc [--two-node]   # prints export SLURM_CONF=...
    python -m gateway.testing.slurm_cluster down --dir /tmp/sc

The daemons fork into the background, so ``up`` returns; ``down`` (or ``stop()``) cancels the
jobs, shuts the daemons down, stops munged and kills whatever still carries this SLURM_CONF.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Literal

from gateway import proc
from gateway.errors import BackendUnavailable, CommandError
from gateway.testing.slurm_accounting import Accounting

Mode = Literal["single", "two-node"]
POLL = 0.2
READY_TIMEOUT = 60.0
PARTITION_MAXTIME = "2-00:00:00"


def binaries_present() -> bool:
    """True when the Debian packages the harness needs are installed."""
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "mungekey", "sbatch"))


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port_run(count: int, seed: str) -> int:
    """First port of ``count`` consecutive free ports, searched from a spot derived from ``seed``."""
    start = 20000 + (sum(seed.encode()) * 7919) % 20000
    for base in range(start, start + 5000, count + 1):
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise BackendUnavailable(f"no {count} consecutive free ports near {start}")


class SlurmCluster:
    """A private slurmctld + slurmd(s) + munged under ``base_dir``; a context manager."""

    def __init__(self, base_dir: str | os.PathLike[str], mode: Mode = "single", *,
                 accounting: bool = False, min_job_age: int = 600, cpus: int = 16,
                 extra_conf: tuple[str, ...] = ()) -> None:
        if mode not in ("single", "two-node"):
            raise ValueError(f"mode must be 'single' or 'two-node', not {mode!r}")
        self.base = Path(base_dir).resolve()
        self.mode: Mode = mode
        self.accounting = accounting      # slurmdbd + mariadbd, so sacct works
        self.min_job_age = min_job_age    # seconds slurmctld keeps finished jobs
        self.cpus = cpus                  # CPUs c1 declares (throughput ~ CPUs per pass)
        self.extra_conf = tuple(extra_conf)  # more slurm.conf lines (e.g. MaxJobCount=50000)
        self._acct: Accounting | None = None
        self.conf = self.base / "etc" / "slurm.conf"
        self.nodes = ["c1"] if mode == "single" else ["n1", "n2"]
        self.munge_socket = self.base / "munge" / "munge.socket"
        self.munge_pid = self.base / "run" / "munged.pid"

    # -- public -------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment to give every Slurm client command that should talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def start(self) -> SlurmCluster:
        """Write the config, start munged, slurmctld and the slurmd(s); wait until nodes are idle."""
        self.stop()  # a previous run in the same folder must not linger
        shutil.rmtree(self.base / "state", ignore_errors=True)  # no old jobs, ids from 1
        for sub in ("etc", "munge", "run", "log", "state", "spool", "tmp", "gres"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.base / "tmp" / node).mkdir(exist_ok=True)
        try:
            self._start_munge()
            self._write_config()
            if self._acct is not None:
                self._acct.start(self._marker_env(), self._wait)
                self._acct.register(self.cluster_name, self.env)
            self._daemon(["slurmctld", "-i", "-f", str(self.conf)])
            self._wait(self._ctld_up, "slurmctld to answer `scontrol ping`")
            for node in self.nodes:
                self._start_slurmd(node)
            self._wait(self._nodes_idle, "every node to be idle in `sinfo`")
        except BaseException:
            tail = self.log_tail()
            self.stop()
            if tail:
                sys.stderr.write(tail)
            raise
        return self

    def stop(self) -> None:
        """Leave no process behind: jobs, daemons, munged, stray job processes."""
        if self.conf.exists() and self._pid_alive(self._pid("slurmctld")):
            self._client(["scancel", "--full", "--user", "root"])
            self._wait(self._queue_empty, "jobs to leave the queue", timeout=10, fail=False)
            self._client(["scontrol", "shutdown"])
        daemons = [self._pid("slurmctld")] + [self._pid(f"slurmd-{n}") for n in self.nodes]
        self._reap([p for p in daemons if p], timeout=10)
        dbd = [self._pid("slurmdbd"), self._pid("mariadbd")]  # present only with accounting
        self._reap([p for p in dbd if p], timeout=20)
        self._kill_marked()
        munged = self._read_pid(self.munge_pid)
        if munged:
            self._reap([munged], timeout=5)
        self._kill_marked()

    def restart_controller(self) -> None:
        """Start slurmctld again (after ``stop_controller``), recovering its saved state."""
        self._daemon(["slurmctld", "-f", str(self.conf)])
        self._wait(self._ctld_up, "slurmctld to answer `scontrol ping`")

    def stop_controller(self) -> None:
        """Kill slurmctld only (nodes and jobs stay), to test how clients see an outage."""
        pid = self._pid("slurmctld")
        if pid:
            self._reap([pid], timeout=10)

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.base / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"== {log}\n" + "\n".join(text) + "\n")
        return "".join(out)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- start-up -----------------------------------------------------------------------
    def _start_munge(self) -> None:
        key = self.base / "munge" / "munge.key"
        if not key.exists():
            proc.run(["mungekey", "-c", "-k", str(key)])
        key.chmod(0o600)
        (self.base / "munge").chmod(0o755)
        proc.run(["munged", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                  f"--pid-file={self.munge_pid}", f"--log-file={self.base / 'log' / 'munged.log'}",
                  f"--seed-file={self.base / 'munge' / 'munged.seed'}"], env=self._marker_env())
        self._wait(self.munge_socket.exists, "munged's socket")

    def _start_slurmd(self, node: str) -> None:
        if self.mode == "single":
            self._daemon(["slurmd", "-f", str(self.conf), "-N", node])
        else:  # each slurmd sees its own hostname, so srun -N2 hostname prints n1, n2
            inner = f'hostname {node} && exec slurmd -f "$0" -N {node}'
            self._daemon(["unshare", "--uts", "sh", "-c", inner, str(self.conf)])

    @property
    def cluster_name(self) -> str:
        info = json.loads((self.base / "cluster.json").read_text())
        return f"hpcgwtest{info['ctld_port']}"

    def _write_config(self) -> None:
        count = 1 + len(self.nodes)
        ports = free_port_run(count + (2 if self.accounting else 0), str(self.base))
        extra = [f"MinJobAge={self.min_job_age}", *self.extra_conf]
        if self.accounting:
            self._acct = Accounting(self.base, self.munge_socket, ports + count, ports + count + 1)
            extra += self._acct.slurm_conf_lines()
        else:
            extra += ["AccountingStorageType=accounting_storage/none",
                      "JobAcctGatherType=jobacct_gather/none"]
        self.conf.write_text(render_slurm_conf(self.base, self.mode, ports, self.munge_socket,
                                               extra, cpus=self.cpus))
        gres = self.base / "gres"
        lines = ["AutoDetect=off"]
        if self.mode == "single":
            for i in range(2):
                dev = gres / f"nvidia{i}"
                if not dev.is_symlink():
                    dev.symlink_to("/dev/null")
            lines.append(f"NodeName=c1 Name=gpu Type=fake File={gres}/nvidia[0-1]")
        (self.base / "etc" / "gres.conf").write_text("\n".join(lines) + "\n")
        (self.base / "cluster.json").write_text(json.dumps(
            {"mode": self.mode, "ctld_port": ports, "conf": str(self.conf),
             "accounting": self.accounting}))

    def _marker_env(self) -> dict[str, str]:
        """Every daemon (and so every slurmstepd) carries SLURM_CONF; stop() finds strays by it."""
        return {"SLURM_CONF": str(self.conf)}

    def _daemon(self, argv: list[str]) -> None:
        proc.run(argv, env=self._marker_env(), timeout=30)

    def _client(self, argv: list[str]) -> proc.Result | None:
        try:
            return proc.run(argv, env=self.env, timeout=10, check=False)
        except BackendUnavailable:
            return None

    # -- readiness ----------------------------------------------------------------------
    def _ctld_up(self) -> bool:
        res = self._client(["scontrol", "ping"])
        return res is not None and res.returncode == 0 and "is UP" in res.stdout

    def _nodes_idle(self) -> bool:
        res = self._client(["sinfo", "-h", "-N", "-o", "%N %T"])
        if res is None or res.returncode != 0:
            return False
        states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
        return set(states) == set(self.nodes) and all(s == "idle" for s in states.values())

    def _queue_empty(self) -> bool:
        res = self._client(["squeue", "-h", "-o", "%i"])
        return res is not None and res.returncode == 0 and not res.stdout.strip()

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT,
              fail: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return True
            time.sleep(POLL)
        if fail:
            raise BackendUnavailable(f"test cluster in {self.base}: timed out waiting for {what}\n"
                                     + self.log_tail())
        return False

    # -- processes ----------------------------------------------------------------------
    def _pid(self, name: str) -> int | None:
        return self._read_pid(self.base / "run" / f"{name}.pid")

    @staticmethod
    def _read_pid(path: Path) -> int | None:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _pid_alive(pid: int | None) -> bool:
        """Alive and not a zombie (PID 1 here reaps slowly, so kill -0 is not enough)."""
        if not pid:
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")

    def _reap(self, pids: list[int], timeout: float) -> None:
        """SIGTERM, wait for the processes to end, then SIGKILL what is left."""
        live = [p for p in pids if self._pid_alive(p) and self._ours(p)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in live:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout
            while live and time.monotonic() < deadline:
                live = [p for p in live if self._pid_alive(p)]
                if live:
                    time.sleep(POLL)
            if not live:
                return

    def _ours(self, pid: int) -> bool:
        """A pid from a pid file is only ours if the process still carries our SLURM_CONF."""
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False
        return f"SLURM_CONF={self.conf}".encode() in environ

    def _marked(self) -> Iterator[int]:
        """Processes (not us, not our ancestors) whose environment holds our SLURM_CONF."""
        spare = set(_ancestors())
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) not in spare and self._ours(int(entry.name)):
                yield int(entry.name)

    def _kill_marked(self) -> None:
        strays = [p for p in self._marked() if self._pid_alive(p)]
        if strays:
            self._reap(strays, timeout=3)


def _ancestors() -> Iterator[int]:
    pid = os.getpid()
    while pid > 1:
        yield pid
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        pid = int(stat.rsplit(")", 1)[1].split()[1])


def render_slurm_conf(base: Path, mode: Mode, port: int, munge_socket: Path,
                      extra: list[str], cpus: int = 16) -> str:
    """slurm.conf for the private cluster; ``port`` is slurmctld's, the slurmd(s) follow it."""
    host = socket.gethostname().split(".")[0]
    lines = [
        f"ClusterName=hpcgwtest{port}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={port}",
        "AuthType=auth/munge", f"AuthInfo=socket={munge_socket}", "CryptoType=crypto/munge",
        "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={base}/state", f"SlurmdSpoolDir={base}/spool/%n",
        f"SlurmctldPidFile={base}/run/slurmctld.pid", f"SlurmdPidFile={base}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={base}/log/slurmctld.log", f"SlurmdLogFile={base}/log/slurmd-%n.log",
        f"TmpFS={base}/tmp/%n",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
        "SlurmdParameters=config_overrides", "ReturnToService=2", "EnforcePartLimits=ALL",
        "MpiDefault=none", "GresTypes=gpu", "DefMemPerCPU=512", *extra,
        # slurmctld listens on 127.0.0.1 only; node names need not resolve
        "CommunicationParameters=NoCtldInAddrAny",
        "JobCompType=jobcomp/filetxt", f"JobCompLoc={base}/log/jobcomp.txt",
        "SlurmctldTimeout=30", "SlurmdTimeout=60", "InactiveLimit=0", "KillWait=5",
        "MessageTimeout=5",
    ]
    if mode == "single":
        lines += [
            (f"NodeName=c1 NodeAddr=127.0.0.1 NodeHostname=localhost Port={port + 1} CPUs={cpus} "
             "RealMemory=65536 Gres=gpu:fake:2 Feature=ib,avx512 State=UNKNOWN"),
            f"PartitionName=debug Nodes=c1 Default=YES MaxTime={PARTITION_MAXTIME} State=UP",
            f"PartitionName=gpu Nodes=c1 MaxTime={PARTITION_MAXTIME} State=UP",
        ]
    else:
        lines += [
            (f"NodeName=n[1-2] NodeAddr=127.0.0.1 NodeHostname=localhost "
             f"Port={port + 1}-{port + 2} CPUs=4 RealMemory=8192 Feature=ib,avx512 State=UNKNOWN"),
            f"PartitionName=debug Nodes=n[1-2] Default=YES MaxTime={PARTITION_MAXTIME} State=UP",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.testing.slurm_cluster",
                                     description="Start or stop a private Slurm test cluster.")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", required=True, help="folder that holds everything of this cluster")
    parser.add_argument("--two-node", action="store_true", help="two slurmd n1, n2 (for MPI)")
    parser.add_argument("--accounting", action="store_true",
                        help="also start mariadbd + slurmdbd so sacct works")
    args = parser.parse_args(argv)
    info = Path(args.dir) / "cluster.json"
    mode: Mode = "two-node" if args.two_node else "single"
    if args.action == "down" and info.exists():
        mode = json.loads(info.read_text()).get("mode", mode)
    cluster = SlurmCluster(args.dir, mode, accounting=args.accounting)
    try:
        if args.action == "up":
            cluster.start()
            print(f"export SLURM_CONF={cluster.conf}")
        else:
            cluster.stop()
    except (BackendUnavailable, CommandError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
