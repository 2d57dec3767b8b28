"""Optional accounting for the test cluster: a private mariadbd and slurmdbd, so ``sacct`` works.

Needs Debian's ``slurmdbd mariadb-server slurm-wlm-mysql-plugin``. Everything lives under
the cluster's folder (``db/``, ``run/``, ``log/``) on free loopback ports. The SlurmCluster
starts it before slurmctld and stops it after.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from gateway import proc

BINARIES = ("mariadbd", "mariadb-install-db", "slurmdbd", "sacctmgr", "start-stop-daemon")


def available() -> bool:
    return all(shutil.which(b) for b in BINARIES)


class Accounting:
    """mariadbd + slurmdbd for one test cluster; ``slurm_conf_lines`` goes into slurm.conf."""

    def __init__(self, base: Path, munge_socket: Path, db_port: int, dbd_port: int) -> None:
        self.base, self.munge_socket = base, munge_socket
        self.db_port, self.dbd_port = db_port, dbd_port
        self.db_socket = base / "run" / "mariadb.sock"
        self.db_pid = base / "run" / "mariadbd.pid"
        self.dbd_pid = base / "run" / "slurmdbd.pid"
        self.dbd_conf = base / "etc" / "slurmdbd.conf"

    def slurm_conf_lines(self) -> list[str]:
        return ["AccountingStorageType=accounting_storage/slurmdbd",
                "AccountingStorageHost=127.0.0.1", f"AccountingStoragePort={self.dbd_port}",
                f"AccountingStoragePass={self.munge_socket}",
                "JobAcctGatherType=jobacct_gather/none"]

    def start(self, env: dict[str, str], wait: Callable[[Callable[[], bool], str], object]) -> None:
        """Start mariadbd (fresh data folder) and slurmdbd; ``wait(ready, what)`` polls."""
        data = self.base / "db"
        shutil.rmtree(data, ignore_errors=True)
        proc.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                  "--auth-root-authentication-method=socket", "--skip-test-db"], timeout=120)
        proc.run(["start-stop-daemon", "--start", "--background", "--exec",
                  shutil.which("mariadbd") or "mariadbd", "--", "--no-defaults",
                  f"--datadir={data}", f"--socket={self.db_socket}", f"--port={self.db_port}",
                  "--bind-address=127.0.0.1", f"--pid-file={self.db_pid}",
                  f"--log-error={self.base / 'log' / 'mariadb.log'}", "--user=root",
                  "--skip-log-bin", "--innodb-buffer-pool-size=32M"], env=env)
        wait(self._db_up, "mariadbd to accept connections")
        self._sql("CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1'; "
                  "GRANT ALL ON *.* TO 'slurm'@'127.0.0.1'")
        self.dbd_conf.write_text(self._dbd_conf())
        self.dbd_conf.chmod(0o600)
        proc.run(["slurmdbd"], env=env, timeout=30)
        wait(self._dbd_up, "slurmdbd to answer `sacctmgr list cluster`")

    def register(self, cluster: str, env: dict[str, str]) -> None:
        """Add the cluster before slurmctld first connects (sacctmgr, idempotent)."""
        proc.run(["sacctmgr", "-i", "add", "cluster", cluster], env=env, check=False)

    def pids(self) -> list[Path]:
        return [self.dbd_pid, self.db_pid]

    def _dbd_conf(self) -> str:
        host = socket.gethostname().split(".")[0]
        return "\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            f"DbdHost={host}", "DbdAddr=127.0.0.1", f"DbdPort={self.dbd_port}",
            "SlurmUser=root", f"PidFile={self.dbd_pid}",
            f"LogFile={self.base / 'log' / 'slurmdbd.log'}",
            "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1",
            f"StoragePort={self.db_port}", "StorageUser=slurm",
            f"StorageLoc=hpcgw_acct_{self.dbd_port}", ""])

    def _sql(self, statement: str) -> proc.Result:
        return proc.run(["mariadb", "--no-defaults", f"--socket={self.db_socket}", "-u", "root",
                         "-e", statement], check=False, timeout=10)

    def _db_up(self) -> bool:
        return self.db_socket.exists() and self._sql("SELECT 1").returncode == 0

    def _dbd_up(self) -> bool:
        env = {"SLURM_CONF": str(self.base / "etc" / "slurm.conf")}
        res = proc.run(["sacctmgr", "-n", "list", "cluster"], env=env, check=False, timeout=10)
        return res.returncode == 0
