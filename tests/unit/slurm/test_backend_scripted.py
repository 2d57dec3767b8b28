"""SlurmBackend with Slurm's answers scripted: the paths a healthy test cluster cannot show
(accounting via sacct, a refusing sbatch, error classification). In addition to, not
instead of, the real-cluster tests in tests/integration/slurm."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from slurm_helpers import make_request

from gateway import proc
from gateway.backends.slurm import SlurmBackend, SlurmProfile
from gateway.backends.slurm.results import write_manifest
from gateway.errors import BackendUnavailable
from gateway.states import State

SINFO = ("debug*\x1f2-00:00:00\x1f1\x1f16\x1f65536\x1fib,avx512\x1fgpu:fake:2\x1fup\n"
         "gpu\x1f2-00:00:00\x1f1\x1f16\x1f65536\x1fib,avx512\x1fgpu:fake:2\x1fup\n")
DOWN = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"
Answer = Callable[[list[str]], tuple[int, str, str]]


class Slurm:
    """A scripted Slurm: per command, a function argv -> (returncode, stdout, stderr)."""

    def __init__(self, **answers: Answer) -> None:
        self.answers = {"sinfo": lambda argv: (0, SINFO, ""), **answers}
        self.argvs: list[list[str]] = []

    def __call__(self, argv: list[str], **_: Any) -> proc.Result:
        self.argvs.append(list(argv))
        code, out, err = self.answers[argv[0]](argv)
        return proc.Result(list(argv), code, out, err)


def backend(slurm: Slurm, **profile: Any) -> SlurmBackend:
    return SlurmBackend(SlurmProfile(**profile), env={"SLURM_CONF": "/x"}, run=slurm)


def test_constructor_does_no_io() -> None:
    slurm = Slurm()
    backend(slurm)
    assert slurm.argvs == []


def test_poll_asks_sacct_once_for_refs_that_left_the_queue() -> None:
    squeue = "7\x1f7\x1fN/A\x1fRUNNING\x1f0\x1fNone\x1fc1\x1f2026-11-29T17:00:00\x1fN/A\x1f0\x1f/w\n"
    sacct = "8\x1fTIMEOUT\x1f0:15\x1fTimeLimit\x1fc1\x1f2026-11-29T17:00:00\x1f2026-11-29T17:01:20\x1f/w\n"
    slurm = Slurm(squeue=lambda a: (0, squeue, ""), sacct=lambda a: (0, sacct, ""))
    seen = backend(slurm).poll(["7", "8", "9"])
    assert [a[0] for a in slurm.argvs] == ["squeue", "sacct"]
    assert "--jobs=8,9" in slurm.argvs[1]
    assert seen["7"].state is State.RUNNING and seen["7"].ended_at is None
    assert (seen["8"].state, seen["8"].kind) == (State.TIMEOUT, "timeout")
    assert "9" not in seen   # Slurm forgot it: absent, the reconciler decides


def test_without_accounting_sacct_is_asked_once_per_backend() -> None:
    slurm = Slurm(squeue=lambda a: (1, "", "slurm_load_jobs error: Invalid job id specified\n"),
                  sacct=lambda a: (1, "", "sacct: error: Slurm accounting storage is disabled\n"))
    be = backend(slurm)
    assert be.poll(["5"]) == {} and be.poll(["5"]) == {}
    assert [a[0] for a in slurm.argvs] == ["squeue", "sacct", "squeue"]
    assert be.calls == {"squeue": 2, "sacct": 1}


@pytest.mark.parametrize("stderr", [DOWN, "squeue: error: Socket timed out on send/recv operation\n",
                                    "slurm_load_jobs: Zero Bytes were transmitted or received\n"])
def test_unreachable_controller_is_backend_unavailable(stderr: str) -> None:
    slurm = Slurm(squeue=lambda a: (1, "", stderr), scancel=lambda a: (1, "", stderr))
    be = backend(slurm)
    with pytest.raises(BackendUnavailable):
        be.poll(["1"])
    with pytest.raises(BackendUnavailable):
        be.cancel(["1"])
    with pytest.raises(BackendUnavailable):
        be.adopt(["hpcgw.a.0"])


def test_submit_groups_by_shape_and_stops_knocking_when_the_controller_is_down(
        tmp_path: Path) -> None:
    answers = iter([(0, "41\n", ""), (1, "", DOWN.replace("slurm_load_jobs", "sbatch"))])
    slurm = Slurm(sbatch=lambda a: next(answers))
    reqs = [make_request(tmp_path / f"a{i}", job_id=f"a{i}") for i in range(3)]
    reqs += [make_request(tmp_path / f"b{i}", job_id=f"b{i}", resources={"cpus_per_task": 2})
             for i in range(2)]
    reqs.append(make_request(tmp_path / "c", job_id="c", resources={"cpus_per_task": 3}))
    out = backend(slurm).submit(reqs)
    assert [o.ref for o in out[:3]] == ["41_0", "41_1", "41_2"]
    assert all(o.transient and o.ref is None for o in out[3:])
    assert [a[0] for a in slurm.argvs] == ["sinfo", "sbatch", "sbatch"]   # not a third sbatch
    assert "#SBATCH --array=0-2\n" in (tmp_path / "a1" / "job.sbatch").read_text()


def test_profile_throttles_arrays(tmp_path: Path) -> None:
    slurm = Slurm(sbatch=lambda a: (0, "5\n", ""))
    reqs = [make_request(tmp_path / f"a{i}", job_id=f"a{i}") for i in range(3)]
    backend(slurm, array_throttle=2).submit(reqs)
    assert "#SBATCH --array=0-2%2\n" in (tmp_path / "a0" / "job.sbatch").read_text()


def test_sbatch_refusal_is_final(tmp_path: Path) -> None:
    refusal = ("sbatch: error: Batch job submission failed: "
               "Invalid account or account/partition combination\n")
    slurm = Slurm(sbatch=lambda a: (1, "", refusal))
    [out] = backend(slurm, account="nope").submit([make_request(tmp_path, job_id="x")])
    assert out.ref is None and not out.transient and "Invalid account" in (out.error or "")


def test_unknown_partition_in_profile_is_refused_before_sbatch(tmp_path: Path) -> None:
    slurm = Slurm()
    [out] = backend(slurm, partition="nosuch").submit([make_request(tmp_path, job_id="x")])
    assert not out.transient and "nosuch" in (out.error or "")
    assert [a[0] for a in slurm.argvs] == ["sinfo"]


def test_sinfo_is_cached_for_the_ttl() -> None:
    slurm = Slurm()
    be = backend(slurm)
    assert be.capabilities() == be.capabilities()
    assert be.calls["sinfo"] == 1
    fresh = backend(slurm, capabilities_ttl=0)
    fresh.capabilities()
    fresh.capabilities()
    assert fresh.calls["sinfo"] == 2


def test_capabilities_follow_the_profile_walltime_and_gpu_partitions() -> None:
    caps = backend(Slurm(), max_walltime="4h", gpu_partitions={"fake": "gpu"}).capabilities()
    assert caps.max_walltime == 4 * 3600 and caps.gpu_types == {"fake"} and caps.max_gpus == 2
    assert caps.features == {"ib", "avx512"} and caps.max_cpus == 16 and caps.max_nodes == 1


def test_cancel_is_one_call_and_tolerates_finished_jobs() -> None:
    done = "scancel: error: Kill job error on job id 3: Job/step already completing or completed\n"
    slurm = Slurm(scancel=lambda a: (1, "", done))
    backend(slurm).cancel(["3", "4_1", "3"])
    assert slurm.argvs == [["scancel", "3", "4_1"]]


def test_cancel_refusal_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """The reconciler catches only BackendUnavailable; it asks again later (cancel_sent_at)."""
    slurm = Slurm(scancel=lambda a: (1, "", "scancel: error: Access/permission denied\n"))
    with caplog.at_level(logging.WARNING):
        backend(slurm).cancel(["3"])
    assert "permission denied" in caplog.text


def _held(ref: str, restarts: int) -> str:
    """A squeue row of a job Slurm requeued and held after its launch failed."""
    job, _, task = ref.partition("_")
    return (f"{job}\x1f{job}\x1f{task or 'N/A'}\x1fPENDING\x1f0\x1flaunch failed requeued held"
            f"\x1f\x1fN/A\x1fN/A\x1f{restarts}\x1f/w\n")


def test_jobs_held_after_a_failed_launch_are_released_in_one_call() -> None:
    out = _held("21", 1) + _held("22_3", 2) + _held("23", 3)
    slurm = Slurm(squeue=lambda a: (0, out, ""), scontrol=lambda a: (0, "", ""),
                  scancel=lambda a: (0, "", ""))
    seen = backend(slurm).poll(["21", "22_3", "23"])
    assert slurm.argvs[1] == ["scontrol", "release", "21,22_3"]   # requeued at most twice
    assert slurm.argvs[2] == ["scancel", "23"]                      # the third launch failed
    assert len(slurm.argvs) == 3
    assert seen["21"].state is State.QUEUED and "released by hpcgw (1 of 2)" in seen["21"].reason
    assert seen["22_3"].state is State.QUEUED
    assert (seen["23"].state, seen["23"].kind) == (State.FAILED, "node_fail")
    assert "launch failed 3 times" in seen["23"].reason and seen["23"].ended_at


def test_no_releases_fails_the_first_held_launch_and_a_refused_release_waits(
        caplog: pytest.LogCaptureFixture) -> None:
    slurm = Slurm(squeue=lambda a: (0, _held("31", 1), ""), scancel=lambda a: (0, "", ""))
    seen = backend(slurm, launch_releases=0).poll(["31"])
    assert [a[0] for a in slurm.argvs] == ["squeue", "scancel"]
    assert (seen["31"].state, seen["31"].kind) == (State.FAILED, "node_fail")
    refused = Slurm(squeue=lambda a: (0, _held("32", 1), ""),
                    scontrol=lambda a: (1, "", "Access/permission denied\n"))
    with caplog.at_level(logging.WARNING):
        seen = backend(refused).poll(["32"])
    assert seen["32"].state is State.QUEUED and seen["32"].reason == "launch failed requeued held"
    assert "refused" in caplog.text   # left held with Slurm's reason; asked again next poll
    down = Slurm(squeue=lambda a: (0, _held("33", 1), ""), scontrol=lambda a: (1, "", DOWN))
    with pytest.raises(BackendUnavailable):
        backend(down).poll(["33"])


def test_adopt_finds_plain_jobs_by_name_and_array_tasks_by_manifest(tmp_path: Path) -> None:
    reqs = [make_request(tmp_path / f"k{i}", job_id=f"k{i}") for i in range(2)]
    (tmp_path / "k0").mkdir()
    write_manifest(reqs)
    plain = "10\x1f10\x1fN/A\x1fRUNNING\x1fhpcgw.j1.0\x1fsha256:ab\x1f/x\n"
    task = f"12\x1f11\x1f1\x1fPENDING\x1fhpcgw.array.12ab\x1fhpcgw-array:2\x1f{tmp_path / 'k0'}\n"
    other = "13\x1f13\x1fN/A\x1fRUNNING\x1fsomeone-else\x1f(null)\x1f/y\n"
    out = plain + task + other
    slurm = Slurm(squeue=lambda a: (0, out, ""))
    found = backend(slurm).adopt(["hpcgw.j1.0", "hpcgw.k1.0", "hpcgw.k0.0", "hpcgw.zz.0"])
    assert found == {"hpcgw.j1.0": "10", "hpcgw.k1.0": "11_1"}
    assert len(slurm.argvs) == 1 and "--me" in slurm.argvs[0]


def test_unreachable_sinfo_makes_every_request_transient_with_one_call(tmp_path: Path) -> None:
    down = "slurm_load_partitions: Unable to contact slurm controller (connect failure)\n"
    slurm = Slurm(sinfo=lambda a: (1, "", down))
    reqs = [make_request(tmp_path / str(i), job_id=f"t{i}") for i in range(5)]
    out = backend(slurm).submit(reqs)
    assert all(o.transient and o.ref is None for o in out)
    assert [a[0] for a in slurm.argvs] == ["sinfo"]


def test_unwritable_attempt_folder_is_an_outcome_not_an_exception(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    slurm = Slurm(sbatch=lambda a: (0, "5\n", ""))
    [out] = backend(slurm).submit([make_request(blocker / "a", job_id="x")])
    assert out.ref is None and not out.transient and "cannot write" in (out.error or "")
    assert "sbatch" not in [a[0] for a in slurm.argvs]
