"""The store: transitions with their events, migrations, several processes at once."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from gateway.errors import NotFoundError, StoreError, TransitionError
from gateway.spec import parse_spec
from gateway.states import State
from gateway.store import Change, Store
from gateway.store.schema import SCHEMA_VERSION


def make(store, n=1, **fields):
    return store.insert_jobs([parse_spec({"name": f"j{i}", "command": "true", **fields}) for i in range(n)])


def test_schema_is_versioned_and_wal(tmp_path):
    store = Store(tmp_path / "s.db")
    make(store)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / "s.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(StoreError, match="upgrade hpcgw"):
        Store(tmp_path / "s.db").conn


def test_each_transition_writes_its_event_and_illegal_ones_change_nothing(tmp_path):
    store = Store(tmp_path / "s.db")
    (job_id,) = make(store)
    store.transition(job_id, State.SUBMITTING, attempt=1, backend="local")
    with pytest.raises(TransitionError):
        store.apply([Change(job_id, State.QUEUED, {"ref": "r1"}),
                     Change(job_id, State.PENDING), Change(job_id, State.SUCCEEDED)])
    # the whole batch rolled back: still SUBMITTING, no ref, no extra events
    job = store.get(job_id)
    assert job.state == State.SUBMITTING and job.ref is None
    kinds = [(e.kind, e.old_state, e.new_state) for e in store.events(job_id)]
    assert kinds == [("submitted", None, "PENDING"), ("state", "PENDING", "SUBMITTING")]


def test_expect_guards_against_a_concurrent_change(tmp_path):
    store = Store(tmp_path / "s.db")
    (job_id,) = make(store)
    assert store.transition(job_id, State.SUBMITTING, expect=State.PENDING)
    assert not store.transition(job_id, State.SUBMITTING, expect=State.PENDING)


def test_events_are_append_only(tmp_path):
    store = Store(tmp_path / "s.db")
    (job_id,) = make(store)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.conn.execute("DELETE FROM events")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.conn.execute("UPDATE events SET kind = 'x'")


def test_ids_sort_by_creation_and_prefixes_resolve(tmp_path):
    store = Store(tmp_path / "s.db")
    ids = make(store, 20)
    assert ids == sorted(ids) and len(set(ids)) == 20
    assert [j.id for j in store.jobs(newest_first=False)] == ids
    assert store.resolve(ids[3]) == ids[3]
    with pytest.raises(NotFoundError, match="ambiguous"):
        store.resolve(ids[0][:3])
    with pytest.raises(NotFoundError):
        store.resolve("zzzzzzzzzzz")


def test_cancel_of_pending_is_immediate_and_of_terminal_is_a_no_op(tmp_path):
    store = Store(tmp_path / "s.db")
    a, b = make(store, 2)
    store.transition(b, State.SUBMITTING)
    assert store.request_cancel([a, b]) == [a, b]
    assert store.get(a).state == State.CANCELLED
    assert store.get(b).state == State.SUBMITTING and store.get(b).cancel_requested
    assert store.request_cancel([a, b]) == []


def test_label_and_state_filters(tmp_path):
    store = Store(tmp_path / "s.db")
    make(store, 3, labels={"project": "x"})
    make(store, 2, labels={"project": "y"}, target="slurm:gpu")
    assert len(store.jobs(labels={"project": "x"})) == 3
    assert len(store.jobs(target="slurm")) == 2
    assert len(store.jobs(states=[State.PENDING], limit=4)) == 4


def _worker(path: str, n: int, queue) -> None:  # pragma: no cover - runs in a child
    store = Store(path, busy_timeout_s=60)
    ids = make(store, n)
    for job_id in ids:
        store.transition(job_id, State.SUBMITTING, expect=State.PENDING, attempt=1)
        store.transition(job_id, State.QUEUED, ref=f"r-{job_id}")
    queue.put(ids)


def test_several_processes_write_at_once_without_loss(tmp_path):
    path = str(tmp_path / "s.db")
    Store(path).conn  # create the schema first, as the CLI does
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(path, 40, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    ids = [i for _ in procs for i in queue.get(timeout=120)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = Store(path)
    assert len(set(ids)) == 160
    assert store.counts() == {"QUEUED": 160}
    assert store.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 160 * 3


def test_migrating_at_the_same_time_from_two_processes(tmp_path):
    path = str(tmp_path / "s.db")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(path, 5, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert Store(path).counts() == {"QUEUED": 15}
