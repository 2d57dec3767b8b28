"""Batch scripts for Slurm: pure functions from submit requests to script text.

Two quoting worlds meet in a batch script:

- ``#SBATCH`` lines are read by sbatch's own parser, not by a shell: it splits on blanks,
  toggles on ``"``, takes ``\\`` as an escape and ``#`` as a comment. Values that are not
  plainly safe are written inside ``"..."`` with ``\\``, ``"`` and ``#`` escaped. A newline
  cannot be carried at all, so such a value is refused. In ``--output``/``--error`` Slurm
  also expands ``%j`` etc.: a ``%`` is written as ``\\%``, which makes Slurm expand nothing
  and drop the backslashes (so a literal backslash in those paths is refused too).
- The body is bash: every value goes through ``shlex.quote``.

The body exports the job's environment and ``exec``s the node runner's ``run`` (see
``gateway.node``): it claims the attempt (an attempt that already ran exits 0 and runs
nothing), stages inputs, runs the command in its working folder and writes status.json,
in one Python process per job.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from gateway import units
from gateway.backends.base import SubmitRequest
from gateway.backends.slurm.profile import SlurmProfile
from gateway.errors import CapabilityError
from gateway.spec import ENV_KEY_RE

SAFE_DIRECTIVE = re.compile(r"^[A-Za-z0-9_@%+=:,./&-]+$")
ARRAY_COMMENT = "hpcgw-array:"


def directive_value(value: str, what: str) -> str:
    """``value`` written so sbatch's #SBATCH parser reads it back byte for byte."""
    if "\n" in value or "\r" in value or "\x00" in value:
        raise CapabilityError(f"slurm cannot carry {what} {value!r}: it holds a line break")
    if SAFE_DIRECTIVE.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("#", "\\#")
    return f'"{escaped}"'


def path_directive(path: Path | str, what: str) -> str:
    """A --output/--error file name that Slurm takes literally (no %j expansion)."""
    text = str(path)
    if "\\" in text:
        raise CapabilityError(f"slurm cannot carry {what} {text!r}: it holds a backslash")
    return directive_value(text.replace("%", "\\%"), what)


def resource_directives(request: SubmitRequest, profile: SlurmProfile) -> list[str]:
    """Directives that fix the job's shape; requests with equal lists can share one array."""
    spec, res = request.spec, request.spec.resources
    lines: list[str] = []
    partition = profile.partition_for(res.gpus.count, res.gpus.type)
    for flag, value in (("partition", partition), ("account", profile.account),
                        ("qos", profile.qos)):
        if value:
            lines.append(f"--{flag}={directive_value(value, flag)}")
    lines.append(f"--time={units.format_walltime(res.walltime)}")
    if res.memory is not None:
        lines.append(f"--mem={units.format_memory(res.memory)}")
    lines += [f"--nodes={res.nodes}", f"--ntasks-per-node={res.tasks_per_node}",
              f"--cpus-per-task={res.cpus_per_task}"]
    if res.gpus.count:
        kind = f"gpu:{res.gpus.type}" if res.gpus.type else "gpu"
        lines.append(f"--gres={directive_value(f'{kind}:{res.gpus.count}', 'gres')}")
    features = sorted(set(profile.constraint) | set(spec.requires))
    if features:
        lines.append(f"--constraint={directive_value('&'.join(features), 'constraint')}")
    lines += list(profile.extra_sbatch)
    return lines


def run_line(request: SubmitRequest, profile: SlurmProfile) -> str:
    """The command line: through ``srun --mpi=pmix`` (or mpirun) for MPI/multi-task jobs."""
    res = request.spec.resources
    method = request.spec.mpi or (profile.mpi if res.nodes * res.tasks_per_node > 1 else None)
    argv = list(request.argv)
    if method == "pmix":
        argv = ["srun", "--mpi=pmix", *argv]
    elif method == "mpirun":
        argv = ["mpirun", *argv]
    return shlex.join(argv)


