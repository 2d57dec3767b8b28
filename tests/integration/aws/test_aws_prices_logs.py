"""Spot prices from moto's describe_spot_price_history, and live logs of a running instance."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import pytest

from gateway.spec import parse_spec
from gateway.states import State
from test_aws_cloud import _hpcgw

pytestmark = [pytest.mark.integration, pytest.mark.aws, pytest.mark.timeout(120)]


def test_spot_price_history_refines_estimate_and_launch(cloud: Callable[..., Any]) -> None:
    c = cloud(spot_history=True)
    spec = parse_spec({"name": "p", "target": "aws:test", "command": ["true"],
                       "resources": {"walltime": "2h", "nodes": 2}})
    plan = c.backend.plan(spec)
    # moto answers 0.00001 USD/h for every type and zone; the catalog says 0.034 for c6i.large
    assert (plan["instance_type"], plan["price_source"]) == ("c6i.large", "spot price history")
    assert plan["price_per_hour"] == pytest.approx(0.00001)
    assert plan["estimated_cost"] == pytest.approx(0.00001 * 2 * 2, abs=1e-4)
    c.backend.plan(spec)
    job = c.submit(command=["true"])
    c.gw.reconcile(block=True)                 # launches (no emulator: it stays running)
    launch = json.loads((c.home / "jobs" / job / "1" / "aws.json").read_text())
    assert (launch["price_per_hour"], launch["price_source"]) == (0.00001, "spot price history")
    [inst] = c.instances(f"hpcgw.{job}.1")
    assert {"Key": "hpcgw:price", "Value": "1e-05"} in inst["Tags"]
    assert c.backend.calls["ec2.DescribeSpotPriceHistory"] == 1      # cached across passes
    c.gw.cancel([job])
    assert c.until(job).state == State.CANCELLED


def test_catalog_prices_without_history(cloud: Callable[..., Any]) -> None:
    c = cloud()
    plan = c.backend.plan(parse_spec({"name": "p", "target": "aws:test", "command": ["true"]}))
    assert (plan["price_per_hour"], plan["price_source"]) == (0.034, "catalog")
    assert c.backend.calls["ec2.DescribeSpotPriceHistory"] == 0


def test_logs_of_a_running_instance(cloud: Callable[..., Any], emulator: Any) -> None:
    c = cloud()
    emulator(owner=c.owner)
    job = c.submit(command=["sh", "-c", "echo first; sleep 60"])
    c.until(job, lambda r: r.state == State.RUNNING)
    deadline = time.monotonic() + 30             # a safety bound, not a timed assertion
    text = ""
    while "first" not in text and time.monotonic() < deadline:
        before = c.backend.calls["s3.GetObject"]
        text = c.gw.logs(job)
        assert c.backend.calls["s3.GetObject"] == before + 1     # one GET per look
        time.sleep(0.3)
    assert text == "first\n" and c.gw.store.get(job).state == State.RUNNING
    (c.home / "jobs" / job / "1" / "stdout").unlink()      # the CLI fetches it again
    done = _hpcgw(c, "logs", job)
    assert (done.returncode, done.stdout) == (0, "first\n"), done.stderr
    c.gw.cancel([job])
    assert c.until(job).state == State.CANCELLED
