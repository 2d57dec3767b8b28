"""squeue / sacct: the argv the backend runs and pure parsers of their answers.

Kept apart from the backend so the parsers are tested on captured output without a cluster.
``squeue --all --states=all`` lists every job slurmctld still holds, hidden partitions and
finished jobs included: the same table ``scontrol show job`` reads, so there is no point in
asking scontrol about a job squeue did not list; only sacct (slurmdbd) knows older ones.
Fields are separated by a control character (0x1f) that no job name or path holds in
practice; the free-text field comes last so a stray separator cannot shift the others.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from gateway.backends.base import Observation
from gateway.backends.slurm.states import decode_exit, translate
from gateway.states import State

SEP = "\x1f"
# squeue --Format: "type:0<suffix>" = no width limit, the suffix appended.
POLL_FIELDS = ["JobID", "ArrayJobID", "ArrayTaskID", "State", "exit_code", "Reason",
               "NodeList", "StartTime", "EndTime", "RestartCnt", "WorkDir"]
ADOPT_FIELDS = ["JobID", "ArrayJobID", "ArrayTaskID", "State", "Name", "Comment", "WorkDir"]
SACCT_FIELDS = ["JobID", "State", "ExitCode", "Reason", "NodeList", "Start", "End", "WorkDir"]
NONE_WORDS = {"", "N/A", "None", "(null)", "Unknown", "NONE"}


def squeue_format(fields: Sequence[str]) -> str:
    return ",".join(f"{f}:0{SEP}" if i < len(fields) - 1 else f"{f}:0"
                    for i, f in enumerate(fields))


def squeue_poll_argv(refs: Sequence[str]) -> list[str]:
    return ["squeue", "--noheader", "--all", "--array", "--states=all", f"--jobs={','.join(refs)}",
            f"--Format={squeue_format(POLL_FIELDS)}"]


def squeue_adopt_argv() -> list[str]:
    return ["squeue", "--noheader", "--all", "--array", "--states=all", "--me",
            f"--Format={squeue_format(ADOPT_FIELDS)}"]


def sacct_argv(refs: Sequence[str]) -> list[str]:
    return ["sacct", "--noheader", "--allocations", "--parsable2", f"--delimiter={SEP}",
            f"--jobs={','.join(refs)}", f"--format={','.join(SACCT_FIELDS)}"]


@dataclass(frozen=True)
class Row:
    """One line of squeue/sacct output, by field name."""

    values: dict[str, str]

    def get(self, name: str) -> str | None:
        value = self.values.get(name, "").strip()
        return None if value in NONE_WORDS else value

    @property
    def ref(self) -> str:
        """``1234`` for a plain job, ``1234_7`` for an array task (as sbatch refs are)."""
        task = self.get("ArrayTaskID")
        if task is not None and self.get("ArrayJobID"):
            return f"{self.get('ArrayJobID')}_{task}"
        return self.get("JobID") or ""


def parse_rows(text: str, fields: Sequence[str]) -> list[Row]:
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(SEP, len(fields) - 1)
        if len(parts) == len(fields):
            rows.append(Row(dict(zip(fields, parts))))
    return rows


def slurm_time(text: str | None) -> float | None:
    """Slurm prints local time as 2026-11-29T17:32:10; None for N/A, Unknown, None."""
    if not text or text in NONE_WORDS:
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def observe(row: Row, *, exit_field: str) -> Observation:
    """An Observation from one squeue (``exit_code``) or sacct (``ExitCode``) row."""
    native = row.get("State") or ""
    state, kind = translate(native)
    exit_code = sig = None
    if state.terminal:
        exit_code, sig = decode_exit(row.get(exit_field) or "")
    started = ended = None
    if state is State.RUNNING or state.terminal:
        started = slurm_time(row.get("StartTime") or row.get("Start"))
    if state.terminal:
        ended = slurm_time(row.get("EndTime") or row.get("End"))
    extra = {"signal": str(sig)} if sig else {}
    workdir = row.get("WorkDir")
    if workdir:
        extra["workdir"] = workdir
    restarts = row.get("RestartCnt")
    if restarts and restarts.isdigit() and restarts != "0":
        extra["restarts"] = restarts  # times Slurm requeued it (squeue only)
    return Observation(ref=row.ref, state=state, native=native.split()[0] if native else None,
                       kind=kind, exit_code=exit_code, reason=row.get("Reason"),
                       node=row.get("NodeList"), started_at=started, ended_at=ended, extra=extra)


def observations(rows: Iterable[Row], wanted: Iterable[str], *, exit_field: str
                 ) -> dict[str, Observation]:
    """Observations for the refs asked about; other rows (array siblings) are dropped."""
    want = set(wanted)
    found: dict[str, Observation] = {}
    for row in rows:
        ref = row.ref
        if ref in want:
            found[ref] = observe(row, exit_field=exit_field)
        elif row.get("JobID") in want:  # asked by the task's own job id
            job_id = row.get("JobID") or ""
            found[job_id] = replace(observe(row, exit_field=exit_field), ref=job_id)
    return found
