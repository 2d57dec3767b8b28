"""Runtime argv builders, pinned by golden files (tests/unit/runtimes/golden/*.json).

Regenerate after an intended change: HPCGW_UPDATE_GOLDEN=1 python -m pytest tests/unit/runtimes
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gateway.errors import RuntimeConfigError
from gateway.runtimes import GpuLayer, Mount, RunContext, get_runtime
from gateway.runtimes.profiles import load_node_profile
from gateway.spec import JobSpec

GOLDEN = Path(__file__).parent / "golden"
DIGEST = "sha256:" + "ab" * 32
IMAGE = f"registry.example/team/app@{DIGEST}"
HOSTILE = {"SPACE": "a 0", "QUOTE": "a'; echo foo", "NEWLINE": "a\n0", "SUBST": "$(rm -rf /)"}
WEIRD_DIR = "/tmp/weird dir/a'; echo foo/a\n0"


def spec(runtime: str, **extra: object) -> JobSpec:
    fields: dict[str, object] = {"name": "train", "command": ["python3", "-c", "print(1)"],
                                 "env": {"OMP_NUM_THREADS": "4"}, "runtime": runtime}
    if runtime != "host":
        fields["image"] = IMAGE
    fields.update(extra)
    return JobSpec.model_validate(fields)


def context(runtime: str, *, work: str = "/data/jobs/j1/1/work", gpu: GpuLayer | None = None,
            env: dict[str, str] | None = None) -> RunContext:
    base_env = {"HPCGW_JOB_ID": "j1", "HPCGW_ATTEMPT": "1", **(env or {})}
    runtime_env = {"podman": {"CONTAINERS_CONF": "/data/podman/containers.conf",
                              "CONTAINERS_STORAGE_CONF": "/data/podman/storage.conf"},
                   "charliecloud": {"USER": "alice"}}.get(runtime, {})
    return RunContext(work_dir=work, attempt_dir="/data/jobs/j1/1", env=base_env,
                      image_ref=f"localhost/team/app@{DIGEST}",
                      image_path=f"/data/images/unpacked/{DIGEST[7:]}/rootfs",
                      runtime_env=runtime_env, gpu=gpu,
                      mounts=(Mount("/scratch/shared", "/shared", True),))


GPU = load_node_profile("gpu-nvidia").gpu_layer()
CASES = {
    "basic": lambda rt: (spec(rt, resources={"cpus_per_task": 4, "memory": "2G"}), context(rt)),
    "gpu": lambda rt: (spec(rt, resources={"gpus": 2}), context(rt, gpu=GPU)),
    "gpu-profile-unused-without-gpus": lambda rt: (spec(rt), context(rt, gpu=GPU)),
    "hostile": lambda rt: (spec(rt, command="echo \"$SUBST\" > 'out put.txt'",
                                workdir="/work dir"), context(rt, env=HOSTILE)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("runtime", ["podman", "charliecloud", "apptainer"])
def test_argv_matches_golden(runtime: str, case: str) -> None:
    job, ctx = CASES[case](runtime)
    if case == "hostile":
        job = job.model_copy(update={"env": {}})
    argv = get_runtime(runtime).argv(job, ctx)
    path = GOLDEN / f"{runtime}-{case}.json"
    if os.environ.get("HPCGW_UPDATE_GOLDEN") or not path.exists():
        path.write_text(json.dumps(argv, indent=1) + "\n")
    assert argv == json.loads(path.read_text())


@pytest.mark.parametrize("runtime", ["podman", "charliecloud", "apptainer"])
def test_hostile_values_stay_single_arguments(runtime: str) -> None:
    job, ctx = CASES["hostile"](runtime)
    argv = get_runtime(runtime).argv(job, ctx)
    for key, value in HOSTILE.items():
        assert sum(1 for a in argv if a.endswith(f"{key}={value}")) == 1
    assert argv[-3:] == ["/bin/sh", "-c", "echo \"$SUBST\" > 'out put.txt'"]


def test_podman_pins_digest_never_pulls_read_only_and_limits() -> None:
    job, ctx = CASES["basic"]("podman")
    argv = get_runtime("podman").argv(job, ctx)
    assert argv[argv.index("--") + 1] == f"localhost/team/app@{DIGEST}"
    for flag in ("--pull=never", "--read-only", "--network=host", "--ipc=host", "--cpus=4",
                 f"--memory={2 * 1024 ** 3}b", "--volume=/data/jobs/j1/1/work:/work:rw",
                 "--volume=/scratch/shared:/shared:ro"):
        assert flag in argv
    assert argv[:3] == ["env", "CONTAINERS_CONF=/data/podman/containers.conf",
                        "CONTAINERS_STORAGE_CONF=/data/podman/storage.conf"]


def test_gpu_layer_only_when_gpus_are_asked() -> None:
    with_gpus = get_runtime("podman").argv(*CASES["gpu"]("podman"))
    without = get_runtime("podman").argv(*CASES["gpu-profile-unused-without-gpus"]("podman"))
    assert "--device=/dev/nvidia0" in with_gpus and "--device=/dev/nvidia0" not in without
    assert "--nv" in get_runtime("apptainer").argv(*CASES["gpu"]("apptainer"))


def test_charliecloud_starts_from_a_clean_environment() -> None:
    argv = get_runtime("charliecloud").argv(*CASES["basic"]("charliecloud"))
    assert argv[argv.index("ch-run") + 1:][:2] == ["--unset-env=*", "--env-no-expand"]


@pytest.mark.parametrize("runtime", ["podman", "charliecloud", "apptainer"])
def test_paths_that_would_break_bind_syntax_are_refused(runtime: str) -> None:
    job, _ = CASES["basic"](runtime)
    with pytest.raises(RuntimeConfigError, match="rename"):
        get_runtime(runtime).argv(job, context(runtime, work="/data/a:b/work"))


def test_weird_but_legal_work_folder_is_passed_verbatim() -> None:
    argv = get_runtime("podman").argv(spec("podman"), context("podman", work=WEIRD_DIR))
    assert f"--volume={WEIRD_DIR}:/work:rw" in argv


def test_unknown_runtime_lists_valid_ones() -> None:
    with pytest.raises(RuntimeConfigError, match="valid runtimes: host, podman, charliecloud"):
        get_runtime("docker")


def test_unknown_node_profile_lists_known_ones() -> None:
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match="gpu-nvidia"):
        load_node_profile("gpu-amd")
