"""The store's schema, as an ordered list of migrations (``PRAGMA user_version`` = applied).

Never edit a released migration: append a new one.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: jobs, their attempts, labels and the append-only event log
    """
    CREATE TABLE jobs (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL,
        state           TEXT NOT NULL,
        target          TEXT NOT NULL,
        backend         TEXT,
        attempt         INTEGER NOT NULL DEFAULT 0,
        ref             TEXT,
        spec_json       TEXT NOT NULL,
        spec_digest     TEXT NOT NULL,
        created_at      REAL NOT NULL,
        updated_at      REAL NOT NULL,
        submitted_at    REAL,
        started_at      REAL,
        ended_at        REAL,
        exit_code       INTEGER,
        kind            TEXT,
        reason          TEXT,
        node            TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        cancel_sent_at  REAL,
        not_before      REAL NOT NULL DEFAULT 0,
        misses          INTEGER NOT NULL DEFAULT 0,
        provenance_json TEXT,
        outputs_json    TEXT
    );
    CREATE INDEX jobs_state ON jobs(state);
    CREATE TABLE attempts (
        job_id      TEXT NOT NULL REFERENCES jobs(id),
        attempt     INTEGER NOT NULL,
        backend     TEXT NOT NULL,
        ref         TEXT,
        state       TEXT NOT NULL,
        exit_code   INTEGER,
        kind        TEXT,
        reason      TEXT,
        node        TEXT,
        submitted_at REAL,
        started_at  REAL,
        ended_at    REAL,
        PRIMARY KEY (job_id, attempt)
    );
    CREATE TABLE labels (
        job_id  TEXT NOT NULL REFERENCES jobs(id),
        key     TEXT NOT NULL,
        value   TEXT NOT NULL,
        PRIMARY KEY (job_id, key)
    );
    CREATE INDEX labels_kv ON labels(key, value);
    CREATE TABLE events (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id    TEXT NOT NULL,
        at        REAL NOT NULL,
        kind      TEXT NOT NULL,
        old_state TEXT,
        new_state TEXT,
        message   TEXT,
        data_json TEXT
    );
    CREATE INDEX events_job ON events(job_id, seq);
    CREATE TRIGGER events_append_only_u BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
    CREATE TRIGGER events_append_only_d BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
    """,
    # 2: filter by target cheaply in `hpcgw ls --target`
    """
    CREATE INDEX jobs_target ON jobs(target);
    """,
    # 3: campaigns, result cache keys, cost
    """
    CREATE TABLE campaigns (
        name        TEXT PRIMARY KEY,
        spec_json   TEXT NOT NULL,
        concurrency INTEGER NOT NULL DEFAULT 0,
        core_hours  REAL,
        money       REAL,
        created_at  REAL NOT NULL,
        applied_at  REAL NOT NULL
    );
    ALTER TABLE jobs ADD COLUMN campaign TEXT;
    ALTER TABLE jobs ADD COLUMN member TEXT;
    ALTER TABLE jobs ADD COLUMN result_key TEXT;
    ALTER TABLE jobs ADD COLUMN cached_from TEXT;
    ALTER TABLE jobs ADD COLUMN cost REAL;
    CREATE INDEX jobs_campaign ON jobs(campaign, member);
    CREATE INDEX jobs_result ON jobs(result_key, state);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
