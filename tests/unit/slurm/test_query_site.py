"""Parsers of squeue / sacct / sinfo answers, on output captured from a real Slurm 22.05."""

from __future__ import annotations

import time

import pytest

from gateway.backends.slurm import query, site
from gateway.states import State

# squeue_poll_argv(["1", "2_0", "2_1", "2_2", "3"]) after job 1 was cancelled while pending
# and array 2 (`exit 2`) ran two of its tasks.
SQUEUE = (
    "1\x1f1\x1fN/A\x1fCANCELLED\x1f0\x1fNone\x1f\x1f2026-11-29T17:41:56\x1f2026-11-29T17:41:56\x1f0\x1f/tmp\n"
    "5\x1f2\x1f1\x1fFAILED\x1f512\x1fNonZeroExitCode\x1fc1\x1f2026-11-29T17:41:58\x1f2026-11-29T17:41:58\x1f0\x1f/tmp\n"
    "4\x1f2\x1f0\x1fFAILED\x1f512\x1fNonZeroExitCode\x1fc1\x1f2026-11-29T17:41:57\x1f2026-11-29T17:41:57\x1f0\x1f/tmp\n"
    "2\x1f2\x1f2\x1fPENDING\x1f0\x1fResources\x1f\x1fN/A\x1fN/A\x1f0\x1f/tmp\n"
    "3\x1f3\x1fN/A\x1fPENDING\x1f0\x1fPriority\x1f\x1fN/A\x1fN/A\x1f0\x1f/tmp\n")
SINFO = ("debug*\x1f2-00:00:00\x1f1\x1f16\x1f65536\x1fib,avx512\x1fgpu:fake:2\x1fup\n"
         "gpu\x1f2-00:00:00\x1f1\x1f16\x1f65536\x1fib,avx512\x1fgpu:fake:2\x1fup\n")


def test_squeue_rows_become_observations() -> None:
    rows = query.parse_rows(SQUEUE, query.POLL_FIELDS)
    seen = query.observations(rows, ["1", "2_0", "2_1", "2_2", "3", "77"], exit_field="exit_code")
    assert set(seen) == {"1", "2_0", "2_1", "2_2", "3"}
    assert (seen["2_1"].state, seen["2_1"].kind, seen["2_1"].exit_code) == (State.FAILED, "failed", 2)
    assert seen["2_1"].node == "c1" and seen["2_1"].reason == "NonZeroExitCode"
    assert seen["2_1"].started_at == time.mktime(time.strptime("2026-11-29T17:41:58", "%Y-%m-%dT%H:%M:%S"))
    assert (seen["2_2"].state, seen["2_2"].reason, seen["2_2"].node) == (State.QUEUED, "Resources", None)
    assert seen["2_2"].started_at is None and seen["2_2"].exit_code is None
    assert (seen["3"].state, seen["3"].reason) == (State.QUEUED, "Priority")
    assert (seen["1"].state, seen["1"].kind) == (State.CANCELLED, "cancelled")


def test_a_task_asked_by_its_own_job_id() -> None:
    rows = query.parse_rows(SQUEUE, query.POLL_FIELDS)
    assert query.observations(rows, ["5"], exit_field="exit_code")["5"].ref == "5"


def test_sacct_rows() -> None:
    text = ("12\x1fCOMPLETED\x1f0:0\x1fNone\x1fc1\x1f2026-11-29T17:00:00\x1f2026-11-29T17:00:05\x1f/w\n"
            "13_4\x1fOUT_OF_MEMORY\x1f0:125\x1fOutOfMemory\x1fc1\x1f2026-11-29T17:00:00\x1f"
            "2026-11-29T17:00:09\x1f/w\n"
            "14\x1fCANCELLED by 0\x1f0:15\x1fNone\x1f\x1fNone\x1f2026-11-29T17:00:09\x1f/w\n")
    rows = query.parse_rows(text, query.SACCT_FIELDS)
    seen = query.observations(rows, ["12", "13_4", "14"], exit_field="ExitCode")
    assert (seen["12"].state, seen["12"].exit_code) == (State.SUCCEEDED, 0)
    assert (seen["13_4"].state, seen["13_4"].kind) == (State.FAILED, "oom")
    assert (seen["14"].state, seen["14"].native, seen["14"].exit_code) == (State.CANCELLED, "CANCELLED", 143)
    assert seen["14"].started_at is None and seen["14"].extra["signal"] == "15"


def test_malformed_lines_are_skipped() -> None:
    assert query.parse_rows("garbage\n\n", query.POLL_FIELDS) == []


def test_poll_argv_is_one_call_for_all_refs() -> None:
    argv = query.squeue_poll_argv(["1", "2_3"])
    assert argv[0] == "squeue" and "--jobs=1,2_3" in argv and "--states=all" in argv


def test_sinfo() -> None:
    parts = site.parse_sinfo(SINFO)
    assert set(parts) == {"debug", "gpu"} and parts["debug"].default and not parts["gpu"].default
    debug = parts["debug"]
    assert (debug.max_time, debug.nodes, debug.cpus, debug.max_gpus) == (172800, 1, 16, 2)
    assert debug.gpu_types == {"fake"} and debug.features == {"ib", "avx512"}
    caps = site.capabilities_of(parts.values(), max_walltime=3600, runtimes=frozenset({"host"}))
    assert caps.max_walltime == 3600 and caps.arrays and caps.gpu_types == {"fake"}


@pytest.mark.parametrize("text, seconds", [
    ("2-00:00:00", 172800), ("1:00:00", 3600), ("30:00", 1800), ("5", 300),
    ("infinite", None), ("UNLIMITED", None)])
def test_slurm_limit(text: str, seconds: int | None) -> None:
    assert site.slurm_limit(text) == seconds


@pytest.mark.parametrize("gres, gpus", [
    ("gpu:fake:2", {"fake": 2}), ("gpu:a100:4(S:0-1),gpu:v100:2", {"a100": 4, "v100": 2}),
    ("gpu:2", {None: 2}), ("(null)", {}), ("craynetwork:4,gpu:h100:8", {"h100": 8})])
def test_gpus_of(gres: str, gpus: dict[str | None, int]) -> None:
    assert site.gpus_of(gres) == gpus
