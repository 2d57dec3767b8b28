"""A test-side stand-in for EC2's virtual machines, against a moto server.

It watches moto for running instances that carry the gateway's tags, fetches each one's
real user-data and runs it with bash on this machine, in a scratch folder per instance:
``HPCGW_NODE_ROOT`` points the bootstrap at that folder, ``HPCGW_IMDS`` at a metadata stub
on 127.0.0.1 (IMDSv2 token, spot interruption notice, ``local-ipv4`` = 127.0.0.1: every
emulated node of a multi-node attempt is this machine, as a separate bash process), and ``poweroff``/``shutdown`` on the
script's PATH terminate the instance in moto. Everything else (curl to presigned S3 URLs,
sha256 checks, the job, the uploads) runs for real. An instance moto reports as terminated
(cancelled or reaped by the gateway) has its processes killed, as a vanishing VM would.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import boto3

SHIM = """#!{python}
import os, time, boto3
time.sleep(float(os.environ.get("EMU_POWEROFF_DELAY") or 0))
boto3.client("ec2", endpoint_url=os.environ["EMU_ENDPOINT"], region_name=os.environ["EMU_REGION"],
             aws_access_key_id="testing", aws_secret_access_key="testing").terminate_instances(
    InstanceIds=[os.environ["EMU_INSTANCE_ID"]])
"""


class _Imds(BaseHTTPRequestHandler):
    emulator: "Emulator"

    def log_message(self, *args: Any) -> None:
        pass

    def _instance(self) -> tuple[str, str]:
        _, instance, rest = self.path.split("/", 2)
        return instance, "/" + rest

    def do_PUT(self) -> None:
        instance, path = self._instance()
        ok = path == "/latest/api/token" and "X-aws-ec2-metadata-token-ttl-seconds" in self.headers
        self._answer(200 if ok else 400, b"token-" + instance.encode())

    def do_GET(self) -> None:
        instance, path = self._instance()
        if self.headers.get("X-aws-ec2-metadata-token") != f"token-{instance}":
            self._answer(401, b"")
        elif path == "/latest/meta-data/spot/instance-action" and instance in self.emulator.interrupted:
            self._answer(200, b'{"action": "terminate", "time": "2026-01-01T00:00:00Z"}')
        elif path == "/latest/meta-data/local-ipv4":
            self._answer(200, b"127.0.0.1")
        else:
            self._answer(404, b"")

    def _answer(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Emulator:
    """Runs the user-data of every tagged running instance. ``ignore(tags)`` leaves an
    instance silent (it never reports); ``interrupt(tags)`` gives it a spot notice
    ``interrupt_after`` seconds after its bootstrap started; ``poweroff_delay(tags)``:
    seconds its poweroff takes (a slow shutdown: the instance stays running meanwhile)."""

    def __init__(self, endpoint: str, region: str, root: Path, owner: str,
                 ignore: Callable[[dict[str, str]], bool] = lambda t: False,
                 interrupt: Callable[[dict[str, str]], bool] = lambda t: False,
                 interrupt_after: float = 1.5,
                 poweroff_delay: Callable[[dict[str, str]], float] = lambda t: 0.0) -> None:
        self.endpoint, self.region, self.root, self.owner = endpoint, region, root, owner
        self.poweroff_delay = poweroff_delay
        self.ignore, self.interrupt, self.interrupt_after = ignore, interrupt, interrupt_after
        self.ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name=region,
                                aws_access_key_id="testing", aws_secret_access_key="testing")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, float] = {}
        self.to_interrupt: set[str] = set()
        self.interrupted: set[str] = set()
        self.ran: list[dict[str, str]] = []
        self._stop = threading.Event()
        handler = type("Imds", (_Imds,), {"emulator": self})
        self.imds = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._threads = [threading.Thread(target=self.imds.serve_forever, daemon=True),
                         threading.Thread(target=self._loop, daemon=True)]
        self.shims = root / "shims"
        self.shims.mkdir(parents=True, exist_ok=True)
        for name in ("poweroff", "shutdown"):
            (self.shims / name).write_text(SHIM.format(python=sys.executable))
            (self.shims / name).chmod(0o755)

    def __enter__(self) -> "Emulator":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._threads[1].join(timeout=10)
        self.imds.shutdown()
        for proc in self.procs.values():
            _kill(proc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # keep emulating; the test sees the effects
                print(f"emulator: {exc!r}", file=sys.stderr)
            self._stop.wait(0.2)

    def _tick(self) -> None:
        pages = self.ec2.describe_instances(Filters=[{"Name": "tag:hpcgw:owner", "Values": [self.owner]}])
        now = time.monotonic()
        for res in pages["Reservations"]:
            for inst in res["Instances"]:
                iid, state = inst["InstanceId"], inst["State"]["Name"]
                tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
                if state in ("running", "pending") and iid not in self.procs and not self.ignore(tags):
                    self._boot(iid, tags)
                elif state in ("shutting-down", "terminated") and iid in self.procs:
                    _kill(self.procs[iid])
                if iid in self.to_interrupt and now - self.started[iid] >= self.interrupt_after:
                    self.interrupted.add(iid)

    def _boot(self, iid: str, tags: dict[str, str]) -> None:
        attr = self.ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")
        script = base64.b64decode(attr["UserData"]["Value"]).decode()
        folder = self.root / iid
        folder.mkdir(parents=True)
        (folder / "user-data.sh").write_text(script)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HPCGW_"))},
               "PATH": f"{self.shims}:{os.environ['PATH']}", "HPCGW_NODE_ROOT": str(folder),
               "HPCGW_IMDS": f"http://127.0.0.1:{self.imds.server_address[1]}/{iid}",
               "EMU_ENDPOINT": self.endpoint, "EMU_REGION": self.region, "EMU_INSTANCE_ID": iid,
               "EMU_POWEROFF_DELAY": str(self.poweroff_delay(tags))}
        log = open(folder / "bootstrap.log", "wb")
        self.procs[iid] = subprocess.Popen(["bash", str(folder / "user-data.sh")], env=env,
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                           start_new_session=True, cwd=folder)
        self.started[iid] = time.monotonic()
        self.ran.append({"instance": iid, **tags})
        if self.interrupt(tags):
            self.to_interrupt.add(iid)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
