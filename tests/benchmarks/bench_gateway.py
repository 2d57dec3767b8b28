"""Gateway benchmarks on the local backend, all measured in one run.

    python3 tests/benchmarks/bench_gateway.py [--jobs 1000] [--records 100000] [--out FILE.json]

1. 1,000 trivial jobs (`true`): submit time, time until all SUCCEEDED, throughput, and
   submit-to-running latency (job created -> its process started, from the node's own clock
   record), against the floor of starting the same 1,000 processes with subprocess directly.
2. Cold start of `hpcgw --help` and `hpcgw ls` against `python -c pass` (median of runs).
3. `hpcgw ls` (newest 50) and `hpcgw ls --state FAILED` with 100,000 job records in the store.

Figures go to stdout as a Markdown table (copy them into docs/benchmarks.md) and, with
--out, to a JSON file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCGW_")}
    env.update(HPCGW_DATA_DIR=str(data_dir), HPCGW_CONFIG=str(data_dir / "none.yaml"), **extra)
    (data_dir / "none.yaml").write_text("{}\n")
    return env


def _median_time(argv: list[str], env: dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_jobs(n: int) -> dict[str, float]:
    from gateway.api import Gateway
    from gateway.config import load_config
    from gateway.node import read_json

    with tempfile.TemporaryDirectory() as tmp:
        env = _env(Path(tmp), HPCGW_LOCAL__CPUS="64")
        gw = Gateway(load_config(environ=env))
        start = time.perf_counter()
        jobs = gw.submit_many([{"name": f"t{i}", "command": ["true"]} for i in range(n)], start=False)
        submitted = time.perf_counter() - start
        passes = 0
        while True:
            gw.reconcile(block=True)
            passes += 1
            counts = gw.store.counts()
            if counts.get("SUCCEEDED", 0) + counts.get("FAILED", 0) == n:
                break
        total = time.perf_counter() - start
        latencies = []
        for record in gw.store.jobs():
            run = read_json(gw.config.jobs_path / record.id / "1" / "status.json") or {}
            if run.get("started_at"):
                latencies.append(run["started_at"] - record.created_at)
        assert counts.get("SUCCEEDED") == n, counts
        assert len(jobs) == n
    floor_start = time.perf_counter()
    for _ in range(n):
        subprocess.run(["true"], check=True)
    floor = time.perf_counter() - floor_start
    latencies.sort()
    return {"jobs": n, "submit_s": submitted, "all_done_s": total, "jobs_per_s": n / total,
            "passes": passes, "latency_p50_s": latencies[len(latencies) // 2],
            "latency_p95_s": latencies[int(len(latencies) * 0.95)],
            "subprocess_floor_s": floor, "ratio_to_floor": total / floor}


def bench_single(runs: int = 5) -> dict[str, float]:
    """One job end to end through the CLI, as a user types it."""
    with tempfile.TemporaryDirectory() as tmp:
        env = _env(Path(tmp))
        argv = [sys.executable, "-m", "gateway.cli.main", "run", "--wait", "--", "true"]
        cli = _median_time(argv, env, runs)
        plain = _median_time(["true"], env, runs)
    return {"run_wait_true_s": cli, "plain_true_s": plain}


def bench_cold_start(runs: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = _env(Path(tmp))
        base = _median_time([sys.executable, "-c", "pass"], env, runs)
        helps = _median_time([sys.executable, "-m", "gateway.cli.main", "--help"], env, runs)
        ls = _median_time([sys.executable, "-m", "gateway.cli.main", "ls"], env, runs)
    return {"python_pass_s": base, "help_s": helps, "ls_empty_s": ls,
            "help_over_python": helps / base, "ls_over_python": ls / base}


def bench_ls_records(records: int, runs: int) -> dict[str, float]:
    from gateway.spec import parse_spec
    from gateway.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        env = _env(Path(tmp))
        store = Store(Path(tmp) / "hpcgw.db")
        spec = parse_spec({"name": "old", "command": "true", "labels": {"batch": "x"}})
        start = time.perf_counter()
        for _ in range(records // 1000):
            store.insert_jobs([spec] * 1000)
        fill = time.perf_counter() - start
        # history: finished jobs (direct SQL only to build the fixture quickly)
        store.conn.execute("UPDATE jobs SET state = 'SUCCEEDED'")
        store.conn.execute("UPDATE jobs SET state = 'FAILED' WHERE rowid % 100 = 0")
        store.close()
        cli = [sys.executable, "-m", "gateway.cli.main"]
        ls = _median_time(cli + ["ls"], env, runs)
        failed = _median_time(cli + ["ls", "--state", "FAILED", "-n", "0"], env, runs)
        base = _median_time([sys.executable, "-c", "pass"], env, runs)
    return {"records": records, "fill_s": fill, "ls_s": ls, "ls_failed_all_s": failed,
            "ls_over_python": ls / base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out")
    args = parser.parse_args()
    results = {"cold_start": bench_cold_start(args.runs), "single": bench_single(),
               "throughput": bench_jobs(args.jobs),
               "ls_records": bench_ls_records(args.records, args.runs),
               "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    emit(results, args.out)


if __name__ == "__main__":
    main()
