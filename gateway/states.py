"""The one job state machine. Every backend translates its native states into these.

    PENDING -> SUBMITTING -> QUEUED -> RUNNING -> SUCCEEDED | FAILED | TIMEOUT | CANCELLED | LOST
       ^            |           |          |
       +------------+-----------+----------+   (retry: a new attempt starts from PENDING)

A failure also carries a *kind* (``failed``, ``timeout``, ``oom``, ``node_fail``,
``preempted``, ``lost``, ...) so retry policies can say which failures to try again.
"""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    PENDING = "PENDING"        # recorded, not yet handed to a backend
    SUBMITTING = "SUBMITTING"  # intent written; the backend may or may not have it yet
    QUEUED = "QUEUED"          # the backend has it and has not started it
    RUNNING = "RUNNING"
    UNKNOWN = "UNKNOWN"        # the backend reported a state we do not know (warned)
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    LOST = "LOST"              # the backend no longer knows the job and no result exists

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.TIMEOUT, State.CANCELLED, State.LOST})
ACTIVE = frozenset({State.SUBMITTING, State.QUEUED, State.RUNNING, State.UNKNOWN})

_AT_BACKEND = {State.QUEUED, State.RUNNING, State.UNKNOWN}
ALLOWED: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.SUBMITTING, State.CANCELLED, State.FAILED}),
    State.SUBMITTING: frozenset({State.PENDING} | _AT_BACKEND | TERMINAL),
    State.QUEUED: frozenset({State.PENDING} | _AT_BACKEND | TERMINAL) - {State.QUEUED},
    State.RUNNING: frozenset({State.PENDING} | _AT_BACKEND | TERMINAL) - {State.RUNNING},
    State.UNKNOWN: frozenset({State.PENDING} | _AT_BACKEND | TERMINAL) - {State.UNKNOWN},
}
for _s in TERMINAL:
    ALLOWED[_s] = frozenset()


def can_transition(old: State, new: State) -> bool:
    return new in ALLOWED[old]


# Failure kinds, used by retry policies (spec.retries.on) and shown as the job's reason.
KIND_BY_STATE = {State.FAILED: "failed", State.TIMEOUT: "timeout", State.LOST: "lost",
                 State.CANCELLED: "cancelled"}