def body_lines(request: SubmitRequest, profile: SlurmProfile) -> list[str]:
    """The attempt's environment, then ``exec`` of the node runner's ``run`` (claim, stage,
    the command in its working folder, outputs and status.json: one Python start), every
    value shell-quoted."""
    for key in request.env:
        if not ENV_KEY_RE.match(key):
            raise CapabilityError(f"env name {key!r} is not a valid shell variable name")
    py, adir = shlex.quote(profile.python), shlex.quote(str(request.attempt_dir))
    # a container job's workdir is a path inside the image; its host side is work/
    workdir = (request.spec.workdir if request.spec.image is None else None) \
        or str(Path(request.attempt_dir) / "work")
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(request.env.items())]
    lines.append(f"exec {py} -m gateway.node run {adir} --cwd {shlex.quote(workdir)} -- "
                 f"{run_line(request, profile)}")
    return lines


def _header(directives: list[str]) -> list[str]:
    return ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives),
            ("# Written by hpcgw (gateway.backends.slurm.script); the job's record lives in the "
             "gateway's store.")]


def render_sbatch(request: SubmitRequest, profile: SlurmProfile) -> str:
    """The whole batch script for one attempt."""
    adir = Path(request.attempt_dir)
    directives = [
        f"--job-name={directive_value(request.key, 'job name')}",
        f"--comment={directive_value(request.spec.spec_digest, 'comment')}",
        *resource_directives(request, profile),
        f"--output={path_directive(adir / 'stdout', 'stdout path')}",
        f"--error={path_directive(adir / 'stderr', 'stderr path')}",
        f"--chdir={directive_value(str(adir), 'attempt folder')}",
    ]
    return "\n".join(_header(directives) + body_lines(request, profile)) + "\n"


def array_name(keys: Sequence[str]) -> str:
    """The job name of an array: stable for the same set of attempts."""
    return "hpcgw.array." + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def render_array(requests: Sequence[SubmitRequest], profile: SlurmProfile,
                 throttle: int | None = None) -> str:
    """ONE job array for many requests of one shape; task i runs ``requests[i]``.

    Each task is one branch of a ``case "$SLURM_ARRAY_TASK_ID"``; it redirects its own
    stdout/stderr into its attempt folder. Slurm's own messages for task i (time limit,
    cancel) go to ``array-<i>.out`` in the first request's folder (the array's WorkDir),
    which also holds ``array.json`` (task -> key, folder; see results.py): a Slurm comment
    holds at most 1024 characters, too few for the keys of a large array.
    """
    if not requests:
        raise ValueError("render_array needs at least one request")
    shape = resource_directives(requests[0], profile)
    for req in requests[1:]:
        if resource_directives(req, profile) != shape:
            raise ValueError(f"{req.key} has another shape than {requests[0].key}; "
                             "group requests by resource_directives() first")
    keys = [r.key for r in requests]
    first = Path(requests[0].attempt_dir)
    spread = f"0-{len(requests) - 1}" + (f"%{throttle}" if throttle else "")
    directives = [
        f"--job-name={array_name(keys)}",
        f"--comment={ARRAY_COMMENT}{len(requests)}",
        f"--array={spread}", *shape,
        f"--output={path_directive(first / 'array-', 'array log')}%a.out",
        f"--error={path_directive(first / 'array-', 'array log')}%a.out",
        f"--chdir={directive_value(str(first), 'attempt folder')}",
    ]
    lines = _header(directives) + ['case "${SLURM_ARRAY_TASK_ID:-}" in']
    for index, req in enumerate(requests):
        adir = Path(req.attempt_dir)
        out, err = shlex.quote(str(adir / "stdout")), shlex.quote(str(adir / "stderr"))
        lines.append(f"{index})")
        lines.append(f"  exec >>{out} 2>>{err}")
        lines += [f"  {line}" for line in body_lines(req, profile)]
        lines.append("  ;;")
    lines += ['*) echo "hpcgw: no task ${SLURM_ARRAY_TASK_ID:-?} in this array" >&2; exit 64 ;;',
              "esac"]
    return "\n".join(lines) + "\n"
