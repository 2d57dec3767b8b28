"""Slurm benchmarks on a private test cluster started here, all in one run.

    python3 tests/benchmarks/bench_slurm.py [--jobs 500] [--cpus 64] [--out FILE.json]

1. N trivial jobs (`true`) from submit until all finished, three ways on the same cluster:
   hpcgw (Gateway API + reconciler; same-shape jobs go as one array), a shell-style loop of
   `sbatch --wrap true` polled with `squeue`, and submitit's `map_array`.
   Slurm client calls are counted for hpcgw (its backend's counter).
2. Slurm client calls in one reconciler pass with N active (sleeping) jobs: the goal is one
   `squeue` whatever N is.
Needs Debian's slurm-wlm and munge, and root (the harness starts munged/slurmctld/slurmd).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway.testing.slurm_cluster import SlurmCluster  # noqa: E402
from report import emit  # noqa: E402


def _gateway(cluster: SlurmCluster, data: Path):
    from gateway.api import Gateway

    profile = {"env": {**cluster.env, "PYTHONPATH": str(REPO)}}
    return Gateway({"data_dir": str(data), "agent": {"lost_after_misses": 20},
                    "backends": {"slurm": {"profiles": {"bench": profile}}}})


def _queue_empty(env: dict[str, str]) -> bool:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True)
    return out.returncode == 0 and not out.stdout.strip()


def _drain(env: dict[str, str]) -> None:
    subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
    while not _queue_empty(env):
        time.sleep(0.2)


def bench_hpcgw(cluster: SlurmCluster, n: int, tmp: Path) -> dict[str, float]:
    gw = _gateway(cluster, tmp / "hpcgw")
    start = time.perf_counter()
    jobs = gw.submit_many([{"name": f"t{i}", "target": "slurm:bench", "command": ["true"]}
                           for i in range(n)])
    submitted = time.perf_counter() - start
    passes = 1
    while not all(r.state.terminal for r in gw.store.jobs(limit=n)):
        time.sleep(0.2)
        gw.reconcile()
        passes += 1
    total = time.perf_counter() - start
    counts = gw.store.counts()
    calls = dict(gw.backends.get("slurm:bench").calls)  # type: ignore[attr-defined]
    gw.close()
    assert counts == {"SUCCEEDED": n}, counts
    assert len(jobs) == n
    return {"submit_s": submitted, "all_done_s": total, "passes": passes,
            "slurm_calls": sum(calls.values()), **{f"calls_{k}": v for k, v in calls.items()}}


def bench_sbatch_loop(cluster: SlurmCluster, n: int, tmp: Path) -> dict[str, float]:
    out = tmp / "loop"
    out.mkdir()
    start = time.perf_counter()
    for i in range(n):
        subprocess.run(["sbatch", "--parsable", "-o", str(out / f"{i}.out"), "--wrap", "true"],
                       env={**os.environ, **cluster.env}, check=True, capture_output=True)
    submitted = time.perf_counter() - start
    polls = 0
    while not _queue_empty({**os.environ, **cluster.env}):
        time.sleep(0.2)
        polls += 1
    total = time.perf_counter() - start
    return {"submit_s": submitted, "all_done_s": total, "slurm_calls": n + polls + 1}


def _square(x: int) -> int:
    return x * x


def bench_submitit(cluster: SlurmCluster, n: int, tmp: Path) -> dict[str, float]:
    try:
        import submitit
    except ImportError:
        return {"skipped": 1.0}
    os.environ.update(cluster.env)
    executor = submitit.AutoExecutor(folder=str(tmp / "submitit"), cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_array_parallelism=n, cpus_per_task=1,
                               mem_gb=0.25)
    start = time.perf_counter()
    jobs = executor.map_array(_square, range(n))
    submitted = time.perf_counter() - start
    results = [job.result() for job in jobs]
    total = time.perf_counter() - start
    assert results == [i * i for i in range(n)]
    return {"submit_s": submitted, "all_done_s": total}


def bench_calls_per_pass(cluster: SlurmCluster, n: int, tmp: Path) -> dict[str, float]:
    gw = _gateway(cluster, tmp / "calls")
    gw.submit_many([{"name": f"s{i}", "target": "slurm:bench", "command": ["sleep", "300"]}
                    for i in range(n)])
    backend = gw.backends.get("slurm:bench")
    backend.calls.clear()  # type: ignore[attr-defined]
    start = time.perf_counter()
    report = gw.reconcile()
    elapsed = time.perf_counter() - start
    calls = dict(backend.calls)  # type: ignore[attr-defined]
    active = len(gw.store.jobs(limit=n + 1))
    gw.close()
    _drain({**os.environ, **cluster.env})
    return {"active_jobs": active, "pass_s": elapsed, "polls": report.polls.get("slurm:bench", 0) if report else 0,
            **{f"calls_{k}": v for k, v in calls.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--cpus", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with SlurmCluster(tmp / "cluster", "single", cpus=args.cpus) as cluster:
            for name, fn in (("hpcgw", bench_hpcgw), ("sbatch_loop", bench_sbatch_loop),
                             ("submitit", bench_submitit), ("calls_per_pass", bench_calls_per_pass)):
                results[name] = fn(cluster, args.jobs, tmp)
                _drain({**os.environ, **cluster.env})
    base = results["sbatch_loop"]["all_done_s"]
    results["ratios"] = {f"{k}_over_sbatch_loop": v["all_done_s"] / base
                         for k, v in results.items() if "all_done_s" in v}
    emit(results, args.out)


if __name__ == "__main__":
    main()
