"""The README's first command: `hpcgw demo` trains the reference MLP as a job."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_demo_on_the_host_runtime_trains_and_reports(cli):
    done = cli("demo", "--host", "--epochs", "1", timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout[done.stdout.rindex('\n{\n') + 1:])
    assert summary["state"] == "SUCCEEDED" and summary["runtime"] == "host"
    final = summary["metrics"]["final"]
    assert final["epoch"] == 1 and final["eval_accuracy"] > 0.5
    jobs = cli.json("ls", "--label", "example=demo")
    assert [j["id"] for j in jobs] == [summary["job"]]
