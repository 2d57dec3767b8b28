"""Slurm's job states translated into the gateway's one state machine.

Every native state Slurm 22.05+ reports (squeue ``%T``, ``scontrol`` ``JobState``, sacct
``State``) maps to a gateway State and, for failures, a *kind* that retry policies read
(``spec.retries.on``). sacct writes ``CANCELLED by 0``; only the first word counts.
A state missing from the table becomes UNKNOWN with a warning, never an exception.
"""

from __future__ import annotations

import logging

from gateway.states import State

log = logging.getLogger(__name__)

# native -> (gateway state, failure kind or None)
TRANSLATE: dict[str, tuple[State, str | None]] = {
    # waiting: the job will (again) start later
    "PENDING": (State.QUEUED, None),
    "CONFIGURING": (State.QUEUED, None),      # nodes allocated, booting
    "REQUEUED": (State.QUEUED, None),
    "REQUEUE_FED": (State.QUEUED, None),
    "REQUEUE_HOLD": (State.QUEUED, None),     # requeued and held: shown with its reason
    "RESV_DEL_HOLD": (State.QUEUED, None),    # its reservation was deleted; held
    "POWER_UP_NODE": (State.QUEUED, None),
    # started and holding resources
    "RUNNING": (State.RUNNING, None),
    "COMPLETING": (State.RUNNING, None),      # processes ending; exit code not final
    "SUSPENDED": (State.RUNNING, None),
    "STOPPED": (State.RUNNING, None),         # SIGSTOPed, keeps its allocation
    "RESIZING": (State.RUNNING, None),
    "SIGNALING": (State.RUNNING, None),
    "STAGE_OUT": (State.RUNNING, None),       # burst-buffer stage-out after the script
    "UPDATE_DB": (State.RUNNING, None),
    # finished
    "COMPLETED": (State.SUCCEEDED, None),
    "FAILED": (State.FAILED, "failed"),
    "LAUNCH_FAILED": (State.FAILED, "failed"),
    "SPECIAL_EXIT": (State.FAILED, "failed"),
    "OUT_OF_MEMORY": (State.FAILED, "oom"),
    "NODE_FAIL": (State.FAILED, "node_fail"),
    "BOOT_FAIL": (State.FAILED, "boot_fail"),
    "PREEMPTED": (State.FAILED, "preempted"),
    "DEADLINE": (State.FAILED, "deadline"),
    "TIMEOUT": (State.TIMEOUT, "timeout"),
    "CANCELLED": (State.CANCELLED, "cancelled"),
    "REVOKED": (State.CANCELLED, "cancelled"),  # federation: a sibling ran elsewhere
}


def normalise(native: str) -> str:
    """``cancelled by 0`` -> ``CANCELLED``; ``OUT_OF_ME+`` (truncated) is left for a warning."""
    words = native.strip().split()
    return words[0].upper() if words else ""


def translate(native: str) -> tuple[State, str | None]:
    """(gateway state, failure kind) for one Slurm state; UNKNOWN (logged) if not in the table."""
    key = normalise(native)
    try:
        return TRANSLATE[key]
    except KeyError:
        log.warning("unknown Slurm job state %r: reported as UNKNOWN", native)
        return State.UNKNOWN, None


def decode_exit(text: str) -> tuple[int | None, int | None]:
    """(exit code, signal) from Slurm's ``N:S`` or a raw wait status (squeue ``exit_code``).

    A job killed by a signal reports exit code ``128 + S`` (the shell's convention).
    """
    text = text.strip()
    try:
        if ":" in text:
            code, sig = (int(p) for p in text.split(":", 1))
        else:
            status = int(text)
            sig = status & 0x7F
            code = 0 if sig else (status >> 8) & 0xFF
    except ValueError:
        return None, None
    return (128 + sig if sig else code), (sig or None)
