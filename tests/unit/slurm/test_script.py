"""Batch script rendering: golden files, quoting of hostile values, and bash really running it.

Regenerate the golden files after an intended change with ``HPCGW_REGEN_GOLDEN=1 pytest ...``
and read the diff before committing it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_helpers import HOSTILE, make_request

from gateway.backends.slurm.profile import SlurmProfile
from gateway.backends.slurm.script import (
    array_name,
    directive_value,
    render_array,
    render_sbatch,
    resource_directives,
)
from gateway.errors import CapabilityError

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("HPCGW_REGEN_GOLDEN") == "1"
PY = "/opt/hpcgw/bin/python"
SITE = SlurmProfile(name="site", partition="cpu", account="proj-1", qos="normal", python=PY,
                    gpu_partitions={"a100": "gpu-a100", "*": "gpu"}, constraint=["ib"],
                    extra_sbatch=["--mail-type=FAIL"])
PLAIN = SlurmProfile(python=PY)
HOSTILE_DIR = "/tmp/hpc gw/a'; echo foo/$(rm -rf ~)/x\"y#z%j"


def _cases() -> dict[str, str]:
    basic = make_request("/data/jobs/j1/0", job_id="j1")
    full = make_request(
        "/data/jobs/j2/1", job_id="j2", attempt=1, env={"HPCGW_JOB_ID": "j2", "OMP": "4"},
        resources={"nodes": 2, "tasks_per_node": 2, "cpus_per_task": 4, "memory": "8G",
                   "walltime": "1d2h", "gpus": {"count": 2, "type": "a100"}},
        requires=["avx512"], mpi="pmix", command=["python", "train.py", "--lr", "0.1"])
    hostile = make_request(
        HOSTILE_DIR, job_id="a 0'; echo foo", env={f"V{i}": v for i, v in enumerate(HOSTILE)},
        command=["printf", "%s\n", *HOSTILE], workdir="/scratch/a 0/$(id)")
    array = [make_request(f"/data/jobs/k{i}/0", job_id=f"k{i}", env={"HPCGW_JOB_ID": f"k{i}"},
                          command=["echo", str(i)]) for i in range(3)]
    return {
        "basic": render_sbatch(basic, PLAIN),
        "full": render_sbatch(full, SITE),
        "hostile": render_sbatch(hostile, PLAIN),
        "array": render_array(array, SITE, throttle=2),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    path = GOLDEN / f"{name}.sbatch"
    if REGEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(CASES[name])
    assert CASES[name] == path.read_text(), f"{path} differs; HPCGW_REGEN_GOLDEN=1 to rewrite"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bash_parses_script(name: str, tmp_path: Path) -> None:
    script = tmp_path / "job.sbatch"
    script.write_text(CASES[name])
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr


def test_directives() -> None:
    text = CASES["full"]
    for line in ["#SBATCH --job-name=hpcgw.j2.1", "#SBATCH --partition=gpu-a100",
                 "#SBATCH --account=proj-1", "#SBATCH --qos=normal", "#SBATCH --time=1-02:00:00",
                 "#SBATCH --mem=8G", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --gres=gpu:a100:2",
                 "#SBATCH --constraint=avx512&ib", "#SBATCH --mail-type=FAIL",
                 "#SBATCH --output=/data/jobs/j2/1/stdout", "#SBATCH --error=/data/jobs/j2/1/stderr",
                 "#SBATCH --chdir=/data/jobs/j2/1", "srun --mpi=pmix python train.py --lr 0.1"]:
        assert line in text.splitlines() or line in text
    assert "#SBATCH --comment=sha256:" in text


def test_untyped_gpus_and_single_task_runs_directly() -> None:
    req = make_request("/d", resources={"gpus": 1})
    text = render_sbatch(req, SITE)
    assert "#SBATCH --gres=gpu:1" in text and "#SBATCH --partition=gpu" in text
    assert "srun" not in text and " --cwd /d/work -- echo hi\n" in text


def test_multi_task_without_mpi_uses_srun() -> None:
    text = render_sbatch(make_request("/d", resources={"tasks_per_node": 4}), PLAIN)
    assert "srun --mpi=pmix echo hi" in text


@pytest.mark.parametrize("bad", ["a\n0", "x\ry"])
def test_line_breaks_in_directives_are_refused(bad: str) -> None:
    with pytest.raises(CapabilityError, match="line break"):
        render_sbatch(make_request(f"/tmp/{bad}"), PLAIN)
    with pytest.raises(CapabilityError, match="line break"):
        render_sbatch(make_request("/tmp/ok", job_id=bad), PLAIN)


def test_backslash_in_log_path_is_refused() -> None:
    with pytest.raises(CapabilityError, match="backslash"):
        render_sbatch(make_request("/tmp/a\\b"), PLAIN)


@pytest.mark.parametrize("value", HOSTILE[:2] + HOSTILE[3:])
def test_directive_value_model_of_sbatch_parser(value: str) -> None:
    """Read a directive back the way sbatch's parser does: quotes toggle, backslash escapes."""
    out, quoted, escape = [], False, False
    for ch in directive_value(value, "x"):
        if escape:
            out.append(ch)
            escape = False
        elif ch == "\\":
            escape = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "#" or (ch.isspace() and not quoted):
            break
        else:
            out.append(ch)
    assert "".join(out) == value


