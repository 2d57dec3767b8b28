"""The Slurm backend through the real `hpcgw` CLI with a config file, as a user sets it up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from slurm_it import REPO

from gateway.testing.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.slurm]


@pytest.fixture
def slurm_cli(slurm_cluster: SlurmCluster, tmp_path: Path):
    config = tmp_path / "config.yaml"
    profile = {"env": {**slurm_cluster.env, "PYTHONPATH": str(REPO)}, "gpu_partitions": {"fake": "gpu"}}
    config.write_text(yaml.safe_dump({"backends": {"slurm": {"profiles": {"test": profile}}}}))
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO),
           "HPCGW_CONFIG": str(config), "HPCGW_DATA_DIR": str(tmp_path / "data")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli.main", *args], env=env,
                              capture_output=True, text=True, timeout=180, cwd=tmp_path)
    return run


def test_backends_lists_the_cluster_with_what_it_offers(slurm_cli):
    done = slurm_cli("backends", "--json")
    rows = {r["target"]: r for r in json.loads(done.stdout)}
    assert rows["local"]["reachable"] and rows["slurm:test"]["reachable"], done.stdout
    assert "fake" in rows["slurm:test"]["gpu_types"]
    assert {"ib", "avx512"} <= set(rows["slurm:test"]["features"])
    # the packaged default profile points at no cluster here: reported, exit 4
    assert not rows["slurm:default"]["reachable"] and done.returncode == 4


def test_run_on_slurm_and_refusal_of_an_impossible_feature(slurm_cli, tmp_path):
    done = slurm_cli("run", "--wait", "--json", "--target", "slurm:test", "--", "sh", "-c", "echo on-$SLURM_JOB_ID")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)[0]
    assert record["backend"] == "slurm:test" and record["state"] == "SUCCEEDED"
    assert slurm_cli("logs", record["id"]).stdout.startswith("on-")
    spec = tmp_path / "gpu.yaml"
    spec.write_text("name: g\ncommand: 'true'\ntarget: slurm:test\nrequires: [quantum]\n")
    refused = slurm_cli("submit", str(spec))
    assert refused.returncode == 2 and "quantum" in refused.stderr
    assert json.loads(slurm_cli("ls", "--json").stdout)[0]["id"] == record["id"]
