"""The bootstrap's container path for real: the emulator runs the user-data, which fetches
the image archive through a presigned URL, checks its sha256, loads it with skopeo into a
private podman storage (runc, cgroupfs: the instance-side containers.conf), checks the
digest podman reports, and runs the job with gateway.runtimes.podman's argv.

What is emulated: the "instance" is this machine (root, podman + runc + skopeo from Debian);
its podman storage lives in the instance's scratch folder and its run folder in
/run/hpcgw-node-<hash>, both removed after the test.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from gateway.images.build import build
from gateway.images.podman import unmount
from gateway.images.recipe import load_recipe
from gateway.images.reference import busybox_tree
from gateway.images.store import ImageStore
from gateway.states import State

pytestmark = [pytest.mark.integration, pytest.mark.aws, pytest.mark.containers,
              pytest.mark.timeout(120)]
MISSING = [t for t in ("podman", "runc", "skopeo") if shutil.which(t) is None]
if MISSING or not Path("/bin/busybox").exists():
    pytestmark.append(pytest.mark.skip(reason=f"needs podman, runc, skopeo, busybox-static "
                                              f"(missing: {MISSING})"))
HOSTILE = {"SPACE": "a 0", "QUOTE": "a'; echo foo", "NEWLINE": "a\n0", "SUBST": "$(rm -rf /)"}


@pytest.fixture
def busybox(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    recipe, base = load_recipe(busybox_tree(tmp_path / "src"))
    info = build(recipe, base, ImageStore(tmp_path / "store"))
    yield tmp_path / "store", info.pinned
    instances = tmp_path / "instances"   # the emulated instances' podman storage and run folders
    for root in instances.glob("i-*/run"):
        tag = hashlib.sha256(str(root).encode()).hexdigest()[:12]
        shutil.rmtree(f"/run/hpcgw-node-{tag}", ignore_errors=True)
    unmount(tmp_path)


def test_the_job_runs_in_podman_on_the_instance(busybox: tuple[Path, str],
                                                cloud: Callable[..., Any], emulator: Any) -> None:
    # busybox first: its teardown (unmount, run folders) runs after the emulator's
    c = cloud(runtime="podman", extra_config={"images": {"store": str(busybox[0])}})
    emulator(owner=c.owner)
    script = ("for k in SPACE QUOTE NEWLINE SUBST; do eval \"printf '%s=%s|' $k \\\"\\$$k\\\"\"; "
              "done > env.txt; cat /etc/passwd | head -1; busybox | head -1 >&2; "
              "if touch /rootfs-write 2>/dev/null; then echo ROOT-WRITABLE; exit 3; fi")
    job = c.submit(image=busybox[1], command=["sh", "-c", script], env=HOSTILE,
                   outputs=["env.txt"])
    rec = c.until(job)
    assert rec.state == State.SUCCEEDED, (rec.reason, c.gw.logs(job), c.gw.logs(job, "stderr"))
    assert rec.provenance["image_digest"] == busybox[1].split("@")[1]
    assert "BusyBox" in c.gw.logs(job, "stderr")
    [env] = c.gw.outputs(job)
    assert env.read_text() == "".join(f"{k}={v}|" for k, v in HOSTILE.items())
    user_data = (c.home / "jobs" / job / "1" / "user-data.sh").read_text()
    assert "skopeo copy --quiet oci-archive:" in user_data and "--pull=never" in user_data


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI's mpirun")
def test_mpi_ranks_run_in_containers_across_two_nodes(busybox: tuple[Path, str],
                                                      cloud: Callable[..., Any], emulator: Any) -> None:
    """mpirun on node 0 starts one podman container per rank (the hybrid model); every node
    loaded the image. Ranks are all on this machine (see test_aws_multinode)."""
    c = cloud(runtime="podman", extra_config={"images": {"store": str(busybox[0])}})
    emu = emulator(owner=c.owner)
    job = c.submit(image=busybox[1], command=["sh", "-c", "echo in-container; test -r /etc/passwd"],
                   mpi="mpirun", resources={"nodes": 2, "tasks_per_node": 1})
    rec = c.until(job)
    assert rec.state == State.SUCCEEDED, (rec.reason, c.gw.logs(job), c.gw.logs(job, "stderr"))
    assert c.gw.logs(job) == "in-container\n" * 2
    assert rec.provenance["image_digest"] == busybox[1].split("@")[1]
    assert len(emu.ran) == 2
