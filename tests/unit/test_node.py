"""The node runner's ``run`` (what a Slurm batch script execs), run as its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(adir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gateway.node", "run", str(adir), *args],
                          capture_output=True, text=True, env=env, check=False)


@pytest.fixture
def adir(tmp_path: Path) -> Path:
    folder = tmp_path / "attempt"
    folder.mkdir()
    (tmp_path / "in.txt").write_text("data\n")
    (folder / "launch.json").write_text(json.dumps({
        "inputs": [{"source": str(tmp_path / "in.txt"), "name": "in.txt"}],
        "outputs": ["*.out"]}))
    return folder


def test_run_stages_runs_in_cwd_collects_and_runs_once(adir: Path) -> None:
    work = adir / "work"
    cmd = 'test "$PWD" = "$(pwd -P)" && cp in.txt copy.out && echo ran && exit 4'
    done = _run(adir, "--cwd", str(work), "--", "sh", "-c", cmd)
    assert done.returncode == 4 and done.stdout == "ran\n", done.stderr
    status = json.loads((adir / "status.json").read_text())
    assert (status["outcome"], status["exit_code"]) == ("exited", 4)
    assert status["outputs"] == ["copy.out"]
    assert (adir / "outputs" / "copy.out").read_text() == "data\n"
    again = _run(adir, "--cwd", str(work), "--", "sh", "-c", "echo twice")
    assert (again.returncode, again.stdout) == (0, "")      # claimed: nothing runs again


def test_a_command_ended_by_a_signal_reports_128_plus_it(adir: Path) -> None:
    done = _run(adir, "--cwd", str(adir / "work"), "--", "sh", "-c", "kill -KILL $$")
    status = json.loads((adir / "status.json").read_text())
    assert done.returncode == 137 and (status["exit_code"], status["signal"]) == (137, 9)


def test_a_command_that_cannot_start_is_an_error_with_the_reason(adir: Path) -> None:
    done = _run(adir, "--cwd", str(adir / "work"), "--", "no-such-program-hpcgw")
    status = json.loads((adir / "status.json").read_text())
    assert done.returncode == 127 and status["outcome"] == "error"
    assert "no-such-program-hpcgw" in status["reason"]


def test_run_without_its_separator_is_a_usage_error_and_claims_nothing(adir: Path) -> None:
    done = _run(adir, "--cwd", str(adir), "echo", "hi")
    assert done.returncode == 2 and "usage" in done.stderr
    assert not (adir / "claim").exists()
