"""The Python reference image: built once from Debian packages (debootstrap, about 1.5
min, then Numba compiling the kernels inside, about 3 min), cached by its key in a store
that outlives the test session, then a job runs the kernels inside it with podman.

The cache: $HPCGW_TEST_IMAGE_CACHE, default ~/.cache/hpcgw/test-images. The
``python_image`` fixture lives in tests/conftest.py, which starts the build in the
background as soon as these tests are collected.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.images.store import ImageStore

pytestmark = [pytest.mark.integration, pytest.mark.containers, pytest.mark.slow]
if any(shutil.which(t) is None for t in ("debootstrap", "podman", "skopeo")):
    pytestmark.append(pytest.mark.skip(reason="needs debootstrap, podman and skopeo"))


def test_python_image_is_cached_by_key(python_image: tuple[Path, str]) -> None:
    from gateway.images.python_image import build_python_image

    root, pinned = python_image
    assert build_python_image(ImageStore(root)).pinned == pinned  # second call: no rebuild


def test_kernels_run_in_the_python_image(cli, python_image, tmp_path):  # type: ignore[no-untyped-def]
    from gateway.images.podman import default_runroot, unmount

    root, pinned = python_image
    cli.env.update(HPCGW_IMAGES__STORE=str(root))
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({
        "name": "py", "image": pinned, "runtime": "podman",
        "command": ["python3", "-c", "import numpy, numba, kernels; print('ok', numpy.__version__)"]}))
    try:
        done = cli("submit", str(spec), "--wait", "--json")
        record = json.loads(done.stdout)[0]
        assert record["state"] == "SUCCEEDED", cli("logs", "--stderr", record["id"]).stdout
        assert cli("logs", record["id"]).stdout.startswith("ok ")
    finally:
        podman_dir = Path(cli.env["HPCGW_DATA_DIR"]) / "podman"
        shutil.rmtree(default_runroot(podman_dir), ignore_errors=True)
        unmount(tmp_path)
