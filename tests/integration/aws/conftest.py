"""The moto server (EC2 + S3 on 127.0.0.1), a bucket, and the instance emulator."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from gateway.testing.require import require_tool

REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("moto.server", reason="needs moto[server]: pip install 'moto[server]'")
    require_tool("curl", "apt-get install curl")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start; see " + log.name)
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def aws_env(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Credentials for moto only, a fresh bucket per test (moto keeps state per server)."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_url


@pytest.fixture
def bucket(aws_env: str, request: pytest.FixtureRequest) -> str:
    import boto3

    name = "hpcgw-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    boto3.client("s3", endpoint_url=aws_env, region_name=REGION).create_bucket(Bucket=name)
    return name


@pytest.fixture
def emulator(aws_env: str, tmp_path: Path) -> Callable[..., Any]:
    from emulator import Emulator

    made: list[Emulator] = []

    def start(**kwargs: Any) -> Emulator:
        emu = Emulator(aws_env, REGION, tmp_path / "instances", **kwargs).__enter__()
        made.append(emu)
        return emu

    yield start
    for emu in made:
        emu.__exit__(None, None, None)


@pytest.fixture
def cloud(tmp_path: Path, aws_env: str, bucket: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """A gateway whose aws:test profile points at moto (test_aws_cloud.Cloud)."""
    from test_aws_cloud import Cloud

    made: list[Cloud] = []

    def make(**profile: Any) -> Cloud:
        owner = "".join(c if c.isalnum() or c in "_.-" else "-" for c in request.node.name)[:60]
        made.append(Cloud(tmp_path, aws_env, bucket, owner=owner, **profile))
        return made[-1]

    yield make
    for c in made:
        c.gw.close()
