"""Crash test: kill -9 the agent at random moments while 50 jobs go through.

Afterwards every job is terminal, the shared file has exactly 50 lines (one per job) and
no job ran twice (each attempt folder has one claim; no job needed a second attempt).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from gateway.api import Gateway
from gateway.config import load_config

pytestmark = pytest.mark.integration
JOBS = 50


def test_kill_dash_nine_the_agent_loses_and_duplicates_nothing(home, gw_env, tmp_path):
    shared = tmp_path / "shared.txt"
    env = {**gw_env, "HPCGW_LOCAL__CPUS": "6"}
    gw = Gateway(load_config(environ=env))
    command = f'sleep 0.$((RANDOM % 4)); echo "$HPCGW_JOB_ID $HPCGW_ATTEMPT" >> {shared}'
    specs = [{"name": f"crash-{i}", "command": ["bash", "-c", command]} for i in range(JOBS)]
    jobs = gw.submit_many(specs, start=False)
    rng = random.Random(int(os.environ.get("HPCGW_CRASH_SEED", "7")))
    kills = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        agent = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli.main", "agent", "--interval", "0.01"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # The random moment is counted from the agent's first line (its store open, its
        # passes about to start): a kill during Python's start-up tests nothing, and on a
        # loaded CI machine start-up alone can outlast the whole draw.
        assert agent.stderr is not None
        agent.stderr.readline()
        time.sleep(rng.uniform(0.05, 0.6))
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        agent.stderr.close()
        kills += 1
        if all(r.state.terminal for r in gw.store.jobs()):
            break
    else:
        pytest.fail(f"jobs not terminal after {kills} kills: {gw.store.counts()}")
    assert kills >= 5
    lines = shared.read_text().splitlines()
    ran = Counter(line.split()[0] for line in lines)
    assert len(lines) == JOBS
    assert set(ran) == {j.id for j in jobs} and set(ran.values()) == {1}
    assert gw.store.counts() == {"SUCCEEDED": JOBS}
    for job in gw.store.jobs():
        assert job.attempt == 1
        assert [p.name for p in (gw.config.jobs_path / job.id).iterdir()] == ["1"]


@pytest.mark.parametrize("point", ["after-intent", "after-submit", "after-poll"])
def test_crash_at_each_step_boundary_is_recovered(point, home, gw_env, tmp_path):
    """Die exactly between two steps of a pass; the next pass finishes the work once."""
    shared = tmp_path / "ran.txt"
    gw_env = {**gw_env, "HPCGW_LOCAL__CPUS": "8"}
    gw = Gateway(load_config(environ=gw_env))
    command = f"sleep 0.5; echo $HPCGW_JOB_ID >> {shared}"
    jobs = gw.submit_many([{"name": f"c{i}", "command": ["sh", "-c", command]} for i in range(3)],
                          start=False)
    crash_env = {**gw_env, "HPCGW_TEST_CRASH_AT": point}
    crash_run = 1 if point == "after-poll" else 0  # a poll needs jobs already submitted
    runs = 0
    while runs < 30 and not all(r.state.terminal for r in gw.store.jobs()):
        done = subprocess.run([sys.executable, "-m", "gateway.cli.main", "agent", "--once"],
                              env=crash_env if runs == crash_run else gw_env,
                              capture_output=True, text=True)
        assert done.returncode == (99 if runs == crash_run else 0), done.stderr
        runs += 1
        time.sleep(0.2)
    assert gw.store.counts() == {"SUCCEEDED": 3}
    assert sorted(shared.read_text().split()) == sorted(j.id for j in jobs)
    if point == "after-submit":
        events = {j.id: [e.kind for e in gw.store.events(j.id)] for j in jobs}
        assert all("adopted" in kinds for kinds in events.values()), events


def test_two_submitters_and_an_agent_at_once(home, gw_env, tmp_path):
    """Two shells submitting in a loop while an agent runs: every job recorded, run once."""
    shared = tmp_path / "ran.txt"
    env = {**gw_env, "HPCGW_LOCAL__CPUS": "4"}
    agent = subprocess.Popen([sys.executable, "-m", "gateway.cli.main", "agent", "--interval", "0.05"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loop = (f"for i in $(seq 8); do {sys.executable} -m gateway.cli.main run --name s$1 -- "
            f"sh -c 'echo $HPCGW_JOB_ID >> {shared}' >/dev/null || exit 1; done")
    try:
        shells = [subprocess.Popen(["bash", "-c", loop, "loop", str(n)], env=env) for n in (1, 2)]
        assert [s.wait(timeout=180) for s in shells] == [0, 0]
        gw = Gateway(load_config(environ=env))
        deadline = time.monotonic() + 120
        while not all(r.state.terminal for r in gw.store.jobs()) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        agent.kill()
        agent.wait()
    assert gw.store.counts() == {"SUCCEEDED": 16}
    ran = shared.read_text().split()
    assert sorted(ran) == sorted(r.id for r in gw.store.jobs())
