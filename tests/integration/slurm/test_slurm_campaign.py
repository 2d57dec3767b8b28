"""Campaigns on the real Slurm cluster: members go as one array throttled to the limit."""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import pytest
from slurm_it import REPO

from gateway.api import Gateway
from gateway.campaigns.apply import apply
from gateway.campaigns.spec import load_campaign
from gateway.states import State
from gateway.testing.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.slurm]


def _gateway(cluster: SlurmCluster, tmp_path: Path, lost_after_misses: int = 30) -> Gateway:
    profile = {"env": {**cluster.env, "PYTHONPATH": str(REPO)}}
    return Gateway({"data_dir": str(tmp_path / "data"),
                    "agent": {"lost_after_misses": lost_after_misses},
                    "backends": {"slurm": {"profiles": {"test": profile}}}})


def _campaign(tmp_path: Path, n: int, limit: int, command: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""\
        campaign: slurm-sweep
        template: {{command: '{command}', resources: {{walltime: 5m}}}}
        parameters: {{list: {[{"i": i} for i in range(n)]}}}
        concurrency: {limit}
        target: slurm:test
        """))
    return path


def _drive(gw: Gateway, timeout: float = 1500) -> None:
    """``hpcgw agent``'s loop (``Gateway.agent``: a pass per ``agent.interval_s``; back to
    back they would take CPU from the jobs) until every job ended."""
    gw.agent(stop_after=timeout, until_idle=True)
    if not all(j.state.terminal for j in gw.store.jobs(limit=5000)):
        raise AssertionError(f"not finished: {gw.store.counts()}")


def test_members_go_as_one_array_throttled_to_the_limit(slurm_cluster: SlurmCluster,
                                                        tmp_path: Path) -> None:
    gw = _gateway(slurm_cluster, tmp_path)
    try:
        spec, base = load_campaign(_campaign(tmp_path, 12, 3, "sleep 0.5; echo {{i}}"))
        apply(gw, spec, base)
        backend = gw.backends.get("slurm:test")
        assert backend.calls["sbatch"] == 1  # type: ignore[attr-defined]
        jobs = gw.store.campaign_jobs("slurm-sweep")
        script = (gw.config.jobs_path / jobs[0].id / "1" / "job.sbatch").read_text()
        assert re.search(r"--array[= ]\"?0-11%3\"?", script), script
        _drive(gw)
        jobs = gw.store.campaign_jobs("slurm-sweep")
        assert [j.state for j in jobs] == [State.SUCCEEDED] * 12
        spans = [(j.started_at or 0, j.ended_at or 0) for j in jobs]
        assert max(sum(1 for a, b in spans if a <= s < b) for s, _ in spans) <= 3
        # a second apply adds nothing; a new member waits for the running array to end
        assert apply(gw, spec, base).counts() == {"done": 12}
    finally:
        gw.close()


@pytest.mark.slow
def test_a_campaign_of_2000_jobs_completes_through_arrays(slurm_cluster: SlurmCluster,
                                                          tmp_path: Path) -> None:
    gw = _gateway(slurm_cluster, tmp_path)
    try:
        spec, base = load_campaign(_campaign(tmp_path, 2000, 2000, "true"))
        apply(gw, spec, base)
        _drive(gw)
        assert gw.store.counts() == {"SUCCEEDED": 2000}
        calls = gw.backends.get("slurm:test").calls  # type: ignore[attr-defined]
        assert calls["sbatch"] == 4  # arrays of at most 500 tasks
    finally:
        gw.close()


def test_cancelling_a_throttled_array_ends_every_member_cancelled(slurm_cluster: SlurmCluster,
                                                                 tmp_path: Path) -> None:
    """Slurm keeps no record of a pending array task once it is cancelled (squeue stops
    listing it at once): those members end CANCELLED, not LOST, at the default
    ``lost_after_misses``; the running one ends CANCELLED from Slurm's own record."""
    gw = _gateway(slurm_cluster, tmp_path, lost_after_misses=3)   # the default
    try:
        spec, base = load_campaign(_campaign(tmp_path, 3, 1, "sleep 120"))
        apply(gw, spec, base)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until one member runs
            gw.reconcile()
            if any(j.state == State.RUNNING for j in gw.store.campaign_jobs("slurm-sweep")):
                break
            time.sleep(0.2)
        jobs = gw.store.campaign_jobs("slurm-sweep")
        assert [j.state for j in jobs].count(State.RUNNING) == 1, [j.state for j in jobs]
        gw.cancel([j.id for j in jobs])
        # passes until every member ended (the running one shows COMPLETING, still RUNNING
        # here, until Slurm has killed it), then ten more: the pending ones are gone from
        # squeue at once, so a LOST verdict would come within three passes
        gw.agent(interval=0.2, stop_after=120, until_idle=True)
        for _ in range(10):
            gw.reconcile()
        ended = gw.store.campaign_jobs("slurm-sweep")
        assert [j.state for j in ended] == [State.CANCELLED] * 3, \
            [(j.state, j.reason) for j in ended]
        assert gw.backends.get("slurm:test").calls["sbatch"] == 1  # type: ignore[attr-defined]
    finally:
        gw.close()
