"""The node-side attempt runner: what actually runs on the machine that executes a job.

Stdlib only and quick to import: it starts once per job. It works on one *attempt folder*
written by the gateway:

    launch.json   what to run (argv, env, cwd, walltime, inputs, outputs)   [gateway]
    claim         created exclusively by the one run of this attempt        [node]
    image.json    the image digest found and verified on this node          [node]
    running.json  child pid and start time                                  [node]
    stdout/stderr the job's logs                                            [node]
    work/         default working folder; inputs are staged here            [node]
    outputs/      copies of the files matched by the spec's output globs    [node]
    cancel        present when the gateway asked for cancellation           [gateway]
    status.json   the final word: outcome, exit code, times, outputs        [node]

A launch.json with an ``image`` section (container runtimes) has its image checked after
the claim and before anything runs: present (loaded from the image store if needed) and
matching the pinned digest, else the attempt fails with the reason (gateway.images.check).

The claim makes each attempt run at most once whatever the gateway does: a second runner
started for the same attempt (a submission retried after a crash) finds the claim and exits
with EXIT_CLAIMED without running anything. status.json is written atomically, last.

    python -m gateway.node supervise DIR      local backend: run, enforce walltime, finish
    python -m gateway.node run DIR --cwd PATH -- ARGV...
                                              batch systems: prepare, run ARGV, finish
    python -m gateway.node prepare DIR        the steps of ``run``, for scripts that need
    python -m gateway.node finish DIR --exit-code N    to wrap the command themselves

``run`` is what a Slurm batch script ``exec``s: one Python start per job instead of two.
The batch system enforces the walltime and delivers cancels (it signals every process of
the job), so ``run`` installs no handler: a signal that ends the job ends the runner too,
and the batch system's own record says why.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXIT_CLAIMED = 75  # EX_TEMPFAIL: this attempt already ran (or runs) elsewhere
SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def write_json_atomic(path: Path, data: Any, *, durable: bool = False) -> None:
    """Write-then-rename, so readers see the old file or the whole new one. ``durable``
    also survives a power cut (fsync), at a few ms per call; process kills never need it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, sort_keys=True)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def proc_start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (tells a pid from its reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has finished
        return None
    return int(fields[19])


def alive(pid: int | None, ticks: int | None) -> bool:
    return bool(pid) and proc_start_ticks(int(pid)) == ticks  # type: ignore[arg-type]


def claim(adir: Path) -> bool:
    """Create ``claim`` exclusively, with its content, in one step (link of a temp file)."""
    tmp = adir / f".claim.{os.getpid()}"
    write_json_atomic(tmp, {"pid": os.getpid(), "ticks": proc_start_ticks(os.getpid()),
                            "host": socket.gethostname(), "at": time.time()})
    try:
        os.link(tmp, adir / "claim")
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _stage_inputs(launch: dict[str, Any], cwd: Path) -> None:
    for item in launch.get("inputs", []):
        source, target = Path(item["source"]), cwd / item["name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)


def _collect_outputs(launch: dict[str, Any], cwd: Path, adir: Path) -> list[str]:
    found: list[str] = []
    dest_root = adir / "outputs"
    for pattern in launch.get("outputs", []):
        for match in sorted(glob.glob(str(cwd / pattern), recursive=True)):
            path = Path(match)
            rel = path.relative_to(cwd)
            if not path.is_file() or str(rel) in found:
                continue
            dest = dest_root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            found.append(str(rel))
    return found


def _cwd(launch: dict[str, Any], adir: Path) -> Path:
    return Path(launch["cwd"]) if launch.get("cwd") else adir / "work"


def prepare(adir: Path) -> int:
    """Claim the attempt and stage its inputs. EXIT_CLAIMED if it already ran."""
    launch = json.loads((adir / "launch.json").read_text())
    if not claim(adir):
        return EXIT_CLAIMED
    cwd = _cwd(launch, adir)
    cwd.mkdir(parents=True, exist_ok=True)
    if (adir / "cancel").exists():
        finish(adir, None, outcome="cancelled", reason="cancelled before start")
        return EXIT_CLAIMED
    if launch.get("image"):
        reason = _check_image(launch["image"], adir)
        if reason is not None:
            finish(adir, None, outcome="error", reason=reason)
            return 1
    try:
        _stage_inputs(launch, cwd)
    except OSError as exc:
        finish(adir, None, outcome="error", reason=f"staging inputs failed: {exc}")
        return 1
    write_json_atomic(adir / "running.json", {"started_at": time.time(), "pid": os.getpid(),
                                              "host": socket.gethostname()})
    return 0


def _check_image(section: dict[str, Any], adir: Path) -> str | None:
    """Verify the job's image is here and is the pinned one; record the digest found.
    Returns the reason it is not (the job then fails before its command runs)."""
    from gateway.images.check import ImageCheckError, ensure_image

    try:
        found = ensure_image(section)
    except ImageCheckError as exc:
        return str(exc)
    write_json_atomic(adir / "image.json", {"digest": found, "runtime": section.get("runtime"),
                                            "checked_at": time.time()})
    return None


def finish(adir: Path, exit_code: int | None, *, outcome: str = "exited", sig: int | None = None,
           reason: str | None = None) -> None:
    launch = read_json(adir / "launch.json") or {}
    running = read_json(adir / "running.json") or {}
    image = read_json(adir / "image.json") or {}
    outputs: list[str] = []
    try:
        outputs = _collect_outputs(launch, _cwd(launch, adir), adir)
    except OSError as exc:
        reason = (reason + "; " if reason else "") + f"collecting outputs failed: {exc}"
    write_json_atomic(adir / "status.json", durable=True, data={
        "outcome": outcome, "exit_code": exit_code, "signal": sig, "reason": reason,
        "started_at": running.get("started_at"), "ended_at": time.time(),
        "node": socket.gethostname(), "outputs": outputs, "image_digest": image.get("digest")})


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait(child: subprocess.Popen[bytes], deadline: float) -> str:
    """Wait for the child, the deadline or a stop signal: 'exited', 'timeout' or 'cancelled'."""
    while True:
        if child.poll() is not None:
            return "exited"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        info = signal.sigtimedwait(SIGNALS, min(remaining, 60.0))
        if info is not None and info.si_signo != signal.SIGCHLD:
            return "cancelled"


def _stop(child: subprocess.Popen[bytes], grace: float) -> None:
    _killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while child.poll() is None and time.monotonic() < deadline:
        signal.sigtimedwait({signal.SIGCHLD}, max(0.01, min(0.5, deadline - time.monotonic())))
    _killpg(child.pid, signal.SIGKILL)
    child.wait()


def _exit_status(returncode: int) -> tuple[int, int | None]:
    """(exit code, signal) of a finished child: a shell's 128 + N when signal N ended it."""
    sig = -returncode if returncode < 0 else None
    return (128 + sig if sig else returncode), sig


def supervise(adir: Path) -> int:
    """Run one attempt to the end on this machine (the local backend's job process)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    code = prepare(adir)
    if code != 0:
        return code
    launch = json.loads((adir / "launch.json").read_text())
    env = dict(os.environ) if launch.get("inherit_env", True) else {}
    env.update(launch.get("env", {}))
    cwd = _cwd(launch, adir)
    with open(adir / "stdout", "ab") as out, open(adir / "stderr", "ab") as err:
        try:
            child = subprocess.Popen(
                launch["argv"], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=err, start_new_session=True,
                preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS))
        except OSError as exc:
            finish(adir, 127, outcome="error", reason=f"cannot start {launch['argv'][0]!r}: {exc}")
            return 0
    write_json_atomic(adir / "running.json", {"started_at": time.time(), "pid": child.pid,
                                              "ticks": proc_start_ticks(child.pid),
                                              "host": socket.gethostname()})
    outcome = _wait(child, time.monotonic() + float(launch["walltime"]))
    if outcome != "exited" or (adir / "cancel").exists() and child.poll() is None:
        _stop(child, float(launch.get("kill_grace", 10)))
    else:
        _killpg(child.pid, signal.SIGKILL)  # stragglers the job left behind
    returncode = child.wait()
    exit_code, sig = _exit_status(returncode)
    reason = {"timeout": f"walltime of {launch['walltime']} s reached",
              "cancelled": "cancelled"}.get(outcome)
    finish(adir, exit_code, outcome=outcome, sig=sig, reason=reason)
    return 0


def run(adir: Path, cwd: Path, argv: list[str]) -> int:
    """prepare, run ``argv`` in ``cwd`` with this process's stdio and environment (``PWD``
    set to ``cwd``, as a shell's ``cd`` would), finish.
    Returns the job's exit code (128 + N when signal N ended the command; 0 when the
    attempt had already run, so nothing ran now)."""
    code = prepare(adir)
    if code != 0:
        return 0 if code == EXIT_CLAIMED else code
    try:
        child = subprocess.Popen(argv, cwd=cwd, env={**os.environ, "PWD": str(cwd)})
    except OSError as exc:
        finish(adir, 127, outcome="error", reason=f"cannot start {argv[0]!r}: {exc}")
        return 127
    returncode = child.wait()
    exit_code, sig = _exit_status(returncode)
    finish(adir, exit_code, sig=sig)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] not in ("supervise", "run", "prepare", "finish"):
        print(__doc__, file=sys.stderr)
        return 2
    adir = Path(args[1])
    if args[0] == "supervise":
        return supervise(adir)
    if args[0] == "run":
        if args[2:3] != ["--cwd"] or args[4:5] != ["--"] or len(args) < 6:
            print("usage: python -m gateway.node run DIR --cwd PATH -- ARGV...", file=sys.stderr)
            return 2
        return run(adir, Path(args[3]), args[5:])
    if args[0] == "prepare":
        return prepare(adir)
    code = int(args[args.index("--exit-code") + 1]) if "--exit-code" in args else None
    finish(adir, code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
