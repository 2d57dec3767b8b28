"""Campaigns on the local backend: idempotent applies, edits, cache, budget, limits, locks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from gateway.api import Gateway
from gateway.config import load_config

pytestmark = pytest.mark.integration


def write(path: Path, *, name="sweep", xs=(1, 2, 3), ys=(10, 20), extra="", command=None) -> Path:
    command = command or 'echo "{\\"value\\": $(( {{x}} * {{y}} ))}" > metrics.json'
    path.write_text(textwrap.dedent(f"""\
        campaign: {name}
        template:
          command: '{command}'
          outputs: [metrics.json]
          resources: {{walltime: 1h}}
        parameters:
          grid: {{x: {list(xs)}, y: {list(ys)}}}
        """) + extra)
    return path


def apply(cli, path: Path, *args: str) -> dict:
    done = cli("campaign", "apply", str(path), "--json", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def finish(cli, timeout=120) -> None:
    done = cli("agent", "--until-idle", "--interval", "0.05", timeout=timeout)
    assert done.returncode == 0, done.stderr


def test_apply_twice_submits_once_and_outputs_collects_metrics(cli, tmp_path):
    sweep = write(tmp_path / "sweep.yaml")
    assert apply(cli, sweep)["counts"] == {"submit": 6}
    assert set(apply(cli, sweep)["counts"]) <= {"keep", "done"}
    finish(cli)
    assert apply(cli, sweep)["counts"] == {"done": 6}
    table = json.loads(cli("campaign", "outputs", str(sweep), check=True).stdout)
    values = sorted((r["param.x"], r["param.y"], r["metrics.value"]) for r in table)
    assert values == [(x, y, x * y) for x in (1, 2, 3) for y in (10, 20)]
    assert cli("campaign", "outputs", str(sweep), "-o", str(tmp_path / "t.csv")).returncode == 0
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("param.x,param.y,member")


def test_editing_one_parameter_changes_only_the_affected_members(cli, tmp_path, home):
    sweep = write(tmp_path / "sweep.yaml")
    apply(cli, sweep)
    finish(cli)
    before = {j["id"] for j in cli.json("ls", "-n", "0")}
    plan = json.loads(cli("campaign", "plan", str(write(sweep, xs=(1, 2, 4))), "--json",
                          check=True).stdout)
    assert plan["counts"] == {"done": 4, "submit": 2}
    result = apply(cli, sweep)
    assert result["counts"] == {"done": 4, "submit": 2}
    added = [a["params"] for a in result["actions"] if a["kind"] == "submit"]
    assert sorted(p["y"] for p in added) == [10, 20] and {p["x"] for p in added} == {4}
    after = {j["id"] for j in cli.json("ls", "-n", "0")}
    assert before < after and len(after - before) == 2


def test_changing_the_template_replaces_every_member(cli, tmp_path):
    sweep = write(tmp_path / "sweep.yaml", xs=(1,), ys=(1, 2))
    apply(cli, sweep)
    finish(cli)
    result = apply(cli, write(sweep, xs=(1,), ys=(1, 2), command="echo changed > metrics.json"))
    assert result["counts"] == {"replace": 2}


def test_identical_work_is_served_from_the_cache_unless_no_cache(cli, tmp_path):
    first = write(tmp_path / "a.yaml", name="first", xs=(1, 2), ys=(3,))
    apply(cli, first)
    finish(cli)
    second = write(tmp_path / "b.yaml", name="second", xs=(1, 2), ys=(3,))
    result = apply(cli, second)
    assert result["counts"] == {"cached": 2}
    table = json.loads(cli("campaign", "outputs", str(second), check=True).stdout)
    assert all(r["cached"] and r["state"] == "SUCCEEDED" for r in table)
    assert sorted(r["metrics.value"] for r in table) == [3, 6]
    forced = write(tmp_path / "c.yaml", name="third", xs=(1, 2), ys=(3,))
    assert apply(cli, forced, "--no-cache")["counts"] == {"submit": 2}


def test_budget_refuses_further_launches_and_reports_them(cli, tmp_path):
    sweep = write(tmp_path / "sweep.yaml", xs=(1, 2, 3, 4), ys=(1,),
                  extra="budget: {core_hours: 2.5}\n")
    result = apply(cli, sweep)
    assert result["counts"] == {"submit": 2, "refused": 2}
    assert all("budget" in a["reason"] for a in result["actions"] if a["kind"] == "refused")
    assert len(cli.json("ls", "-n", "0")) == 2


def test_concurrency_limit_is_never_exceeded(cli, tmp_path, gw_env):
    cli.env = {**gw_env, "HPCGW_LOCAL__CPUS": "8"}
    sweep = write(tmp_path / "sweep.yaml", xs=(1, 2, 3, 4, 5, 6), ys=(1,),
                  command="sleep 0.4; echo {} > metrics.json", extra="concurrency: 2\n")
    apply(cli, sweep)
    finish(cli)
    spans = [(j["started_at"], j["ended_at"]) for j in cli.json("ls", "-n", "0")]
    assert len(spans) == 6 and all(s and e for s, e in spans)
    for s, _ in spans:
        overlapping = sum(1 for a, b in spans if a <= s < b)
        assert overlapping <= 2, spans


def test_apply_killed_mid_way_then_rerun_runs_every_member_once(cli, tmp_path, gw_env, home):
    marks = tmp_path / "marks.txt"
    sweep = write(tmp_path / "sweep.yaml", xs=tuple(range(40)), ys=(1,),
                  command=f"echo {{{{x}}}} >> {marks}; echo {{}} > metrics.json")
    crashed = subprocess.run([sys.executable, "-m", "gateway.cli.main", "campaign", "apply", str(sweep)],
                             env={**gw_env, "HPCGW_TEST_CRASH_AT": "campaign-after-record"})
    assert crashed.returncode == 99
    # and an apply killed at a random moment
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli.main", "campaign", "apply", str(sweep)],
                            env=gw_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = apply(cli, sweep)
    assert sum(result["counts"].values()) == 40 and "submit" not in result["counts"]
    finish(cli)
    gw = Gateway(load_config(environ=gw_env))
    members = Counter(j.member for j in gw.store.campaign_jobs("sweep"))
    assert len(members) == 40 and set(members.values()) == {1}
    assert sorted(int(x) for x in marks.read_text().split()) == list(range(40))


def test_overlapping_applies_are_serialised_by_a_lock(cli, tmp_path, gw_env):
    sweep = write(tmp_path / "sweep.yaml")
    from gateway.campaigns.apply import campaign_lock

    gw = Gateway(load_config(environ=gw_env))
    with campaign_lock(gw, "sweep"):
        done = cli("campaign", "apply", str(sweep))
    assert done.returncode == 0 and "another apply" in done.stderr
    assert cli.json("ls") == []


@pytest.mark.parametrize("content, where", [
    ("campaign: a\ntemplate: {command: x}\nparameters: {grid: {a: [1]}, zip: {a: [1]}}\n", "exactly one"),
    ("campaign: a\ntemplate: {command: 'echo {{nope}}'}\nparameters: {grid: {a: [1]}}\n", "nope"),
    ("campaign: a\ntemplate: {command: x}\nparameters: {list: [{a: 1}, {a: 1}]}\n", "twice"),
    ("campaign: a\ntemplate: {command: x}\nparameters: {file: gone.csv}\n", "gone.csv"),
    ("campaign: a\ntemplate: {command: x, bogus: 1}\nparameters: {grid: {a: [1]}}\n", "bogus"),
    ("campaign: 'a b'\ntemplate: {command: x}\nparameters: {grid: {a: [1]}}\n", "campaign"),
])
def test_bad_campaign_files_exit_2_and_change_nothing(cli, tmp_path, content, where):
    (tmp_path / "bad.yaml").write_text(content)
    done = cli("campaign", "apply", str(tmp_path / "bad.yaml"))
    assert done.returncode == 2 and where in done.stderr, done.stderr
    assert cli.json("ls") == []


def test_parameters_from_csv_and_jsonl(cli, tmp_path):
    (tmp_path / "p.csv").write_text("x,y\n1,2\n3,4\n")
    (tmp_path / "p.jsonl").write_text('{"x": 5, "y": 6}\n')
    for source in ("p.csv", "p.jsonl"):
        spec = tmp_path / f"{source}.yaml"
        spec.write_text(f"campaign: from-{source.split('.')[1]}\ntemplate: {{command: 'echo {{{{x}}}}'}}\n"
                        f"parameters: {{file: {source}}}\n")
        assert sum(apply(cli, spec)["counts"].values()) == (2 if source == "p.csv" else 1)


def test_money_budget_refuses_cloud_members_beyond_it(cli, tmp_path, gw_env):
    """The most each cloud member can cost (catalog price x walltime) counts against the
    campaign's money budget; no AWS call is needed to plan it."""
    config = tmp_path / "aws.yaml"
    config.write_text("backends: {aws: {profiles: {lab: {region: us-east-1, bucket: hpcgw-test,"
                      " owner: tester}}}}\n")
    cli.env = {**gw_env, "HPCGW_CONFIG": str(config)}
    sweep = tmp_path / "cloud.yaml"
    sweep.write_text(textwrap.dedent("""\
        campaign: cloudy
        template: {command: 'true', resources: {walltime: 1h}}
        parameters: {grid: {i: [1, 2, 3, 4]}}
        target: aws:lab
        budget: {money: 0.09}
        """))
    done = cli("campaign", "plan", str(sweep), "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    counts = plan["counts"]
    assert counts.get("refused", 0) >= 1 and counts.get("submit", 0) >= 1, plan
    assert all("$" in a["reason"] for a in plan["actions"] if a["kind"] == "refused")
