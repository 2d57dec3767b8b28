"""Read-only views of store rows."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from gateway.states import State


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    state: State
    target: str
    backend: str | None
    attempt: int
    ref: str | None
    spec_json: str
    spec_digest: str
    created_at: float
    updated_at: float
    submitted_at: float | None
    started_at: float | None
    ended_at: float | None
    exit_code: int | None
    kind: str | None
    reason: str | None
    node: str | None
    cancel_requested: bool
    cancel_sent_at: float | None
    not_before: float
    misses: int
    provenance_json: str | None
    outputs_json: str | None
    campaign: str | None = None
    member: str | None = None
    result_key: str | None = None
    cached_from: str | None = None
    cost: float | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "JobRecord":
        data = dict(row)
        data["state"] = State(data["state"])
        data["cancel_requested"] = bool(data["cancel_requested"])
        return cls(**data)

    @cached_property
    def spec(self) -> Any:
        from gateway.spec import JobSpec

        return JobSpec.model_validate_json(self.spec_json, context={"check_inputs": False, "canonical": True})

    @property
    def spec_dict(self) -> dict[str, Any]:
        return json.loads(self.spec_json)

    @property
    def provenance(self) -> dict[str, Any]:
        return json.loads(self.provenance_json) if self.provenance_json else {}

    @property
    def outputs(self) -> list[str]:
        return json.loads(self.outputs_json) if self.outputs_json else []

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.spec_dict.get("labels") or {})

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "state": self.state.value, "target": self.target,
            "backend": self.backend, "attempt": self.attempt, "ref": self.ref,
            "spec_digest": self.spec_digest, "created_at": self.created_at,
            "submitted_at": self.submitted_at, "started_at": self.started_at,
            "ended_at": self.ended_at, "exit_code": self.exit_code, "kind": self.kind,
            "reason": self.reason, "node": self.node, "cancel_requested": self.cancel_requested,
            "labels": self.labels, "provenance": self.provenance, "outputs": self.outputs,
            "campaign": self.campaign, "cached_from": self.cached_from, "cost": self.cost,
        }


@dataclass(frozen=True)
class Event:
    seq: int
    job_id: str
    at: float
    kind: str
    old_state: str | None
    new_state: str | None
    message: str | None
    data_json: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Event":
        return cls(**dict(row))

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": self.at, "kind": self.kind, "old_state": self.old_state,
                "new_state": self.new_state, "message": self.message,
                "data": json.loads(self.data_json) if self.data_json else None}
