"""The durable store: one SQLite file in WAL mode, safe for several processes at once.

Every state change is one ``BEGIN IMMEDIATE`` transaction that checks the state machine,
updates the job row and appends its event, so the event log and the rows never disagree.
Writers serialise on SQLite's write lock (``busy_timeout`` waits for it); readers never block.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from gateway.errors import NotFoundError, StoreError, TransitionError
from gateway.ids import new_job_id
from gateway.states import TERMINAL, State, can_transition
from gateway.store.records import Event, JobRecord
from gateway.store.schema import MIGRATIONS, SCHEMA_VERSION

JOB_FIELDS = frozenset({
    "backend", "attempt", "ref", "submitted_at", "started_at", "ended_at", "exit_code", "kind",
    "reason", "node", "cancel_requested", "cancel_sent_at", "cost", "result_key", "not_before", "misses", "provenance_json", "outputs_json"})


@dataclass
class Change:
    """One job's change inside a batch: optional new state, fields, and its event."""

    job_id: str
    state: State | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    event: str = "state"
    message: str | None = None
    data: Mapping[str, Any] | None = None
    expect: State | None = None


class Store:
    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None

    # -- connection and schema ------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            self._wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the store at {self.path}: {exc}; "
                             "check the path (store.path / HPCGW_DATA_DIR) and permissions") from exc
        self._migrate(conn)
        return conn

    def _wal(self, conn: sqlite3.Connection) -> None:
        """Put the store in WAL mode. Switching needs the database to itself, and SQLite
        answers "database is locked" at once when another process opens a new store at
        the same moment (its busy timeout does not cover the switch: seen in CI with
        three processes creating one store), so retry until the busy timeout."""
        deadline = time.monotonic() + self.busy_timeout_s
        pause = 0.005
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.2)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"the store at {self.path} has schema {version}, newer than this "
                             f"hpcgw understands ({SCHEMA_VERSION}); upgrade hpcgw")
        while version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                current = conn.execute("PRAGMA user_version").fetchone()[0]
                if current == version:  # nobody migrated it meanwhile
                    for statement in _statements(MIGRATIONS[version]):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {version + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            version = conn.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"the store at {self.path} is busy or unwritable: {exc}") from exc
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- writing --------------------------------------------------------------------------
    def insert_jobs(self, specs: Sequence[Any], *,
                    provenance: Sequence[Mapping[str, Any]] | None = None,
                    result_keys: Sequence[str | None] | None = None,
                    cached: Sequence[JobRecord | None] | None = None) -> list[str]:
        """Record specs as PENDING jobs (one transaction) and return their new ids.

        A spec with a ``cached`` record (same result key, already SUCCEEDED) is recorded as
        SUCCEEDED at once, pointing at the job whose outputs it reuses.
        """
        now = time.time()
        ids = []
        with self.tx() as conn:
            for index, spec in enumerate(specs):
                prov = dict(provenance[index]) if provenance else {}
                source = cached[index] if cached else None
                key = result_keys[index] if result_keys else None
                job_id = self._insert_row(conn, spec, now, prov, key, source)
                conn.executemany("INSERT INTO labels (job_id, key, value) VALUES (?,?,?)",
                                 [(job_id, k, v) for k, v in spec.labels.items()])
                self._event(conn, job_id, now, "submitted", None, State.PENDING,
                            f"spec {spec.spec_digest[:19]}", None)
                if source is not None:
                    self._event(conn, job_id, now, "cached", State.PENDING, State.SUCCEEDED,
                                f"result reused from job {source.id}", {"cached_from": source.id})
                ids.append(job_id)
        return ids

    def _insert_row(self, conn: sqlite3.Connection, spec: Any, now: float, prov: dict[str, Any],
                    key: str | None, source: JobRecord | None) -> str:
        state, extra = State.PENDING, {}
        if source is not None:
            state = State.SUCCEEDED
            prov = {**source.provenance, **prov, "cached_from": source.id,
                    "cached_attempt": source.attempt}
            extra = {"exit_code": 0, "outputs_json": source.outputs_json, "cached_from": source.id,
                     "ended_at": now, "reason": f"cached: result of {source.id}", "cost": 0.0}
        labels = spec.labels
        columns = {"name": spec.name, "state": state.value, "target": spec.target,
                   "spec_json": spec.canonical_json(), "spec_digest": spec.spec_digest,
                   "created_at": now, "updated_at": now,
                   "provenance_json": json.dumps(prov, sort_keys=True) if prov else None,
                   "campaign": labels.get("hpcgw.campaign"), "member": labels.get("hpcgw.member"),
                   "result_key": key, **extra}
        sql = (f"INSERT INTO jobs (id, {', '.join(columns)}) "
               f"VALUES (?, {', '.join('?' * len(columns))})")
        for _ in range(10):
            job_id = new_job_id()
            try:
                conn.execute(sql, (job_id, *columns.values()))
                return job_id
            except sqlite3.IntegrityError:
                continue
        raise StoreError("could not draw a unique job id")

    def apply(self, changes: Sequence[Change]) -> list[str]:
        """Apply changes in ONE transaction; each state change is checked and evented.

        A change whose ``expect`` no longer holds (another process moved the job) is skipped
        and its id returned, so callers can tell what they did not do.
        """
        now, skipped = time.time(), []
        with self.tx() as conn:
            for change in changes:
                row = conn.execute("SELECT state FROM jobs WHERE id = ?", (change.job_id,)).fetchone()
                if row is None:
                    raise NotFoundError(f"no job {change.job_id}")
                old = State(row["state"])
                if change.expect is not None and old != change.expect:
                    skipped.append(change.job_id)
                    continue
                if change.state is not None and change.state != old:
                    if not can_transition(old, change.state):
                        raise TransitionError(change.job_id, old.value, change.state.value)
                self._update(conn, change, old, now)
        return skipped

    def transition(self, job_id: str, state: State, *, expect: State | None = None,
                   message: str | None = None, event: str = "state", **fields: Any) -> bool:
        skipped = self.apply([Change(job_id, state, fields, event, message, None, expect)])
        return not skipped

    def update(self, job_id: str, *, event: str | None = None, message: str | None = None,
               data: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Change fields without a state change; an event is written when ``event`` is given."""
        with self.tx() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no job {job_id}")
            self._update(conn, Change(job_id, None, fields, event or "", message, data),
                         State(row["state"]), time.time())

    def _update(self, conn: sqlite3.Connection, change: Change, old: State, now: float) -> None:
        unknown = set(change.fields) - JOB_FIELDS
        if unknown:
            raise StoreError(f"unknown job fields {sorted(unknown)}")
        columns = dict(change.fields, updated_at=now)
        if change.state is not None:
            columns["state"] = change.state.value
        sets = ", ".join(f"{name} = ?" for name in columns)
        conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*columns.values(), change.job_id))
        if change.event:
            new = change.state if change.state is not None and change.state != old else None
            self._event(conn, change.job_id, now, change.event, old if new else None, new,
                        change.message, change.data)

    @staticmethod
    def _event(conn: sqlite3.Connection, job_id: str, at: float, kind: str, old: State | None,
               new: State | None, message: str | None, data: Mapping[str, Any] | None) -> None:
        conn.execute(
            "INSERT INTO events (job_id, at, kind, old_state, new_state, message, data_json)"
            " VALUES (?,?,?,?,?,?,?)",
            (job_id, at, kind, old.value if old else None, new.value if new else None, message,
             json.dumps(data, sort_keys=True) if data else None))

    def record_attempt(self, job_id: str, attempt: int, backend: str, **fields: Any) -> None:
        names = ["ref", "state", "exit_code", "kind", "reason", "node", "submitted_at",
                 "started_at", "ended_at"]
        values = {k: v for k, v in fields.items() if k in names}
        with self.tx() as conn:
            conn.execute("INSERT OR IGNORE INTO attempts (job_id, attempt, backend, state)"
                         " VALUES (?,?,?,?)", (job_id, attempt, backend, fields.get("state", "")))
            if values:
                sets = ", ".join(f"{k} = ?" for k in values)
                conn.execute(f"UPDATE attempts SET {sets} WHERE job_id = ? AND attempt = ?",
                             (*values.values(), job_id, attempt))

    def request_cancel(self, job_ids: Sequence[str]) -> list[str]:
        """Mark jobs for cancellation; PENDING ones are cancelled at once. Returns changed ids."""
        changed, now = [], time.time()
        with self.tx() as conn:
            for job_id in job_ids:
                row = conn.execute("SELECT state, cancel_requested FROM jobs WHERE id = ?",
                                   (job_id,)).fetchone()
                if row is None:
                    raise NotFoundError(f"no job {job_id}")
                old = State(row["state"])
                if old in TERMINAL or row["cancel_requested"]:
                    continue
                if old == State.PENDING:
                    change = Change(job_id, State.CANCELLED, {"cancel_requested": 1, "ended_at": now,
                                    "kind": "cancelled", "reason": "cancelled before submission"})
                else:
                    change = Change(job_id, None, {"cancel_requested": 1}, "cancel-requested")
                self._update(conn, change, old, now)
                changed.append(job_id)
        return changed

    # -- reading --------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        row = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job with id {job_id!r}; `hpcgw ls` lists job ids")
        return JobRecord.from_row(row)

    def resolve(self, prefix: str) -> str:
        """A full id from a unique prefix (as git and docker accept)."""
        prefix = prefix.strip().lower()
        if not prefix:
            raise NotFoundError("empty job id")
        rows = self.conn.execute("SELECT id FROM jobs WHERE id >= ? AND id < ? LIMIT 2",
                                 (prefix, prefix + "\x7f")).fetchall()
        if not rows:
            raise NotFoundError(f"no job with id {prefix!r}; `hpcgw ls` lists job ids")
        if len(rows) > 1:
            raise NotFoundError(f"job id prefix {prefix!r} is ambiguous; give more characters")
        return str(rows[0]["id"])

    def jobs(self, *, states: Sequence[State] | None = None, target: str | None = None,
             labels: Mapping[str, str] | None = None, name: str | None = None,
             limit: int | None = None, newest_first: bool = True,
             ids: Sequence[str] | None = None) -> list[JobRecord]:
        where, params = [], []  # type: list[str], list[Any]
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            params += [s.value for s in states]
        if target:
            where.append("(target = ? OR target LIKE ?)")
            params += [target, target + ":%"]
        if name:
            where.append("name = ?")
            params.append(name)
        if ids is not None:
            where.append(f"id IN ({','.join('?' * len(ids))})")
            params += list(ids)
        for key, value in (labels or {}).items():
            where.append("id IN (SELECT job_id FROM labels WHERE key = ? AND value = ?)")
            params += [key, value]
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id " + ("DESC" if newest_first else "ASC")
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [JobRecord.from_row(r) for r in self.conn.execute(sql, params)]

    def events(self, job_id: str) -> list[Event]:
        rows = self.conn.execute("SELECT * FROM events WHERE job_id = ? ORDER BY seq", (job_id,))
        return [Event.from_row(r) for r in rows]

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY attempt",
                                 (job_id,))
        return [dict(r) for r in rows]

    def find_result(self, key: str) -> JobRecord | None:
        """The newest SUCCEEDED job that ran (not itself cached) with this result key."""
        row = self.conn.execute(
            "SELECT * FROM jobs WHERE result_key = ? AND state = 'SUCCEEDED' AND cached_from IS NULL"
            " ORDER BY id DESC LIMIT 1", (key,)).fetchone()
        return JobRecord.from_row(row) if row else None

    def campaign_jobs(self, name: str) -> list[JobRecord]:
        rows = self.conn.execute("SELECT * FROM jobs WHERE campaign = ? ORDER BY id", (name,))
        return [JobRecord.from_row(r) for r in rows]

    def save_campaign(self, name: str, spec_json: str, concurrency: int,
                      core_hours: float | None, money: float | None) -> None:
        now = time.time()
        with self.tx() as conn:
            conn.execute(
                "INSERT INTO campaigns (name, spec_json, concurrency, core_hours, money, created_at,"
                " applied_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET"
                " spec_json = excluded.spec_json, concurrency = excluded.concurrency,"
                " core_hours = excluded.core_hours, money = excluded.money,"
                " applied_at = excluded.applied_at",
                (name, spec_json, concurrency, core_hours, money, now, now))

    def campaign(self, name: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM campaigns WHERE name = ?", (name,)).fetchone()
        return dict(row) if row else None

    def campaign_limits(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT name, concurrency FROM campaigns WHERE concurrency > 0")
        return {r["name"]: r["concurrency"] for r in rows}

    def counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}


def _statements(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    out, buf = [], ""
    for line in script.strip().splitlines():
        buf += line + "\n"
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out
