"""The whole cloud path against a moto server, with instances emulated on this machine:
launch, bootstrap, run, upload, self-terminate, collect; and the faults the issue lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import boto3
import pytest
import yaml
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from gateway.api import Gateway
from gateway.backends.aws import load_profile
from gateway.backends.aws.backend import AwsBackend
from gateway.config import load_config
from gateway.states import State

pytestmark = [pytest.mark.integration, pytest.mark.aws, pytest.mark.timeout(120)]
REGION = "us-east-1"
REPO = Path(__file__).resolve().parents[3]


class Faulty:
    """A boto3 client whose next calls of an operation fail with scripted error codes;
    ``fakes`` answers operations moto does not implement (placement groups); ``seen``
    records every call's parameters by operation."""

    def __init__(self, real: Any, plan: dict[str, list[str]], fakes: dict[str, Callable[..., Any]],
                 seen: dict[str, list[dict[str, Any]]]) -> None:
        self._real, self._plan, self.meta = real, plan, real.meta
        self._fakes, self._seen = fakes, seen

    def __getattr__(self, name: str) -> Any:
        attr = self._fakes.get(name) or getattr(self._real, name)

        def call(**kwargs: Any) -> Any:
            self._seen.setdefault(name, []).append(kwargs)
            codes = self._plan.get(name)
            if codes:
                raise ClientError({"Error": {"Code": codes.pop(0), "Message": "injected"}}, name)
            return attr(**kwargs)

        return call


class FakePlacementGroups:
    """moto 5 does not implement placement groups: this stands in for the three calls
    (create, reused on a duplicate name; delete, refused while instances use the group)."""

    def __init__(self) -> None:
        self.groups: dict[str, list[dict[str, str]]] = {}
        self.deleted: list[str] = []

    def create_placement_group(self, GroupName: str, Strategy: str, **kw: Any) -> dict[str, Any]:
        if GroupName in self.groups:
            raise ClientError({"Error": {"Code": "InvalidPlacementGroup.Duplicate",
                                         "Message": "exists"}}, "CreatePlacementGroup")
        assert Strategy == "cluster"
        self.groups[GroupName] = [t for spec in kw.get("TagSpecifications", []) for t in spec["Tags"]]
        return {}

    def delete_placement_group(self, GroupName: str) -> dict[str, Any]:
        if self.groups.pop(GroupName, None) is None:
            raise ClientError({"Error": {"Code": "InvalidPlacementGroup.Unknown",
                                         "Message": "unknown"}}, "DeletePlacementGroup")
        self.deleted.append(GroupName)
        return {}


