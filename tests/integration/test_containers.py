"""Jobs in real containers on the local backend: podman (runc) and charliecloud (ch-run).

Needs the Debian packages podman, runc, skopeo, charliecloud and busybox-static. The busybox
image is built once per session into a shared image store; each test has its own gateway
home. Run: python -m pytest -q -m containers tests/integration/test_containers.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.images.build import build
from gateway.images.podman import default_runroot, unmount
from gateway.images.recipe import load_recipe
from gateway.images.reference import busybox_tree
from gateway.images.store import ImageStore

pytestmark = [pytest.mark.integration, pytest.mark.containers]
MISSING = [t for t in ("podman", "runc", "skopeo", "ch-run") if shutil.which(t) is None]
if MISSING or not Path("/bin/busybox").exists():
    pytestmark.append(pytest.mark.skip(
        reason=f"needs podman, runc, skopeo, charliecloud, busybox-static (missing: {MISSING})"))

HOSTILE = {"SPACE": "a 0", "QUOTE": "a'; echo foo", "NEWLINE": "a\n0", "SUBST": "$(rm -rf /)"}


@pytest.fixture(scope="session")
def busybox(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(image store root, pinned reference) of the busybox image, built once."""
    root = tmp_path_factory.mktemp("images")
    recipe, base = load_recipe(busybox_tree(root / "src"))
    info = build(recipe, base, ImageStore(root / "store"))
    return root / "store", info.pinned


def release_podman(folder: Path) -> None:
    """Unmount podman's storage under ``folder`` and remove its run folders (in /run)."""
    for conf in folder.rglob("storage.conf"):
        shutil.rmtree(default_runroot(conf.parent), ignore_errors=True)
    unmount(folder)


