"""podman with a private configuration, and moving images between the store and podman.

The gateway never changes the machine's podman setup: it writes its own containers.conf and
storage.conf under ``DATA_DIR/podman`` and points podman at them with CONTAINERS_CONF and
CONTAINERS_STORAGE_CONF (runc, cgroupfs, file events, a nofile limit root may set here,
overlay storage). Images go in with ``skopeo copy``, which verifies every blob and keeps the
manifest digest, and are found again by digest. Stdlib only (the node runner uses it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from gateway.proc import run

CONTAINERS_CONF = """\
# Written by hpcgw: podman configuration private to the gateway.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{root}/events.log"
"""

STORAGE_CONF = """\
# Written by hpcgw: container storage private to the gateway.
[storage]
driver = "overlay"
graphroot = "{root}/storage"
runroot = "{runroot}"
"""


def podman_env(root: Path) -> dict[str, str]:
    """The environment that points podman at the gateway's files (written by ``ensure_conf``)."""
    return {"CONTAINERS_CONF": str(root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(root / "storage.conf")}


def ensure_conf(root: Path, runroot: Path | None = None) -> dict[str, str]:
    """Write the private configuration files when missing or different; returns the env."""
    root.mkdir(parents=True, exist_ok=True)
    runroot = runroot or default_runroot(root)
    files = {"containers.conf": CONTAINERS_CONF.format(root=root),
             "storage.conf": STORAGE_CONF.format(root=root, runroot=runroot)}
    for name, text in files.items():
        path = root / name
        if not path.exists() or path.read_text() != text:
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
    return podman_env(root)


def default_runroot(root: Path) -> Path:
    """Short and per-configuration: podman's run folder holds sockets (108-byte limit)."""
    import hashlib

    tag = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or "/run" if os.geteuid() == 0 else "/tmp")
    return base / f"hpcgw-{tag}"


def podman_digest(ref: str, env: dict[str, str]) -> str | None:
    """The manifest digest podman's storage holds for ``ref`` (name@sha256:...), or None."""
    done = run(["podman", "image", "inspect", "--format", "{{.Digest}}", ref], env=env,
               check=False, timeout=120)
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def load(layout_dir: Path, digest: str, name: str, env: dict[str, str]) -> None:
    """Copy image ``digest`` from an OCI layout into podman's storage as ``name``.

    ``skopeo copy`` checks every blob against the manifest ("Digest did not match") and
    keeps the manifest, so podman then knows the image by the same digest."""
    view = single_image_view(layout_dir, digest)
    try:
        run(["skopeo", "copy", "--quiet", f"oci:{view}", f"containers-storage:{name}"],
            env=env, timeout=600)
    finally:
        shutil.rmtree(view, ignore_errors=True)


def single_image_view(layout_dir: Path, digest: str) -> Path:
    """A throw-away layout holding only ``digest`` (its blobs are the store's, linked), so
    tools that cannot select a manifest by digest (skopeo 1.9) take exactly that one."""
    size = (layout_dir / "blobs" / "sha256" / digest.split(":", 1)[1]).stat().st_size
    view = Path(tempfile.mkdtemp(prefix="hpcgw-view-"))
    (view / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (view / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
         "size": size}]}))
    os.symlink(layout_dir.resolve() / "blobs", view / "blobs")
    return view


def unmount(root: Path) -> list[str]:
    """Unmount what podman's overlay driver left mounted under ``root`` (its storage keeps
    ``storage/overlay`` bind-mounted), so the folder can be removed. Returns the mount points."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    prefix = str(root.resolve()) + "/"
    points = sorted({line.split()[1] for line in lines if line.split()[1].startswith(prefix)},
                    key=len, reverse=True)
    for point in points:
        run(["umount", "--lazy", point], check=False)
    return points


def default_runtime_cleanup(folder: Path) -> None:
    """Tests and throw-away data folders: unmount podman storage under ``folder`` and remove
    the run folders of every private podman configuration found there."""
    for conf in folder.rglob("storage.conf"):
        shutil.rmtree(default_runroot(conf.parent), ignore_errors=True)
    unmount(folder)
