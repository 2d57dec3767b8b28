"""The user-data renderer: golden files, hostile values quoted, bash parses it, no secrets.

Regenerate the golden files after an intended change with ``HPCGW_REGEN_GOLDEN=1 pytest ...``
and read the diff before committing it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gateway.backends.aws.bootstrap import (WORK_MARK, BootstrapPlan, ClusterPlan, RunUrls, Staged,
                                             render_bootstrap)
from gateway.errors import CapabilityError

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("HPCGW_REGEN_GOLDEN") == "1"
HOSTILE = ["a 0", "a'; echo foo", "a\n0", "$(rm -rf /)", 'x"y\\z#w', "`id`;|&>*?~%j"]
URL = "http://127.0.0.1:9/bucket/hpcgw/runs/hpcgw.j1.1/{}?X-Amz-Signature=abc&X-Amz-Expires=3600"


def urls(key: str = "hpcgw.j1.1") -> RunUrls:
    return RunUrls(*(URL.format(n) for n in ("stdout", "stderr", "outputs.tar", "status.json",
                                             "inbox")))


def _cases() -> dict[str, BootstrapPlan]:
    basic = BootstrapPlan(key="hpcgw.j1.1", argv=["echo", "hi"], env={"HPCGW_JOB_ID": "j1"},
                          walltime=3600, grace=60, poweroff_after=4260, urls=urls())
    full = BootstrapPlan(
        key="hpcgw.j2.3", argv=["python", "train.py", "--epochs", "3"],
        env={"HPCGW_JOB_ID": "j2", "OMP_NUM_THREADS": "4"}, walltime=7200, grace=30,
        poweroff_after=7830, urls=urls(), runtime="podman",
        image=Staged(URL.format("image.tar"), "ab" * 32, "localhost/team/app@sha256:" + "cd" * 32),
        image_digest="sha256:" + "cd" * 32,
        command=["podman", "run", "--rm", "--pull=never", "--read-only", "--network=host",
                 f"--volume={WORK_MARK}:/work:rw", "--workdir=/work", "--env=OMP_NUM_THREADS=4",
                 "--", "localhost/team/app@sha256:" + "cd" * 32, "python", "train.py"],
        image_load_as="localhost/team/app:sha256-" + "cd" * 10,
        inputs=[Staged(URL.format("in0"), "11" * 32, "data/train.csv"),
                Staged(URL.format("in1"), "22" * 32, "models", is_dir=True)],
        outputs=["out/*.npy", "metrics.json"], workdir="/work", spot=True, log_interval=15)
    hostile = BootstrapPlan(
        key="hpcgw.j3.1", argv=["sh", "-c", *HOSTILE], walltime=60, grace=5, poweroff_after=665,
        env={"HPCGW_JOB_ID": "j3", **{f"V{i}": v for i, v in enumerate(HOSTILE)}}, urls=urls(),
        inputs=[Staged(URL.format("in0") + "&x='; rm -rf /", "33" * 32, name)
                for name in HOSTILE[:2]],
        outputs=list(HOSTILE), spot=False)
    peers = [URL.format(f"nodes/{n}.addr") for n in (1, 2)]
    head = BootstrapPlan(
        key="hpcgw.j4.1", argv=["./solver", "--in", "a'; echo foo"], env={"HPCGW_JOB_ID": "j4"},
        walltime=600, grace=10, poweroff_after=1210, urls=urls(), outputs=["result.txt"],
        cluster=ClusterPlan(node=0, nodes=3, slots=2, peers=peers, done=URL.format("nodes/done"),
                            mpi=True, wait_s=300))
    worker = BootstrapPlan(
        key="hpcgw.j4.1", argv=["./solver"], env={"HPCGW_JOB_ID": "j4"}, walltime=600, grace=10,
        poweroff_after=1210, urls=urls(),
        cluster=ClusterPlan(node=2, nodes=3, slots=2, address=peers[1], done=URL.format("nodes/done")))
    return {"basic": basic, "full": full, "hostile": hostile, "mpi-node0": head, "mpi-node2": worker}


@pytest.mark.parametrize("name", sorted(_cases()))
def test_golden(name: str) -> None:
    text = render_bootstrap(_cases()[name])
    path = GOLDEN / f"{name}.sh"
    if REGEN:
        path.write_text(text)
    assert text == path.read_text(), f"rerun with HPCGW_REGEN_GOLDEN=1 and review {path}"


@pytest.mark.parametrize("name", sorted(_cases()))
def test_bash_parses_it(name: str, tmp_path: Path) -> None:
    script = tmp_path / "user-data.sh"
    script.write_text(render_bootstrap(_cases()[name]))
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_hostile_values_reach_bash_as_single_words(tmp_path: Path) -> None:
    """Every hostile env value and output glob reaches bash unchanged."""
    text = render_bootstrap(_cases()["hostile"])
    exports = text.split("# the job, in its own process group\n")[1].split('cd "$WORK"')[0]
    outputs = next(line for line in text.split("\n") if line.startswith("OUTPUTS=("))
    outputs = text[text.index(outputs):text.index("\nhpcgw_poweroff()")]
    probe = tmp_path / "probe.sh"
    probe.write_text(exports + outputs + '\nfor i in 0 1 2 3 4 5; do n="V$i"; printf "%s\\0" "${!n}"; done\n'
                     'printf "%s\\0" "${OUTPUTS[@]}"\n')
    out = subprocess.run(["bash", str(probe)], capture_output=True, check=True).stdout
    assert out.decode().split("\0")[:-1] == HOSTILE + HOSTILE


def test_no_credentials_and_imds_v2() -> None:
    text = render_bootstrap(_cases()["full"])
    for word in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "aws_secret", "X-Amz-Security-Token"):
        assert word not in text
    assert "X-aws-ec2-metadata-token-ttl-seconds" in text   # IMDSv2 token before the notice
    assert 'sleep "$POWEROFF_AFTER"' in text


def test_too_large_or_unsupported_is_refused() -> None:
    many = BootstrapPlan(key="hpcgw.j1.1", argv=["true"], env={}, walltime=60, grace=5,
                         poweroff_after=600, urls=urls(),
                         inputs=[Staged(URL.format(i), "00" * 32, f"f{i}") for i in range(80)])
    with pytest.raises(CapabilityError, match="16384"):
        render_bootstrap(many)
    with pytest.raises(CapabilityError, match="fewer nodes"):
        render_bootstrap(BootstrapPlan(key="k", argv=["true"], env={}, walltime=1, grace=1,
                                       poweroff_after=2, urls=urls(), cluster=ClusterPlan(
                                           node=0, nodes=64, peers=[URL.format(n) * 2 for n in range(63)])))
    with pytest.raises(CapabilityError, match="runtime"):
        render_bootstrap(BootstrapPlan(key="k", argv=["true"], env={}, walltime=1, grace=1,
                                       poweroff_after=2, urls=urls(), runtime="charliecloud"))


def test_work_folder_mark_and_cluster_roles() -> None:
    cases = _cases()
    full = render_bootstrap(cases["full"])
    assert '--volume="$WORK":/work:rw' in full
    assert "skopeo copy --quiet oci-archive:" in full and "CONTAINERS_STORAGE_CONF" in full
    head, worker = render_bootstrap(cases["mpi-node0"]), render_bootstrap(cases["mpi-node2"])
    assert 'mpirun --allow-run-as-root --hostfile "$ROOT/hostfile" -np 6' in head
    assert "PEERS=(" in head and "URL_ADDRESS" not in head
    assert "URL_ADDRESS=" in worker and "setsid" not in worker and "PEERS" not in worker