class Cloud:
    """A gateway whose aws:test profile points at moto; faults and clock are the test's."""

    def __init__(self, tmp: Path, moto: str, bucket: str, owner: str,
                 extra_config: dict[str, Any] | None = None, **profile: Any) -> None:
        self.moto, self.owner, self.faults = moto, owner, {}
        self.seen: dict[str, list[dict[str, Any]]] = {}
        self.pgs = FakePlacementGroups()
        self.fakes: dict[str, Callable[..., Any]] = {
            "create_placement_group": self.pgs.create_placement_group,
            "delete_placement_group": self.pgs.delete_placement_group}
        self.shift = 0.0
        self.home = tmp / "home"
        self.config_file = tmp / "config.yaml"
        fields = {"endpoint_url": moto, "bucket": bucket, "owner": owner, "runtime": "host",
                  "zones": ["us-east-1a", "us-east-1b"], "boot_s": 30, "grace_s": 2,
                  "log_interval_s": 1, "api_max_attempts": 1, **profile}
        document: dict[str, Any] = {
            "data_dir": str(self.home), "agent": {"backoff_s": [0.1], "lost_after_misses": 3},
            "backends": {"aws": {"profiles": {"test": fields}}}}
        for key, value in (extra_config or {}).items():   # backends merge; the rest replaces
            if key == "backends":
                document["backends"].update(value)
            else:
                document[key] = value
        self.config_file.write_text(yaml.safe_dump(document))
        self.env = {"HPCGW_CONFIG": str(self.config_file), "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}
        config = load_config(environ=self.env)
        self.backend = AwsBackend(load_profile(config, "test"), jobs_root=config.jobs_path,
                                  data_dir=config.data_path, images_store=config.images_path,
                                  client_factory=self._client, clock=lambda: time.time() + self.shift)
        self.gw = Gateway(config, backends={"aws:test": self.backend})
        self.ec2 = self._real("ec2")

    def _real(self, service: str) -> Any:
        return boto3.client(service, endpoint_url=self.moto, region_name=REGION,
                            config=BotoConfig(signature_version="s3v4" if service == "s3" else None,
                                              retries={"max_attempts": 1}))

    def _client(self, service: str) -> Any:
        return Faulty(self._real(service), self.faults, self.fakes, self.seen)

    def submit(self, **spec: Any) -> str:
        fields = {"name": "job", "target": "aws:test", "command": ["true"], **spec}
        return self.gw.submit(fields, start=False).id

    def until(self, job_id: str, done: Callable[[Any], bool] = lambda r: r.state.terminal,
              limit: float = 60) -> Any:
        """Run passes until ``done`` (a safety bound, not an assertion on time)."""
        deadline = time.monotonic() + limit
        while True:
            self.gw.reconcile(block=True)
            record = self.gw.store.get(job_id)
            if done(record) or time.monotonic() > deadline:
                return record
            time.sleep(0.2)

    def instances(self, key: str) -> list[dict[str, Any]]:
        pages = self.ec2.describe_instances(Filters=[{"Name": "tag:hpcgw:key", "Values": [key]}])
        return [i for r in pages["Reservations"] for i in r["Instances"]]


def test_a_job_runs_end_to_end(cloud: Callable[..., Cloud], emulator: Any, tmp_path: Path) -> None:
    c = cloud()
    emu = emulator(owner=c.owner)
    data = tmp_path / "in.txt"
    data.write_text("hello cloud\n")
    script = "mkdir -p out && tr a-z A-Z < in.txt > out/up.txt && echo logged && echo oops >&2"
    ids = [c.submit(name=f"job{i}", command=["sh", "-c", script], inputs=[str(data)],
                    outputs=["out/*.txt"], env={"WEIRD": "a'; echo foo"}) for i in range(2)]
    records = [c.until(i) for i in ids]
    for rec in records:
        assert rec.state == State.SUCCEEDED, rec.reason
        [out] = c.gw.outputs(rec.id)
        assert out.read_text() == "HELLO CLOUD\n"
        assert c.gw.logs(rec.id).strip() == "logged"
        assert c.gw.logs(rec.id, "stderr").strip() == "oops"
        assert rec.cost and rec.cost > 0
        [inst] = c.instances(f"hpcgw.{rec.id}.1")
        assert inst["State"]["Name"] == "terminated"      # powered itself off
        assert inst["InstanceType"] == "c6i.large" and inst.get("InstanceLifecycle") == "spot"
        assert {"HttpTokens": "required"}.items() <= inst["MetadataOptions"].items()
    assert len(emu.ran) == 2
    # content-addressed input: uploaded once for two jobs
    assert c.backend.calls["s3.PutObject"] + c.backend.calls["s3.CreateMultipartUpload"] == 1


def test_capacity_errors_take_the_fallbacks(cloud: Callable[..., Cloud], emulator: Any) -> None:
    c = cloud()
    emulator(owner=c.owner)
    c.faults["run_instances"] = ["InsufficientInstanceCapacity", "MaxSpotInstanceCountExceeded",
                                 "SpotMaxPriceTooLow"]
    job = c.submit(command=["echo", "ok"])
    rec = c.until(job)
    assert rec.state == State.SUCCEEDED, rec.reason
    launch = json.loads((c.home / "jobs" / job / "1" / "aws.json").read_text())
    # spot: cheapest type, next type, third type in zone a, then the cheapest in zone b
    assert [f.split(":")[0] for f in launch["fallbacks_taken"]] == [
        "c6i.large/spot/us-east-1a", "m6i.large/spot/us-east-1a", "c6i.xlarge/spot/us-east-1a"]
    assert (launch["instance_type"], launch["zone"], launch["market"]) == ("c6i.large", "us-east-1b", "spot")
    assert len(c.instances(f"hpcgw.{job}.1")) == 1


def test_no_capacity_anywhere_falls_back_to_on_demand(cloud: Callable[..., Cloud], emulator: Any) -> None:
    c = cloud(zones=["us-east-1a"], fallback_types=2)
    emulator(owner=c.owner)
    c.faults["run_instances"] = ["InsufficientInstanceCapacity"] * 2
    job = c.submit(command=["true"])
    rec = c.until(job)
    assert rec.state == State.SUCCEEDED, rec.reason
    launch = json.loads((c.home / "jobs" / job / "1" / "aws.json").read_text())
    assert (launch["market"], launch["instance_type"]) == ("on-demand", "c6i.large")


def test_throttling_backs_off_and_launches_once(cloud: Callable[..., Cloud], emulator: Any) -> None:
    c = cloud()
    emulator(owner=c.owner)
    c.faults["run_instances"] = ["RequestLimitExceeded"]
    job = c.submit(command=["true"])
    c.gw.reconcile(block=True)
    rec = c.gw.store.get(job)
    assert rec.state == State.SUBMITTING and "RequestLimitExceeded" in (rec.reason or "")
    assert any(e.kind == "backoff" for e in c.gw.store.events(job))
    c.faults["describe_instances"] = ["Throttling"]     # a throttled poll: the pass goes on
    rec = c.until(job)
    assert rec.state == State.SUCCEEDED, rec.reason
    assert len(c.instances(f"hpcgw.{job}.1")) == 1


def test_spot_interruption_is_retried(cloud: Callable[..., Cloud], emulator: Any) -> None:
    c = cloud()
    emu = emulator(owner=c.owner, interrupt=lambda tags: tags.get("hpcgw:attempt") == "1")
    script = ('if [ "$HPCGW_ATTEMPT" = 1 ]; then trap "echo got TERM; exit 143" TERM; '
              'sleep 60 & wait; fi; echo "attempt $HPCGW_ATTEMPT done"')
    job = c.submit(command=["sh", "-c", script], retries={"max": 1, "on": ["preempted"]})
    rec = c.until(job)
    assert rec.state == State.SUCCEEDED and rec.attempt == 2, rec.reason
    assert c.gw.logs(job).strip() == "attempt 2 done"
    first = c.gw.store.attempts(job)[0] if hasattr(c.gw.store, "attempts") else None
    if first is not None:
        assert first["kind"] == "preempted"
    assert "got TERM" in (c.home / "jobs" / job / "1" / "stdout").read_text()
    assert len(emu.ran) == 2 and rec.cost and rec.cost > 0


def test_gateway_killed_between_launch_and_record(cloud: Callable[..., Cloud], emulator: Any) -> None:
    c = cloud()
    emulator(owner=c.owner)
    code = ("from gateway.api import Gateway\n"
            "Gateway().submit({'name': 'crash', 'target': 'aws:test', 'command': ['true']})\n")
    env = {**os.environ, **c.env, "HPCGW_TEST_CRASH_AT": "after-submit",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 99, done.stderr
    [rec] = c.gw.store.jobs()
    assert rec.state == State.SUBMITTING and rec.ref is None
    assert len(c.instances(f"hpcgw.{rec.id}.1")) == 1     # launched, not recorded
    rec = c.until(rec.id)
    assert rec.state == State.SUCCEEDED, rec.reason
    assert any(e.kind == "adopted" for e in c.gw.store.events(rec.id))
    assert len(c.instances(f"hpcgw.{rec.id}.1")) == 1     # and never a second one


def test_an_instance_that_never_reports_is_reaped(cloud: Callable[..., Cloud], emulator: Any) -> None:
    c = cloud()
    emulator(owner=c.owner, ignore=lambda tags: True)
    job = c.submit(command=["true"])
    rec = c.until(job, lambda r: r.state == State.RUNNING)
    assert rec.state == State.RUNNING
    c.shift = 10 * 86400.0          # the gateway's clock passes the instance's expiry
    rec = c.until(job)
    assert (rec.state, rec.kind) == (State.FAILED, "lost"), rec.reason
    assert "reaped" in (rec.reason or "")
    [inst] = c.instances(f"hpcgw.{job}.1")
    assert inst["State"]["Name"] == "terminated"


def test_a_budget_refuses_a_launch(cloud: Callable[..., Cloud]) -> None:
    c = cloud(budget=0.001)
    job = c.submit(command=["true"], resources={"walltime": "2h"})
    rec = c.until(job)
    assert (rec.state, rec.kind) == (State.FAILED, "refused")
    assert "budget" in (rec.reason or "")
    assert c.instances(f"hpcgw.{job}.1") == []


def test_cancel_terminates_the_instance(cloud: Callable[..., Cloud], emulator: Any) -> None:
    c = cloud()
    emulator(owner=c.owner)
    job = c.submit(command=["sleep", "60"])
    c.until(job, lambda r: r.state == State.RUNNING)
    c.gw.cancel([job])
    rec = c.until(job)
    assert rec.state == State.CANCELLED, rec.reason
    [inst] = c.instances(f"hpcgw.{job}.1")
    assert inst["State"]["Name"] == "terminated"


def _hpcgw(c: Cloud, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HPCGW_")}, **c.env,
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "gateway.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_shows_instance_and_cost(cloud: Callable[..., Cloud], tmp_path: Path) -> None:
    c = cloud()
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"name": "big", "target": "aws:test", "command": ["true"],
                                    "resources": {"cpus_per_task": 4, "memory": "10G",
                                                  "walltime": "2h"}}))
    done = _hpcgw(c, "submit", "--dry-run", "--json", str(spec))
    assert done.returncode == 0, done.stderr
    [plan] = json.loads(done.stdout)
    assert (plan["instance_type"], plan["market"]) == ("m6i.xlarge", "spot")
    assert plan["estimated_cost"] == pytest.approx(2 * plan["price_per_hour"])
    text = _hpcgw(c, "submit", "--dry-run", str(spec)).stdout
    assert "m6i.xlarge" in text and "EST. COST" in text
    assert c.gw.store.jobs() == []          # nothing recorded, nothing launched


