"""Campaign submission at scale on a private Slurm cluster, in one run.

    python3 tests/benchmarks/bench_campaign.py [--jobs 10000] [--out FILE.json]

Apply time and Slurm client calls for a campaign of N members (the submission, then a
no-op re-apply), against submitting the same N jobs with a loop of `sbatch`. The partition
jobs are submitted held (`--hold`) so nothing starts: this measures submission, not execution.
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


def _campaign(path: Path, n: int) -> Path:
    path.write_text(
        "campaign: bench\n"
        "template: {command: [sh, -c, 'echo {{i}}'], resources: {walltime: 10m}}\n"
        f"parameters: {{grid: {{i: {list(range(n))}}}}}\n"
        "target: slurm:bench\n")
    return path


def bench_hpcgw(cluster: SlurmCluster, n: int, tmp: Path) -> dict[str, float]:
    from gateway.api import Gateway
    from gateway.campaigns.apply import apply
    from gateway.campaigns.spec import load_campaign

    profile = {"env": {**cluster.env, "PYTHONPATH": str(REPO)}, "extra_sbatch": ["--hold"]}
    gw = Gateway({"data_dir": str(tmp / "hpcgw"),
                  "backends": {"slurm": {"profiles": {"bench": profile}}}})
    spec, base = load_campaign(_campaign(tmp / "c.yaml", n))
    start = time.perf_counter()
    apply(gw, spec, base)
    first = time.perf_counter() - start
    backend = gw.backends.get("slurm:bench")
    calls_first = dict(backend.calls)  # type: ignore[attr-defined]
    backend.calls.clear()  # type: ignore[attr-defined]
    start = time.perf_counter()
    result = apply(gw, spec, base)
    again = time.perf_counter() - start
    calls_again = dict(backend.calls)  # type: ignore[attr-defined]
    queued = gw.store.counts()
    gw.close()
    assert result.counts() == {"keep": n}, result.counts()
    return {"apply_s": first, "reapply_s": again, "queued": float(queued.get("QUEUED", 0)),
            **{f"apply_calls_{k}": v for k, v in calls_first.items()},
            **{f"reapply_calls_{k}": v for k, v in calls_again.items()}}


def bench_sbatch_loop(cluster: SlurmCluster, n: int, tmp: Path) -> dict[str, float]:
    env = {**os.environ, **cluster.env}
    start = time.perf_counter()
    for i in range(n):
        subprocess.run(["sbatch", "--parsable", "--hold", "-o", "/dev/null", "--time=10", "--wrap",
                        f"echo {i}"], env=env, check=True, capture_output=True)
    return {"submit_s": time.perf_counter() - start, "calls_sbatch": n}


def _reset(cluster: SlurmCluster) -> None:
    env = {**os.environ, **cluster.env}
    subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
    while subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True,
                         text=True).stdout.strip():
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--out")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        conf = (f"MaxJobCount={args.jobs * 3}", "MaxArraySize=1001")
        with SlurmCluster(tmp / "cluster", "single", cpus=64, extra_conf=conf) as cluster:
            results["hpcgw_campaign"] = bench_hpcgw(cluster, args.jobs, tmp)
            _reset(cluster)
            results["sbatch_loop"] = bench_sbatch_loop(cluster, args.jobs, tmp)
            _reset(cluster)
    h, loop = results["hpcgw_campaign"], results["sbatch_loop"]
    results["ratios"] = {"loop_time_over_apply": loop["submit_s"] / h["apply_s"],
                         "loop_calls_over_apply_calls": loop["calls_sbatch"] / max(
                             1.0, sum(v for k, v in h.items() if k.startswith("apply_calls_")))}
    emit(results, args.out)


if __name__ == "__main__":
    main()
