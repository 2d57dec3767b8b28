"""The reconciler against a scripted in-memory backend (fast; real backends have their own
integration tests). Each test drives passes and checks states and events."""

from __future__ import annotations

import json
from typing import Sequence

import pytest

from gateway.api import Gateway
from gateway.backends.base import Capabilities, Observation, SubmitOutcome, SubmitRequest
from gateway.errors import BackendUnavailable
from gateway.states import State


class Scripted:
    name = "local"

    def __init__(self) -> None:
        self.jobs: dict[str, State] = {}
        self.submitted: list[str] = []
        self.down = False
        self.transient = False
        self.refuse = False
        self.forget = False
        self.polls = 0

    def capabilities(self) -> Capabilities:
        return Capabilities(max_nodes=4, max_cpus=64)

    def capacity(self) -> None:
        return None

    def submit(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]:
        if self.down:
            raise BackendUnavailable("controller down")
        out = []
        for r in requests:
            if self.transient:
                out.append(SubmitOutcome(r.key, error="socket timed out", transient=True))
            elif self.refuse:
                out.append(SubmitOutcome(r.key, error="Invalid partition"))
            else:
                self.jobs[r.key] = State.QUEUED
                self.submitted.append(r.key)
                out.append(SubmitOutcome(r.key, ref=r.key))
        return out

    def poll(self, refs: Sequence[str]) -> dict[str, Observation]:
        self.polls += 1
        if self.down:
            raise BackendUnavailable("controller down")
        if self.forget:
            return {}
        return {r: Observation(r, self.jobs[r], exit_code=0 if self.jobs[r] == State.SUCCEEDED else None)
                for r in refs if r in self.jobs}

    def cancel(self, refs: Sequence[str]) -> None:
        for r in refs:
            self.jobs[r] = State.CANCELLED

    def adopt(self, keys: Sequence[str]) -> dict[str, str]:
        return {k: k for k in keys if k in self.jobs}

    def log_paths(self, ref, attempt_dir):
        return {}


@pytest.fixture
def setup(tmp_path):
    backend = Scripted()
    gw = Gateway({"data_dir": str(tmp_path / "d")}, backends={"local": backend})
    yield gw, backend
    gw.close()


def states(gw):
    return [j.state for j in gw.store.jobs(newest_first=False)]


def test_one_poll_per_pass_whatever_the_number_of_jobs(setup):
    gw, backend = setup
    gw.submit_many([{"name": f"j{i}", "command": "true"} for i in range(30)])
    assert states(gw) == [State.QUEUED] * 30
    before = backend.polls
    report = gw.reconcile()
    assert backend.polls - before == 1 and report.polls == {"local": 1}


def test_transient_submit_errors_back_off_and_never_double_submit(setup):
    gw, backend = setup
    backend.transient = True
    job = gw.submit({"name": "a", "command": "true"})
    rec = gw.store.get(job.id)
    assert rec.state == State.SUBMITTING and rec.not_before > 0 and "socket" in rec.reason
    backend.transient = False
    gw.store.update(job.id, not_before=0)
    gw.reconcile()
    assert gw.store.get(job.id).state == State.QUEUED and backend.submitted == [f"hpcgw.{job.id}.1"]


def test_submission_that_went_through_before_a_crash_is_adopted(setup):
    gw, backend = setup
    backend.transient = True
    job = gw.submit({"name": "a", "command": "true"})
    backend.jobs[f"hpcgw.{job.id}.1"] = State.RUNNING  # it did reach the backend after all
    backend.transient = False
    gw.store.update(job.id, not_before=0)
    gw.reconcile()
    assert gw.store.get(job.id).state == State.RUNNING
    assert backend.submitted == [] and "adopted" in [e.kind for e in gw.store.events(job.id)]


def test_refusal_fails_the_job_with_the_backends_reason(setup):
    gw, backend = setup
    backend.refuse = True
    job = gw.submit({"name": "a", "command": "true"})
    rec = gw.store.get(job.id)
    assert rec.state == State.FAILED and rec.kind == "refused" and "Invalid partition" in rec.reason


def test_backend_down_changes_nothing(setup):
    gw, backend = setup
    job = gw.submit({"name": "a", "command": "true"})
    backend.down = True
    for _ in range(5):
        report = gw.reconcile()
        assert report.unavailable
    assert gw.store.get(job.id).state == State.QUEUED and gw.store.get(job.id).misses == 0


def test_forgotten_job_becomes_lost_after_misses_unless_it_left_a_status(setup):
    gw, backend = setup
    a = gw.submit({"name": "a", "command": "true"})
    b = gw.submit({"name": "b", "command": "true"})
    adir = gw.config.jobs_path / b.id / "1"
    (adir / "status.json").write_text(json.dumps({"outcome": "exited", "exit_code": 0}))
    backend.forget = True
    gw.reconcile()
    assert gw.store.get(a.id).state == State.QUEUED  # one miss is not enough
    for _ in range(3):
        gw.reconcile()
    assert gw.store.get(a.id).state == State.LOST
    assert gw.store.get(b.id).state == State.SUCCEEDED


def test_a_cancelled_job_the_backend_forgot_ends_cancelled_not_lost(setup):
    """Slurm drops a pending array task from squeue the moment it is cancelled: after the
    cancel was sent, vanishing is the cancel taking effect. A job nobody cancelled that
    vanishes in the same passes is still LOST."""
    gw, backend = setup
    a = gw.submit({"name": "a", "command": "true", "retries": {"max": 2}})
    b = gw.submit({"name": "b", "command": "true"})
    backend.forget = True
    gw.cancel([a.id])
    for _ in range(3):
        gw.reconcile()
    rec = gw.store.get(a.id)
    assert (rec.state, rec.kind, rec.attempt) == (State.CANCELLED, "cancelled", 1)
    assert "kept no record" in rec.reason
    assert gw.store.get(b.id).state == State.LOST
    assert backend.submitted == [f"hpcgw.{a.id}.1", f"hpcgw.{b.id}.1"]   # no retry


def test_lost_is_retried_by_default_policy(setup):
    gw, backend = setup
    job = gw.submit({"name": "a", "command": "true", "retries": {"max": 1}})
    backend.forget = True
    for _ in range(3):
        gw.reconcile()
    backend.forget = False
    rec = gw.store.get(job.id)
    assert rec.attempt == 2 and rec.state == State.QUEUED
    assert backend.submitted == [f"hpcgw.{job.id}.1", f"hpcgw.{job.id}.2"]


def test_cancel_reaches_the_backend_once(setup):
    gw, backend = setup
    job = gw.submit({"name": "a", "command": "true"})
    gw.cancel([job.id])
    assert gw.store.get(job.id).state == State.CANCELLED
    kinds = [e.kind for e in gw.store.events(job.id)]
    assert kinds.count("cancel-sent") == 1
