"""AWS API calls per job: launch, polling and staging, for 1 and 100 concurrent jobs.

    python3 tests/benchmarks/bench_aws.py [--jobs 1 100] [--out FILE.json]

Starts a moto server on 127.0.0.1 and the test instance emulator; counts the gateway's own
EC2 and S3 calls with a botocore ``before-call`` hook (the backend's ``calls`` counter).
Presigned URL requests the instances make (logs, outputs, status) are not API calls the
gateway makes and are not counted. Phases, each with its own count:

  launch   one reconciler pass that submits N jobs (tag lookup, staging, run_instances)
  poll     one pass with N running instances (nothing has ended yet)
  finish   passes until every job is done (collecting status, logs and outputs)
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration" / "aws"))


def _moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto did not start")


def _delta(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in sorted(after) if after[k] - before[k]}


def run(n: int, url: str, work: Path) -> dict[str, object]:
    import os

    import boto3

    from emulator import Emulator
    from gateway.api import Gateway

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    bucket = f"bench-{n}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=bucket)
    profile = {"endpoint_url": url, "bucket": bucket, "owner": f"bench{n}", "runtime": "host",
               "log_interval_s": 60, "grace_s": 2}
    gw = Gateway({"data_dir": str(work / f"home{n}"), "agent": {"lost_after_misses": 50},
                  "backends": {"aws": {"profiles": {"bench": profile}}}})
    ids = []
    for i in range(n):
        data = work / f"in{n}-{i}.txt"
        data.write_text(f"input {i}\n")
        ids.append(gw.submit({"name": f"b{i}", "target": "aws:bench", "command": ["cp", data.name, "out.txt"],
                              "inputs": [str(data)], "outputs": ["out.txt"]}, start=False).id)
    backend = gw.backends.get("aws:bench")
    phases: dict[str, dict[str, int]] = {}
    t0 = time.monotonic()
    before = Counter(backend.calls)
    gw.reconcile(block=True)
    phases["launch"] = _delta(before, backend.calls)
    before = Counter(backend.calls)
    gw.reconcile(block=True)
    phases["poll"] = _delta(before, backend.calls)
    before = Counter(backend.calls)
    passes = 0
    with Emulator(url, "us-east-1", work / f"instances{n}", owner=f"bench{n}"):
        while any(not gw.store.get(i).state.terminal for i in ids):
            gw.reconcile(block=True)
            passes += 1
            time.sleep(0.5)
    phases["finish"] = _delta(before, backend.calls)
    states = Counter(gw.store.get(i).state.value for i in ids)
    total = sum(sum(p.values()) for p in phases.values())
    gw.close()
    return {"jobs": n, "phases": phases, "finish_passes": passes, "states": dict(states),
            "calls_total": total, "calls_per_job": round(total / n, 2),
            "seconds": round(time.monotonic() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--out")
    args = parser.parse_args()
    proc, url = _moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = [run(n, url, Path(tmp)) for n in args.jobs]
    finally:
        proc.terminate()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
