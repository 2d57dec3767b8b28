"""The Slurm backend against a real private cluster (slurmctld + slurmd + munged)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_it import attempt, backend_for, submit_ok, wait_for

from gateway.backends.slurm import SlurmBackend
from gateway.errors import BackendUnavailable
from gateway.states import State
from gateway.testing.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.slurm]
HOSTILE = {"A": "a 0", "B": "a'; echo foo", "C": "a\n0", "D": "$(rm -rf /)", "E": 'x"y\\z#%j'}


@pytest.fixture(scope="module")
def backend(slurm_cluster: SlurmCluster) -> SlurmBackend:
    return backend_for(slurm_cluster)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module", autouse=True)
def timeout_ref(backend: SlurmBackend, jobs: Path) -> Iterator[str]:
    """Started first so its ~80 s walltime runs while the other tests do (checked last)."""
    req = attempt(jobs, "timeout", command=["sleep", "600"],
                  resources={"walltime": "1m"})
    yield submit_ok(backend, [req])[0]


def test_submit_success_with_logs(backend: SlurmBackend, jobs: Path) -> None:
    req = attempt(jobs, "ok", command=["sh", "-c", "echo out; echo err >&2; pwd; : > o.bin"],
                  outputs=["*.bin"])
    [ref] = submit_ok(backend, [req])
    obs = wait_for(backend, [ref])[ref]
    assert (obs.state, obs.exit_code, obs.kind, obs.node) == (State.SUCCEEDED, 0, None, "c1")
    assert obs.started_at and obs.ended_at and obs.ended_at >= obs.started_at
    logs = backend.log_paths(ref, req.attempt_dir)
    assert logs["stdout"].read_text() == f"out\n{req.attempt_dir / 'work'}\n"
    assert logs["stderr"].read_text() == "err\n"
    assert json.loads((req.attempt_dir / "status.json").read_text())["exit_code"] == 0
    assert json.loads(obs.extra["outputs"]) == ["o.bin"]
    assert "#SBATCH --job-name=hpcgw.ok.0" in (req.attempt_dir / "job.sbatch").read_text()


def test_failing_exit_code(backend: SlurmBackend, jobs: Path) -> None:
    [ref] = submit_ok(backend, [attempt(jobs, "fail", command=["sh", "-c", "exit 3"])])
    obs = wait_for(backend, [ref])[ref]
    assert (obs.state, obs.kind, obs.exit_code, obs.native) == (State.FAILED, "failed", 3, "FAILED")


def test_cancel(backend: SlurmBackend, jobs: Path) -> None:
    refs = submit_ok(backend, [attempt(jobs, "cancel", command=["sleep", "300"])])
    wait_for(backend, refs, lambda o: o.state is State.RUNNING)
    before = backend.calls["scancel"]
    backend.cancel(refs + ["999999"])   # an unknown ref is not an error
    assert backend.calls["scancel"] == before + 1
    obs = wait_for(backend, refs)[refs[0]]
    assert (obs.state, obs.kind) == (State.CANCELLED, "cancelled")


def test_array_of_five(backend: SlurmBackend, jobs: Path) -> None:
    reqs = [attempt(jobs, f"arr{i}", command=["sh", "-c", f"echo task {i}; echo {i} > r.txt"],
                    outputs=["r.txt"]) for i in range(5)]
    sbatch_before = backend.calls["sbatch"]
    refs = submit_ok(backend, reqs)
    assert backend.calls["sbatch"] == sbatch_before + 1
    array_id = refs[0].split("_")[0]
    assert refs == [f"{array_id}_{i}" for i in range(5)]
    seen = wait_for(backend, refs)
    assert all(o.state is State.SUCCEEDED and o.exit_code == 0 for o in seen.values())
    for i, req in enumerate(reqs):
        assert (req.attempt_dir / "stdout").read_text() == f"task {i}\n"
        assert (req.attempt_dir / "outputs" / "r.txt").read_text() == f"{i}\n"
        # the node's status.json is found from the array's manifest: outputs reach the gateway
        assert json.loads(seen[refs[i]].extra["outputs"]) == ["r.txt"]
        assert seen[refs[i]].extra["attempt_dir"] == str(req.attempt_dir)


def test_gpu_gres_sets_cuda_visible_devices(backend: SlurmBackend, jobs: Path) -> None:
    req = attempt(jobs, "gpu", command=["sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"'],
                  resources={"gpus": {"count": 2, "type": "fake"}})
    [ref] = submit_ok(backend, [req])
    assert wait_for(backend, [ref])[ref].state is State.SUCCEEDED
    assert (req.attempt_dir / "stdout").read_text() == "0,1\n"
    script = (req.attempt_dir / "job.sbatch").read_text()
    assert "#SBATCH --partition=gpu\n" in script and "#SBATCH --gres=gpu:fake:2\n" in script


@pytest.mark.parametrize("job_id, spec, why", [
    ("nofeat", {"requires": ["nosuch"]}, "nosuch"),
    ("nogpu", {"resources": {"gpus": {"count": 1, "type": "v100"}}}, "v100"),
    ("toomanygpus", {"resources": {"gpus": 3}}, "gpus"),
    ("toolong", {"resources": {"walltime": "3d"}}, "walltime"),
    ("toobig", {"resources": {"nodes": 2}}, "nodes"),
])
def test_impossible_requests_are_refused(backend: SlurmBackend, jobs: Path, job_id: str,
                                         spec: dict[str, object], why: str) -> None:
    req = attempt(jobs, job_id, **spec)
    [outcome] = backend.submit([req])
    assert outcome.ref is None and not outcome.transient
    assert outcome.error and why in outcome.error
    assert backend.adopt([req.key]) == {}   # refused before sbatch: Slurm never saw it


def test_request_sbatch_refuses_is_not_transient(backend: SlurmBackend, jobs: Path) -> None:
    [outcome] = backend.submit([attempt(jobs, "nomem", resources={"memory": "500G"})])
    assert outcome.ref is None and not outcome.transient
    assert outcome.error and "node configuration is not available" in outcome.error


def test_one_squeue_per_poll_for_fifty_jobs(backend: SlurmBackend, jobs: Path) -> None:
    reqs = [attempt(jobs, f"many{i}", command=["true"]) for i in range(50)]
    single = attempt(jobs, "many-single", command=["true"], resources={"cpus_per_task": 2})
    refs = submit_ok(backend, reqs + [single])
    for _ in range(3):
        before = dict(backend.calls)
        seen = backend.poll(refs)
        assert backend.calls["squeue"] == before.get("squeue", 0) + 1
        assert backend.calls["sacct"] <= before.get("sacct", 0) + 1
        assert set(seen) == set(refs)
    assert all(o.state is State.SUCCEEDED for o in wait_for(backend, refs).values())


def test_adopt_by_name(slurm_cluster: SlurmCluster, jobs: Path) -> None:
    first = backend_for(slurm_cluster)
    single = attempt(jobs, "adopt1", command=["sleep", "1"], resources={"cpus_per_task": 3})
    arr = [attempt(jobs, f"adopt-a{i}", command=["true"]) for i in range(2)]
    refs = submit_ok(first, [single, *arr])
    fresh = backend_for(slurm_cluster)   # a restarted gateway knows nothing but the keys
    keys = [single.key, *(r.key for r in arr), "hpcgw.never.0"]
    assert fresh.adopt(keys) == dict(zip(keys[:3], refs))
    assert fresh.calls["squeue"] == 1 and sum(fresh.calls.values()) == 1


def test_hostile_names_paths_and_env(backend: SlurmBackend, jobs: Path) -> None:
    root = jobs / "we ird'; echo foo" / "$(rm -rf ~)#x%j"
    req = attempt(root, "a 0'; $(rm -rf ~)#x\"%j", env=HOSTILE, command=["env", "-0"])
    [ref] = submit_ok(backend, [req])
    assert wait_for(backend, [ref])[ref].state is State.SUCCEEDED
    assert backend.adopt([req.key]) == {req.key: ref}   # the job name arrived byte for byte
    out = (req.attempt_dir / "stdout").read_bytes()
    seen = dict(item.split(b"=", 1) for item in out.split(b"\0") if b"=" in item)
    for key, value in HOSTILE.items():
        assert seen[key.encode()] == value.encode()
    assert seen[b"PWD"].decode() == str(req.attempt_dir / "work")


def test_controller_outage_is_transient(slurm_cluster: SlurmCluster, backend: SlurmBackend,
                                        jobs: Path) -> None:
    [ref] = submit_ok(backend, [attempt(jobs, "outage", command=["sleep", "2"])])
    wait_for(backend, [ref], lambda o: o.state is not State.QUEUED)
    slurm_cluster.stop_controller()
    try:
        with pytest.raises(BackendUnavailable):
            backend.poll([ref])
        [outcome] = backend.submit([attempt(jobs, "during", command=["true"])])
        assert outcome.transient and outcome.ref is None, outcome
        with pytest.raises(BackendUnavailable):
            backend.adopt(["hpcgw.during.0"])
    finally:
        slurm_cluster.restart_controller()
    obs = wait_for(backend, [ref])[ref]
    assert obs.state is State.SUCCEEDED and obs.exit_code == 0


@pytest.mark.slow
def test_walltime_ends_in_timeout(backend: SlurmBackend, timeout_ref: str) -> None:
    obs = wait_for(backend, [timeout_ref], timeout=240)[timeout_ref]
    assert (obs.state, obs.kind, obs.native) == (State.TIMEOUT, "timeout", "TIMEOUT")
