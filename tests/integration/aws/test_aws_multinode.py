"""Multi-node attempts against moto, every node's real user-data run by the emulator.

What is emulated: each node is a separate bash process on this machine; IMDS gives every
node the address 127.0.0.1, so the hostfile lists 127.0.0.1 once per slot and mpirun starts
all ranks here (Open MPI treats them as local: no ssh between nodes is exercised). moto
does not implement placement groups: a fake answers create/delete (tests/.../FakePlacementGroups);
moto accepts and ignores ``Placement.GroupName`` in run_instances.
"""

from __future__ import annotations

import json
import shutil
from typing import Any, Callable

import pytest

from gateway.states import State
from test_aws_cloud import Cloud

pytestmark = [pytest.mark.integration, pytest.mark.aws, pytest.mark.timeout(120)]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI's mpirun")
def test_three_nodes_run_mpi_over_the_rendezvous_hostfile(cloud: Callable[..., Cloud],
                                                            emulator: Any) -> None:
    c = cloud(reap_interval_s=0)
    emu = emulator(owner=c.owner)
    script = ('echo "rank $OMPI_COMM_WORLD_RANK of $OMPI_COMM_WORLD_SIZE nodes $HPCGW_NODES"; '
              'if [ "$OMPI_COMM_WORLD_RANK" = 0 ]; then cp "$HPCGW_HOSTFILE" hosts.txt; fi')
    job = c.submit(command=["sh", "-c", script], mpi="mpirun", outputs=["hosts.txt"],
                   resources={"nodes": 3, "tasks_per_node": 1})
    rec = c.until(job)
    assert rec.state == State.SUCCEEDED, (rec.reason, c.gw.logs(job, "stderr"))
    lines = sorted(c.gw.logs(job).split("\n")[:-1])
    assert lines == [f"rank {r} of 3 nodes 3" for r in range(3)]
    [hosts] = c.gw.outputs(job)
    assert hosts.read_text() == "127.0.0.1\n" * 3
    insts = c.instances(f"hpcgw.{job}.1")
    assert len(insts) == 3 and len(emu.ran) == 3
    tags = sorted(({t["Key"]: t["Value"] for t in i["Tags"]}["hpcgw:node"] for i in insts))
    assert tags == ["0", "1", "2"]
    assert all(i["State"]["Name"] == "terminated" for i in insts)
    # one placement group for the attempt, named in every run_instances, tagged, deleted
    group = f"hpcgw-hpcgw.{job}.1"
    runs = c.seen["run_instances"]
    assert [r["Placement"]["GroupName"] for r in runs] == [group] * 3
    assert len({r["ClientToken"] for r in runs}) == 3
    assert {"Key": "hpcgw:owner", "Value": c.owner} in c.seen["create_placement_group"][0][
        "TagSpecifications"][0]["Tags"]
    c.until(job, lambda r: group in c.pgs.deleted, limit=20)
    assert c.pgs.deleted == [group]
    # cost: the three nodes' sum (each billed a minute at least)
    launch = json.loads((c.home / "jobs" / job / "1" / "aws.json").read_text())
    assert launch["nodes"] == 3 and len(launch["instance_ids"]) == 3
    assert rec.cost == pytest.approx(3 * launch["price_per_hour"] / 60, rel=0.5)


def test_workers_powered_off_before_node_0_is_gone_is_success(cloud: Callable[..., Cloud],
                                                              emulator: Any) -> None:
    """A worker powers off once node 0's status is in; node 0 may still be shutting down
    when the gateway next looks. That is a finished attempt, not a lost node."""
    c = cloud(reap_interval_s=0)
    emulator(owner=c.owner, poweroff_delay=lambda tags: 6.0 if tags["hpcgw:node"] == "0" else 0)
    job = c.submit(command=["sh", "-c", "echo done on $HPCGW_NODES"], resources={"nodes": 2})
    rec = c.until(job)
    assert rec.state == State.SUCCEEDED, rec.reason
    assert c.gw.logs(job) == "done on 2\n"
    assert all(i["State"]["Name"] == "terminated" for i in c.instances(f"hpcgw.{job}.1"))


def test_multi_node_limits_come_from_the_profile(cloud: Callable[..., Cloud]) -> None:
    c = cloud(max_nodes=2)
    caps = c.backend.capabilities()
    assert caps.max_nodes == 2 and "mpirun" in caps.mpi
    with pytest.raises(Exception, match="at most 2 node"):
        c.submit(command=["true"], resources={"nodes": 3})


def test_a_worker_lost_ends_the_attempt(cloud: Callable[..., Cloud], emulator: Any) -> None:
    c = cloud()
    emulator(owner=c.owner, ignore=lambda tags: tags.get("hpcgw:node") == "1")
    job = c.submit(command=["sleep", "60"], resources={"nodes": 2})
    rec = c.until(job, lambda r: r.state == State.RUNNING)
    before = c.backend.calls["ec2.DescribeInstances"]
    obs = c.backend.poll([rec.ref])[rec.ref]            # ONE describe for both nodes
    assert c.backend.calls["ec2.DescribeInstances"] == before + 1
    assert (obs.state, obs.extra["nodes"], rec.ref.count(",")) == (State.RUNNING, "2", 1)
    [worker] = [i for i in c.instances(f"hpcgw.{job}.1")
                if {"Key": "hpcgw:node", "Value": "1"} in i["Tags"]]
    c.ec2.terminate_instances(InstanceIds=[worker["InstanceId"]])   # the node fails
    rec = c.until(job)
    assert (rec.state, rec.kind) == (State.FAILED, "node_fail"), rec.reason
    assert "node 1" in (rec.reason or "")
    assert all(i["State"]["Name"] == "terminated" for i in c.instances(f"hpcgw.{job}.1"))


def test_a_half_launched_cluster_gets_only_its_missing_nodes(cloud: Callable[..., Cloud]) -> None:
    """A gateway killed after launching node 0 of 2: the next pass finds node 0 by key and
    index and launches node 1 only, in the same type and zone."""
    c = cloud()
    job = c.submit(command=["true"], resources={"nodes": 2})
    key = f"hpcgw.{job}.1"
    tags = {"hpcgw:key": key, "hpcgw:job": job, "hpcgw:attempt": "1", "hpcgw:owner": c.owner,
            "hpcgw:profile": "test", "hpcgw:node": "0", "hpcgw:nodes": "2",
            "hpcgw:market": "spot", "hpcgw:price": "0.034", "hpcgw:expiry": "9999999999"}
    first = c.ec2.run_instances(
        ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="c6i.large",
        Placement={"AvailabilityZone": "us-east-1a"},
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
    node0 = first["Instances"][0]["InstanceId"]
    c.gw.reconcile(block=True)
    rec = c.gw.store.get(job)
    assert rec.ref is not None and rec.ref.split(",")[0] == node0, rec.reason
    [run] = c.seen["run_instances"]                       # node 1 only
    assert run["ClientToken"] == f"{key}.n1.0" and run["InstanceType"] == "c6i.large"
    assert {"Key": "hpcgw:node", "Value": "1"} in run["TagSpecifications"][0]["Tags"]
    assert len(c.instances(key)) == 2
    c.gw.cancel([job])
    assert c.until(job).state == State.CANCELLED
