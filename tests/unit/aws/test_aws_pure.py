"""Pure parts of the aws backend: profile, catalog matching, instance translation, ledger."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.backends.aws.catalog import load_catalog
from gateway.backends.aws.instances import finished_observation, live_observation, silent_end, view
from gateway.backends.aws.ledger import Ledger, instance_cost
from gateway.backends.aws.profile import AwsProfile
from gateway.backends.aws.staging import extract_outputs
from gateway.errors import CapabilityError
from gateway.spec import parse_spec
from gateway.states import State

CATALOG = load_catalog("aws/catalog.yaml")


def spec(**resources: object) -> object:
    requires = resources.pop("requires", [])
    return parse_spec({"name": "j", "command": "true", "resources": resources, "requires": requires})


def test_profile_refuses_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="extra"):
        AwsProfile.model_validate({"regoin": "us-east-1"})
    with pytest.raises(ValidationError, match="owner"):
        AwsProfile.model_validate({"owner": "a'; echo foo"})
    with pytest.raises(ValidationError, match="6d"):
        AwsProfile.model_validate({"max_walltime": "8d"})
    p = AwsProfile.model_validate({"zones": ["a", "b"], "subnets": {"b": "subnet-1"}})
    assert p.placements() == [("a", None), ("b", "subnet-1")]


def test_cheapest_fitting_type_first_and_no_gpu_type_for_cpu_jobs() -> None:
    assert [t.name for t in CATALOG.match(spec(cpus_per_task=4, memory="10G"), True)][:2] == \
        ["m6i.xlarge", "r6i.2xlarge"]
    assert CATALOG.match(spec(gpus={"count": 1, "type": "a10g"}), True)[0].name == "g5.xlarge"
    assert all(not t.gpus.count for t in CATALOG.match(spec(cpus_per_task=2), True))
    assert CATALOG.match(spec(requires=["efa"]), False)[0].name == "hpc6a.48xlarge"
    with pytest.raises(CapabilityError, match="no instance type"):
        CATALOG.match(spec(gpus={"count": 16}), True)


def test_launch_plan_order_type_then_zone_then_on_demand() -> None:
    plan = CATALOG.launch_plan(spec(), True, [("a", None), ("b", "subnet-b")], limit=2)
    order = [(c.type.name, c.spot, z) for c, z, _ in plan]
    assert order == [("c6i.large", True, "a"), ("m6i.large", True, "a"),
                     ("c6i.large", True, "b"), ("m6i.large", True, "b"),
                     ("c6i.large", False, "a"), ("m6i.large", False, "a"),
                     ("c6i.large", False, "b"), ("m6i.large", False, "b")]
    # a type with no spot market is tried on demand only
    efa = CATALOG.launch_plan(spec(cpus_per_task=96, requires=["efa"]), True, [(None, None)], limit=1)
    assert [(c.type.name, c.spot) for c, _, _ in efa] == [("hpc6a.48xlarge", False)]


def _inst(state: str, **tags: str) -> dict[str, object]:
    base = {"hpcgw:key": "hpcgw.j1.1", "hpcgw:price": "0.5", "hpcgw:expiry": "1000"}
    return {"InstanceId": "i-1", "State": {"Name": state}, "InstanceType": "c6i.large",
            "LaunchTime": datetime.fromtimestamp(100, timezone.utc),
            "Tags": [{"Key": k, "Value": v} for k, v in {**base, **tags}.items()]}


def test_instance_states_and_silent_ends() -> None:
    assert live_observation(view(_inst("pending"))).state == State.QUEUED
    assert live_observation(view(_inst("running"))).state == State.RUNNING
    assert silent_end(view(_inst("terminated", **{"hpcgw:cancelled": "1"})), 50, 0).state == State.CANCELLED
    reaped = silent_end(view(_inst("terminated")), 2000, 0)
    assert (reaped.state, reaped.kind) == (State.FAILED, "lost")
    spot = {**_inst("terminated"), "StateReason": {"Code": "Server.SpotInstanceTermination"}}
    assert silent_end(view(spot), 50, 0).kind == "preempted"
    assert silent_end(view(_inst("terminated")), 50, 0).kind == "node_fail"


def test_status_objects_become_observations() -> None:
    inst = view(_inst("terminated"))
    ok = finished_observation(inst, {"outcome": "exited", "exit_code": 0, "ended_at": 200}, 0.01)
    assert (ok.state, ok.extra["cost"]) == (State.SUCCEEDED, "0.010000")
    pre = finished_observation(inst, {"outcome": "preempted", "exit_code": 143}, 0.0)
    assert (pre.state, pre.kind) == (State.FAILED, "preempted")
    late = finished_observation(inst, {"outcome": "timeout", "exit_code": 143}, 0.0)
    assert late.state == State.TIMEOUT


def test_cost_and_budget_ledger(tmp_path: Path) -> None:
    assert instance_cost(3.6, 10) == pytest.approx(0.06)        # one minute at least
    assert instance_cost(3.6, 3600) == pytest.approx(3.6)
    ledger = Ledger(tmp_path / "ledger.json")
    assert ledger.reserve("k1", 1.0, "p", None, None) is None
    ledger.settle("k1", 0.25)
    assert ledger.spent() == pytest.approx(0.25) and ledger.spent("p") == pytest.approx(0.25)


def test_outputs_tar_cannot_escape(tmp_path: Path) -> None:
    import io
    import tarfile

    tar_path = tmp_path / "o.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in ("ok/a.txt", "../evil", "/abs"):
            data = b"x"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert extract_outputs(tar_path, tmp_path / "out") == ["ok/a.txt"]
    assert not (tmp_path / "evil").exists()


def test_node_sets_spot_history_and_cluster_cost() -> None:
    from gateway.backends.aws.cluster import cost_of, join_ref, live, split_ref
    from gateway.backends.aws.instances import complete, nodes_by_key
    from gateway.backends.aws.pricing import newest

    def node(n: int, state: str = "running", **tags: str) -> object:
        inst = _inst(state, **{"hpcgw:node": str(n), "hpcgw:nodes": "2", **tags})
        return view({**inst, "InstanceId": f"i-{n}{state[0]}"})

    sets = nodes_by_key([node(0), node(1, "terminated", **{"hpcgw:discarded": "1"})])
    assert list(sets["hpcgw.j1.1"]) == [0] and not complete(sets["hpcgw.j1.1"])
    full = nodes_by_key([node(0), node(1, "terminated"), node(1)])["hpcgw.j1.1"]
    assert complete(full) and full[1].id == "i-1r"          # the live one wins
    assert live([full[0], full[1]]).state == State.RUNNING
    assert live([full[0], node(1, "pending")]).state == State.QUEUED
    assert split_ref(join_ref(["i-a", "i-b"])) == ["i-a", "i-b"] and split_ref("i-a") == ["i-a"]
    assert cost_of([full[0], full[1]], 100 + 3600) == pytest.approx(1.0)   # 2 x 0.5 USD/h
    old, new = datetime(2020, 1, 1, tzinfo=timezone.utc), datetime(2021, 1, 1, tzinfo=timezone.utc)
    hist = [{"InstanceType": "c6i.large", "AvailabilityZone": "a", "SpotPrice": "0.02", "Timestamp": new},
            {"InstanceType": "c6i.large", "AvailabilityZone": "a", "SpotPrice": "0.09", "Timestamp": old}]
    assert newest(hist) == {("c6i.large", "a"): 0.02}
