"""Container jobs on the real Slurm test cluster: the profile's runtime runs the job in the
pinned busybox image, the node checks the image first, provenance shows the digest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from slurm_it import REPO, WAIT

from gateway.api import Gateway
from gateway.images.build import build
from gateway.images.podman import default_runtime_cleanup
from gateway.images.recipe import load_recipe
from gateway.images.reference import busybox_tree
from gateway.images.store import ImageStore
from gateway.states import State
from gateway.testing.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.containers]
if any(shutil.which(t) is None for t in ("podman", "skopeo", "ch-run")) \
        or not Path("/bin/busybox").exists():
    pytestmark.append(pytest.mark.skip(reason="needs podman, skopeo, charliecloud, busybox-static"))


@pytest.mark.parametrize("runtime", ["podman", "charliecloud"])
def test_slurm_job_runs_in_the_pinned_image(slurm_cluster: SlurmCluster, tmp_path: Path,
                                            runtime: str) -> None:
    recipe, base = load_recipe(busybox_tree(tmp_path / "src"))
    image = build(recipe, base, ImageStore(tmp_path / "store"))
    profile = {"env": {**slurm_cluster.env, "PYTHONPATH": str(REPO)},
               "gpu_partitions": {"fake": "gpu"}, "runtime": runtime}
    gw = Gateway({"data_dir": str(tmp_path / "data"),
                  "images": {"store": str(tmp_path / "store")},
                  "backends": {"slurm": {"profiles": {"test": profile}}}})
    try:
        good = {"name": "in-image", "target": "slurm:test", "image": image.pinned,
                "outputs": ["out.txt"], "command": "cat /etc/os-release 2>&1 | head -1; "
                "echo from-image > out.txt; touch /nope 2>/dev/null && exit 3; true"}
        absent = {**good, "name": "absent", "image": "hpcgw/none@sha256:" + "0" * 64}
        jobs = gw.submit_many([good, absent])
        done = gw.wait([j.id for j in jobs], timeout=WAIT)
        assert done[0].state == State.SUCCEEDED, (done[0].record.reason, done[0].logs())
        assert [p.read_text() for p in done[0].outputs()] == ["from-image\n"]
        prov = done[0].record.provenance
        assert (prov["image_digest"], prov["runtime"]) == (image.digest, runtime)
        assert done[1].state == State.FAILED and "absent" in (done[1].record.reason or "")
    finally:
        gw.close()
        default_runtime_cleanup(tmp_path)