@pytest.fixture(scope="session")
def podman_dir(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("podman")
    yield folder
    release_podman(folder)


@pytest.fixture(autouse=True)
def _release_test_podman(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield
    release_podman(tmp_path)


@pytest.fixture
def images_cli(cli, busybox, podman_dir):  # type: ignore[no-untyped-def]
    cli.env.update(HPCGW_IMAGES__STORE=str(busybox[0]), HPCGW_IMAGES__PODMAN_DIR=str(podman_dir))
    return cli


def write_spec(folder: Path, image: str, runtime: str | None, command: str,
               **extra: object) -> Path:
    spec: dict[str, object] = {"name": "in-image", "image": image, "command": command,
                               "env": HOSTILE, "outputs": ["out.txt", "env.txt"], **extra}
    if runtime:
        spec["runtime"] = runtime
    path = folder / "job.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


JOB = ("echo written > out.txt; for k in SPACE QUOTE NEWLINE SUBST; do eval \"printf '%s=%s|' $k "
       "\\\"\\$$k\\\"\"; done > env.txt; if touch /rootfs-write 2>/dev/null; then echo ROOT-WRITABLE; "
       "exit 3; fi; echo ran > /work/ran")


def submit(cli, spec: Path) -> dict:  # type: ignore[no-untyped-def, type-arg]
    done = cli("submit", str(spec), "--wait", "--json")
    record = json.loads(done.stdout)[0]
    return cli.json("show", record["id"])  # type: ignore[no-any-return]


@pytest.mark.parametrize("runtime", ["podman", "charliecloud", None])
def test_job_runs_in_the_pinned_image(images_cli, busybox, tmp_path, runtime):  # type: ignore[no-untyped-def]
    shown = submit(images_cli, write_spec(tmp_path, busybox[1], runtime, JOB))
    assert shown["state"] == "SUCCEEDED", (shown["reason"], images_cli("logs", shown["id"]).stdout)
    outputs = {Path(p).name: Path(p) for p in images_cli.json("outputs", shown["id"])}
    assert outputs["out.txt"].read_text() == "written\n"  # through the bind mount
    assert outputs["env.txt"].read_text() == "".join(f"{k}={v}|" for k, v in HOSTILE.items())
    prov = shown["provenance"]
    assert prov["image_digest"] == busybox[1].split("@")[1]  # read back on the node
    assert prov["runtime"] == (runtime or "podman")
    assert prov["spec_digest"] == shown["spec_digest"]
    text = images_cli("show", shown["id"], check=True).stdout
    assert busybox[1].split("@")[1][:40] in text.replace("\n", "")


def test_tag_is_refused_before_anything_is_recorded(images_cli):  # type: ignore[no-untyped-def]
    done = images_cli("run", "--image", "hpcgw/busybox:1", "--", "true")
    assert done.returncode == 2 and "hpcgw image pin" in done.stderr
    assert images_cli.json("ls") == []


def tampered_store(busybox: tuple[Path, str], dest: Path) -> Path:
    shutil.copytree(busybox[0] / "layout", dest / "layout", symlinks=True)
    store = ImageStore(dest)
    manifest = store.layout.manifest(busybox[1].split("@")[1])
    layer = store.layout.blob_path(manifest["layers"][0]["digest"])
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize("runtime", ["podman", "charliecloud"])
def test_tampered_image_fails_before_the_command(images_cli, busybox, tmp_path, runtime):  # type: ignore[no-untyped-def]
    store = tampered_store(busybox, tmp_path / "bad-store")
    images_cli.env.update(HPCGW_IMAGES__STORE=str(store),
                          HPCGW_IMAGES__PODMAN_DIR=str(tmp_path / "fresh-podman"))
    shown = submit(images_cli, write_spec(tmp_path, busybox[1], runtime, JOB))
    assert shown["state"] == "FAILED"
    assert "digest" in shown["reason"] and "tampered or corrupt" in shown["reason"]
    assert shown["provenance"]["image_digest"] is None
    home = Path(images_cli.env["HPCGW_DATA_DIR"])
    assert not list(home.glob("jobs/*/*/work/ran"))  # the command never ran


def test_changed_unpacked_image_fails_before_the_command(images_cli, busybox, tmp_path):  # type: ignore[no-untyped-def]
    store_root = tmp_path / "store-copy"
    shutil.copytree(busybox[0] / "layout", store_root / "layout", symlinks=True)
    rootfs = ImageStore(store_root).unpack(busybox[1])
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:evil:/:/bin/sh\n")
    images_cli.env["HPCGW_IMAGES__STORE"] = str(store_root)
    shown = submit(images_cli, write_spec(tmp_path, busybox[1], "charliecloud", JOB))
    assert shown["state"] == "FAILED" and "tree digest mismatch" in shown["reason"]


@pytest.mark.parametrize("runtime", ["podman", "charliecloud"])
def test_absent_image_fails_with_the_reason(images_cli, tmp_path, runtime):  # type: ignore[no-untyped-def]
    absent = "hpcgw/nothing@sha256:" + "0" * 64
    shown = submit(images_cli, write_spec(tmp_path, absent, runtime, JOB))
    assert shown["state"] == "FAILED" and "absent" in shown["reason"]


def test_rerun_runs_the_same_spec_and_image(images_cli, busybox, tmp_path):  # type: ignore[no-untyped-def]
    first = submit(images_cli, write_spec(tmp_path, busybox[1], "podman", "true"))
    again = json.loads(images_cli("rerun", first["id"], "--wait", "--json").stdout)[0]
    shown = images_cli.json("show", again["id"])
    assert shown["spec_digest"] == first["spec_digest"]
    assert shown["provenance"]["image_digest"] == first["provenance"]["image_digest"]


def test_image_cli_build_verify_export_import(cli, tmp_path):  # type: ignore[no-untyped-def]
    recipe = busybox_tree(tmp_path / "src")
    one = json.loads(cli("image", "build", str(recipe), "--json", check=True).stdout)
    two = json.loads(cli("image", "build", str(recipe), "--json", check=True).stdout)
    assert one["digest"] == two["digest"] and one["name"] == "hpcgw/busybox:1"
    assert cli("image", "verify", check=True).stdout.count(": ok") == 1
    cli("image", "export", "hpcgw/busybox:1", str(tmp_path / "bb.tar"), check=True)
    cli.env["HPCGW_DATA_DIR"] = str(tmp_path / "other-home")
    [imported] = json.loads(cli("image", "import", str(tmp_path / "bb.tar"), "--json", check=True).stdout)
    assert imported["digest"] == one["digest"]
    assert cli("image", "pin", "hpcgw/busybox:1", "--no-podman", check=True).stdout.strip() == one["pinned"]
    loaded = cli("image", "load", "hpcgw/busybox:1", check=True).stdout.strip()
    assert loaded.endswith(one["digest"])
    bad = cli("image", "build", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2 and "cannot read recipe" in bad.stderr


def test_runtime_that_cannot_express_the_job_refuses_it(images_cli, busybox, tmp_path):  # type: ignore[no-untyped-def]
    shown = submit(images_cli, write_spec(tmp_path, busybox[1], "podman", "true", workdir="/a:b"))
    assert shown["state"] == "FAILED" and shown["kind"] == "refused"
    assert "rename the folder" in shown["reason"]


def test_podman_runs_as_the_configured_user(images_cli, busybox, tmp_path):  # type: ignore[no-untyped-def]
    images_cli.env.update(HPCGW_IMAGES__CONTAINER_USER="1000:1000")
    shown = submit(images_cli, write_spec(tmp_path, busybox[1], "podman", "id -u; id -g"))
    assert shown["state"] == "SUCCEEDED", shown["reason"]
    assert images_cli("logs", shown["id"]).stdout.split() == ["1000", "1000"]
    assert "--user=1000:1000" in " ".join(shown["provenance"]["argv"])