def test_array_needs_one_shape() -> None:
    a = make_request("/d/a", job_id="a")
    b = make_request("/d/b", job_id="b", resources={"cpus_per_task": 2})
    assert resource_directives(a, PLAIN) != resource_directives(b, PLAIN)
    with pytest.raises(ValueError, match="shape"):
        render_array([a, b], PLAIN)


def test_array_name_is_stable() -> None:
    assert array_name(["a", "b"]) == array_name(["a", "b"]) != array_name(["b", "a"])


# -- the body, executed by bash with the real node runner (through a hostile path) ------
REPO = Path(__file__).resolve().parents[3]


def _run_body(script: str, tmp_path: Path, env: dict[str, str] | None = None) -> \
        subprocess.CompletedProcess[bytes]:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(["bash", str(path)], capture_output=True, env=base, cwd=tmp_path,
                          check=False)


def _python(tmp_path: Path) -> SlurmProfile:
    """The profile's python is this interpreter, reached through a name bash must quote."""
    link = tmp_path / "py bin'$(x)"
    link.symlink_to(sys.executable)
    return SlurmProfile(python=str(link))


def _attempt(adir: Path) -> Path:
    """An attempt folder as the gateway writes it (a launch.json with nothing to stage)."""
    adir.mkdir(parents=True, exist_ok=True)
    (adir / "launch.json").write_text("{}")
    return adir


def _status(adir: Path) -> dict[str, object]:
    return json.loads((adir / "status.json").read_text())


def test_hostile_env_values_arrive_byte_exact(tmp_path: Path) -> None:
    adir = _attempt(tmp_path / "a 0'; echo foo" / "$(rm -rf ~)%j")
    env = {f"V{i}": v for i, v in enumerate(HOSTILE)}
    req = make_request(adir, env=env, command=["env", "-0"])
    done = _run_body(render_sbatch(req, _python(tmp_path)), tmp_path)
    assert done.returncode == 0, done.stderr
    seen = dict(item.split(b"=", 1) for item in done.stdout.split(b"\0") if b"=" in item)
    for key, value in env.items():
        assert seen[key.encode()] == value.encode()
    assert _status(adir)["exit_code"] == 0
    assert Path(seen[b"PWD"].decode()) == adir / "work"


def test_hostile_argv_arrives_byte_exact_and_exit_code_is_kept(tmp_path: Path) -> None:
    adir = _attempt(tmp_path / "att")
    req = make_request(adir, command=["sh", "-c", 'printf "%s\\0" "$@"; exit 3', "sh", *HOSTILE])
    done = _run_body(render_sbatch(req, _python(tmp_path)), tmp_path)
    assert done.returncode == 3
    assert done.stdout.split(b"\0")[:-1] == [h.encode() for h in HOSTILE]
    assert _status(adir)["exit_code"] == 3


def test_already_ran_attempt_does_nothing(tmp_path: Path) -> None:
    adir = _attempt(tmp_path / "att")
    (adir / "claim").touch()
    req = make_request(adir, command=["touch", str(tmp_path / "ran")])
    done = _run_body(render_sbatch(req, _python(tmp_path)), tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "ran").exists() and not (adir / "status.json").exists()


def test_array_task_selects_its_request(tmp_path: Path) -> None:
    reqs = []
    for i in range(3):
        reqs.append(make_request(_attempt(tmp_path / f"t{i}"), job_id=f"k{i}",
                                 env={"WHO": f"task {i}"}, command=["sh", "-c", 'echo "$WHO"']))
    script = render_array(reqs, _python(tmp_path))
    done = _run_body(script, tmp_path, {"SLURM_ARRAY_TASK_ID": "1"})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t1" / "stdout").read_text() == "task 1\n"
    assert not (tmp_path / "t0" / "stdout").exists()
    assert _run_body(script, tmp_path, {"SLURM_ARRAY_TASK_ID": "7"}).returncode == 64