def test_cloud_ls_and_reap_an_orphan(cloud: Callable[..., Cloud], emulator: Any) -> None:
    c = cloud()
    emulator(owner=c.owner, ignore=lambda tags: True)
    job = c.submit(command=["true"])
    c.until(job, lambda r: r.state == State.RUNNING)
    tags = [{"Key": k, "Value": v} for k, v in {
        "hpcgw:key": "hpcgw.orphan.1", "hpcgw:owner": c.owner, "hpcgw:profile": "test",
        "hpcgw:expiry": str(int(time.time()) + 3600), "hpcgw:price": "0.034"}.items()]
    c.ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="c6i.large",
                        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])
    rows = json.loads(_hpcgw(c, "cloud", "ls", "--json").stdout)
    assert sorted(r["key"] for r in rows) == sorted(["hpcgw.orphan.1", f"hpcgw.{job}.1"])
    assert json.loads(_hpcgw(c, "cloud", "reap", "--dry-run", "--json").stdout)[0]["key"] == "hpcgw.orphan.1"
    reaped = json.loads(_hpcgw(c, "cloud", "reap", "--json").stdout)
    assert [r["key"] for r in reaped] == ["hpcgw.orphan.1"]     # the active job's instance stays
    rows = json.loads(_hpcgw(c, "cloud", "ls", "--json").stdout)
    assert [r["key"] for r in rows] == [f"hpcgw.{job}.1"]
