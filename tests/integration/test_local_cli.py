"""The local backend driven through the real `hpcgw` CLI, as a researcher would."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.testing.require import require_tool

pytestmark = pytest.mark.integration


def job_id(done: subprocess.CompletedProcess[str]) -> str:
    return json.loads(done.stdout)[0]["id"]


def test_success_logs_outputs_and_inputs(cli, tmp_path):
    (tmp_path / "data.txt").write_text("forty-two\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: hello\n"
        "command: |\n  cat data.txt; echo to-stderr >&2; mkdir -p out; echo result > out/r.txt\n"
        "inputs: [data.txt]\noutputs: ['out/*.txt']\nlabels: {project: demo}\n")
    done = cli("submit", str(spec), "--wait", "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)[0]
    assert record["state"] == "SUCCEEDED" and record["exit_code"] == 0
    assert cli("logs", record["id"]).stdout == "forty-two\n"
    assert cli("logs", record["id"], "--stderr").stdout == "to-stderr\n"
    outputs = cli.json("outputs", record["id"])
    assert [Path(p).read_text() for p in outputs] == ["result\n"]
    copied = cli("outputs", record["id"], "--copy-to", str(tmp_path / "got"), check=True)
    assert (tmp_path / "got" / "out" / "r.txt").read_text() == "result\n", copied.stdout
    shown = cli.json("show", record["id"])
    assert shown["provenance"]["inputs"]["data.txt"].startswith("sha256:")
    assert shown["provenance"]["spec_digest"] == shown["spec_digest"]
    assert [e["new_state"] for e in shown["events"] if e["new_state"]] == [
        "PENDING", "SUBMITTING", "QUEUED", "SUCCEEDED"] or "RUNNING" in str(shown["events"])
    assert cli.json("ls", "--label", "project=demo")[0]["id"] == record["id"]


def test_failing_exit_code_is_mirrored(cli):
    done = cli("run", "--wait", "--json", "--", "sh", "-c", "echo bad >&2; exit 7")
    assert done.returncode == 7
    record = json.loads(done.stdout)[0]
    assert record["state"] == "FAILED" and record["exit_code"] == 7 and record["kind"] == "failed"


def test_walltime_gives_timeout(cli, gw_env):
    cli.env = {**gw_env, "HPCGW_LOCAL__KILL_GRACE_S": "1"}
    started = time.monotonic()
    done = cli("run", "--wait", "--json", "-t", "2s", "--", "sleep", "60")
    assert done.returncode == 124, done.stderr
    assert json.loads(done.stdout)[0]["state"] == "TIMEOUT"
    assert time.monotonic() - started < 30


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_cancel_kills_the_whole_process_group(cli, tmp_path):
    script = f"sleep 300 & echo $! > {tmp_path}/child; sleep 300"
    jid = job_id(cli("run", "--json", "--", "sh", "-c", script))
    assert _wait_for(lambda: (tmp_path / "child").exists() and cli.json("show", jid)["state"] == "RUNNING")
    grandchild = int((tmp_path / "child").read_text())
    assert _pid_alive(grandchild)
    assert f"cancelling {jid}" in cli("cancel", jid, check=True).stdout
    done = cli("wait", jid, "--json")
    assert done.returncode == 130 and json.loads(done.stdout)[0]["state"] == "CANCELLED"
    assert _wait_for(lambda: not _pid_alive(grandchild), 15)
    assert "nothing to cancel" in cli("cancel", jid).stdout


def test_jobs_outlive_the_cli_and_finish_without_a_daemon(cli, home):
    jid = job_id(cli("run", "--json", "--", "sh", "-c", "sleep 1; echo done"))
    # no agent runs: the CLI that submitted has exited; a later command finds the result
    done = cli("wait", jid, "--json", "--timeout", "60")
    assert done.returncode == 0 and json.loads(done.stdout)[0]["state"] == "SUCCEEDED"
    assert cli("logs", jid).stdout == "done\n"


def test_agent_killed_while_jobs_run_then_restarted(cli, gw_env, tmp_path):
    jid = job_id(cli("run", "--json", "--", "sh", "-c", f"sleep 2; echo x >> {tmp_path}/ran"))
    agent = subprocess.Popen([sys.executable, "-m", "gateway.cli.main", "agent", "--interval", "0.1"],
                             env=gw_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.8)
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    agent = subprocess.Popen([sys.executable, "-m", "gateway.cli.main", "agent", "--interval", "0.1"],
                             env=gw_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: cli.json("show", jid)["state"] == "SUCCEEDED", 30)
    finally:
        agent.kill()
        agent.wait()
    assert (tmp_path / "ran").read_text() == "x\n"


def test_slot_limit_queues_instead_of_overcommitting(cli, gw_env, home):
    cli.env = {**gw_env, "HPCGW_LOCAL__CPUS": "1"}
    ids = [job_id(cli("run", "--json", "--", "sleep", "1.5")) for _ in range(3)]
    # a verb's own pass is skipped while another process holds the reconciler's lock, so
    # the reason may land a pass later: poll (the third job waits at least 1.5 s)
    def queued():
        shown = cli.json("show", ids[2])
        return shown["state"] == "PENDING" and "free slots" in (shown["reason"] or "")
    assert _wait_for(queued, 10)
    assert cli("wait", *ids, "--timeout", "60").returncode == 0
    spans = sorted((r["started_at"], r["ended_at"]) for r in (cli.json("show", i) for i in ids))
    assert all(a[1] <= b[0] + 0.05 for a, b in zip(spans, spans[1:])), spans


def test_retry_on_failure_runs_a_second_attempt(cli, tmp_path):
    spec = tmp_path / "retry.yaml"
    spec.write_text("name: flaky\ncommand: 'test \"$HPCGW_ATTEMPT\" -ge 2'\n"
                    "retries: {max: 2, on: [failed]}\n")
    done = cli("submit", str(spec), "--wait", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    shown = cli.json("show", json.loads(done.stdout)[0]["id"])
    assert shown["attempt"] == 2 and shown["state"] == "SUCCEEDED"
    assert [(a["attempt"], a["state"]) for a in shown["attempts"]] == [(1, "FAILED"), (2, "SUCCEEDED")]
    assert any(e["kind"] == "retry" for e in shown["events"])


def test_hostile_arguments_and_env_arrive_byte_exact(cli):
    hostile = ["a 0", "a'; echo foo", "a\n0", "$(echo pwned)", '"; exit 9 #']
    args = ["run", "--wait", "--json", "-e", f"H={hostile[1]}", "--", sys.executable, "-c",
            "import json,os,sys; print(json.dumps([sys.argv[1:], os.environ['H']]))", *hostile]
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    out = cli("logs", json.loads(done.stdout)[0]["id"]).stdout
    assert json.loads(out) == [hostile, hostile[1]]


@pytest.mark.parametrize("content, field", [
    ("name: a\ncommand: []\n", "command"),
    ("name: a\ncommand: x\nimage: python:3.11\n", "hpcgw image pin"),
    ("name: a\ncommand: x\nresources: {walltime: soon}\n", "resources.walltime"),
    ("name: a\ncommand: x\nresources: {memory: lots}\n", "resources.memory"),
    ("name: a\ncommand: x\nresources: {cpus_per_task: -2}\n", "resources.cpus_per_task"),
    ("name: a\ncommand: x\ninputs: [missing.csv]\n", "missing.csv"),
    ("name: a\ncommand: x\nextra: 1\n", "valid keys"),
    ("name: a\ncommand: [x\n", "malformed YAML"),
    ("name: a\ncommand: x\nresources: {cpus_per_task: 4096}\n", "cpus_per_task"),
])
def test_bad_input_exits_2_names_the_field_and_writes_nothing(cli, tmp_path, home, content, field):
    good = tmp_path / "good.yaml"
    good.write_text("name: fine\ncommand: 'true'\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    done = cli("submit", str(good), str(bad))
    assert done.returncode == 2
    assert field in done.stderr
    db = home / "hpcgw.db"
    if db.exists():
        assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0


def test_unknown_job_and_bad_filter(cli):
    assert cli("show", "zzzzzzz").returncode == 3
    done = cli("ls", "--state", "DONE")
    assert done.returncode == 2 and "SUCCEEDED" in done.stderr


def test_logs_follow_streams_until_the_end(cli):
    jid = job_id(cli("run", "--json", "--", "sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.3; done"))
    done = cli("logs", "-f", jid, timeout=60)
    assert done.stdout == "1\n2\n3\n"


@pytest.mark.mpi
def test_mpirun_job_runs_ranks_that_allreduce(cli, gw_env, tmp_path):
    pytest.importorskip("mpi4py")
    require_tool("mpirun", "apt-get install openmpi-bin")
    script = tmp_path / "allreduce.py"
    script.write_text(
        "from mpi4py import MPI\n"
        "c = MPI.COMM_WORLD\n"
        "total = c.allreduce(c.Get_rank() + 1)\n"
        "print(f'rank {c.Get_rank()} of {c.Get_size()} total {total}', flush=True)\n")
    spec = tmp_path / "mpi.yaml"
    spec.write_text(f"name: mpi\ncommand: [{sys.executable!r}, allreduce.py]\nmpi: mpirun\n"
                    "inputs: [allreduce.py]\nresources: {tasks_per_node: 2}\n")
    cli.env = {**gw_env, "HPCGW_LOCAL__CPUS": "2"}
    done = cli("submit", str(spec), "--wait", "--json", timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = cli("logs", json.loads(done.stdout)[0]["id"]).stdout
    # mpirun forwards each rank's stream on its own, so lines may interleave: match, not split
    assert sorted(re.findall(r"rank \d of \d total \d", out)) == [
        "rank 0 of 2 total 3", "rank 1 of 2 total 3"], out


def test_array_submits_one_job_per_index(cli, tmp_path):
    spec = tmp_path / "arr.yaml"
    spec.write_text('name: arr\ncommand: echo "i=$HPCGW_ARRAY_INDEX"\n')
    done = cli("submit", "--array", "0-4:2,7", "--wait", "--json", str(spec))
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert [r["name"] for r in records] == ["arr-0", "arr-2", "arr-4", "arr-7"]
    assert sorted(cli("logs", r["id"]).stdout for r in records) == ["i=0\n", "i=2\n", "i=4\n", "i=7\n"]
    assert len({r["labels"]["hpcgw.array"] for r in records}) == 1
    bad = cli("submit", "--array", "5-1", str(spec))
    assert bad.returncode == 2 and "--array" in bad.stderr


NUMBA_THREADS = ("import numba, os, json; print(json.dumps({'numba': numba.get_num_threads(), "
                 "**{k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'NUMBA_NUM_THREADS', "
                 "'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS')}}))")


@pytest.mark.parametrize("cpus, env, numba_threads, omp", [
    ("1", [], 1, "1"), ("2", [], 2, "2"),
    ("1", ["-e", "NUMBA_NUM_THREADS=2", "-e", "OMP_NUM_THREADS=2"], 2, "2")])
def test_job_thread_pools_follow_its_cpus_unless_its_env_says(cli, cpus, env, numba_threads, omp):
    # two 1-CPU jobs side by side on 2 cores, each with pools of every core, had stalled
    # one another (spinning OpenMP threads): the gateway sizes them from cpus_per_task
    done = cli("run", "--wait", "--json", "--cpus", cpus, *env, "--",
               sys.executable, "-c", NUMBA_THREADS)
    assert done.returncode == 0, done.stderr
    got = json.loads(cli("logs", job_id(done)).stdout)
    assert got["numba"] == numba_threads
    assert got["OMP_NUM_THREADS"] == omp
    assert got["OPENBLAS_NUM_THREADS"] == got["MKL_NUM_THREADS"] == cpus
