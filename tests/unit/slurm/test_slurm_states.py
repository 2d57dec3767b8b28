"""The Slurm state table: every native state lands on a gateway state and failure kind."""

from __future__ import annotations

import logging

import pytest

from gateway.backends.slurm.states import TRANSLATE, decode_exit, translate
from gateway.states import TERMINAL, State

SLURM_STATES = [
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
    "COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT", "STOPPED", "SIGNALING", "STAGE_OUT",
    "RESV_DEL_HOLD", "REQUEUE_FED", "REQUEUE_HOLD", "LAUNCH_FAILED", "POWER_UP_NODE", "UPDATE_DB",
]


@pytest.mark.parametrize("native", SLURM_STATES)
def test_every_slurm_state_is_known(native: str) -> None:
    assert native in TRANSLATE
    state, kind = translate(native)
    assert state is not State.UNKNOWN
    # a failure carries a kind; a success or a live job does not
    assert (kind is not None) == (state in TERMINAL and state is not State.SUCCEEDED)


@pytest.mark.parametrize("native, state, kind", [
    ("PENDING", State.QUEUED, None),
    ("REQUEUED", State.QUEUED, None),
    ("COMPLETING", State.RUNNING, None),
    ("COMPLETED", State.SUCCEEDED, None),
    ("FAILED", State.FAILED, "failed"),
    ("TIMEOUT", State.TIMEOUT, "timeout"),
    ("OUT_OF_MEMORY", State.FAILED, "oom"),
    ("NODE_FAIL", State.FAILED, "node_fail"),
    ("PREEMPTED", State.FAILED, "preempted"),
    ("BOOT_FAIL", State.FAILED, "boot_fail"),
    ("DEADLINE", State.FAILED, "deadline"),
    ("CANCELLED by 0", State.CANCELLED, "cancelled"),
    ("cancelled", State.CANCELLED, "cancelled"),
])
def test_translation(native: str, state: State, kind: str | None) -> None:
    assert translate(native) == (state, kind)


def test_unknown_state_is_unknown_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert translate("FROBNICATED") == (State.UNKNOWN, None)
        assert translate("") == (State.UNKNOWN, None)
    assert "FROBNICATED" in caplog.text


@pytest.mark.parametrize("text, expected", [
    ("0:0", (0, None)), ("3:0", (3, None)), ("0:9", (137, 9)), ("0:15", (143, 15)),
    ("0", (0, None)), ("768", (3, None)), ("15", (143, 15)), ("", (None, None)),
    ("N/A", (None, None)),
])
def test_decode_exit(text: str, expected: tuple[int | None, int | None]) -> None:
    assert decode_exit(text) == expected
