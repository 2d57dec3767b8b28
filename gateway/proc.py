"""The one way the gateway runs a subprocess: an argv list, never a shell string."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Mapping, Sequence

from gateway.errors import BackendUnavailable, CommandError


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def run(argv: Sequence[str], *, check: bool = True, timeout: float | None = 60,
        env: Mapping[str, str] | None = None, input: str | None = None,
        cwd: str | os.PathLike[str] | None = None) -> Result:
    """Run ``argv`` and capture its output as text.

    A missing program or a time-out raises BackendUnavailable (the caller should back off);
    a non-zero exit raises CommandError carrying argv, returncode and stderr when ``check``.
    """
    argv = [os.fspath(a) for a in argv]
    full_env = None if env is None else {**os.environ, **env}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env,
                              input=input, cwd=cwd, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise BackendUnavailable(f"{argv[0]!r} is not installed or not on PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise BackendUnavailable(f"{argv[0]!r} did not answer within {timeout} s") from exc
    result = Result(argv, done.returncode, done.stdout, done.stderr)
    if check and done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stderr)
    return result
