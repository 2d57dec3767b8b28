"""Node-side image check: before a job's command runs, its image is present here and is
the one the spec names, byte for byte. Stdlib only (imported by ``gateway.node``).

``launch.json`` carries an ``image`` section written by the gateway:

    runtime      podman | charliecloud | apptainer
    digest       the manifest digest the spec pins
    ref          podman: the name@digest podman runs
    load_as      podman: the name:tag to load it under when absent
    path         directory runtimes: the unpacked rootfs the command runs in
    store        the image store's root (shared filesystem on a cluster), to fetch from
    runtime_env  podman's private configuration variables

The digest returned is read back here (podman's storage, or the unpacked folder's marker
after re-hashing its files), never copied from the spec. Any failure raises ImageCheckError
with a reason naming the image; the job then fails without running its command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.errors import GatewayError
from gateway.images.oci import DigestMismatch, Layout
from gateway.images.unpack import MARKER, check_tree, unpack


class ImageCheckError(Exception):
    """The image is absent, damaged or not the pinned one."""


def ensure_image(section: dict[str, Any]) -> str:
    """Make the image present and verified; returns the digest found on this node."""
    digest = str(section["digest"])
    try:
        if section["runtime"] == "podman":
            return _podman(section, digest)
        return _directory(section, digest)
    except DigestMismatch as exc:
        raise ImageCheckError(f"image {digest}: digest mismatch: {exc}") from None
    except GatewayError as exc:
        raise ImageCheckError(f"image {digest}: cannot check it: {exc}") from None
    except OSError as exc:
        raise ImageCheckError(f"image {digest}: cannot read it: {exc}") from None


def _layout(section: dict[str, Any]) -> Layout | None:
    store = section.get("store")
    if not store:
        return None
    layout = Layout(Path(store) / "layout")
    return layout if (layout.root / "index.json").exists() else None


def _podman(section: dict[str, Any], digest: str) -> str:
    from gateway.images.podman import ensure_conf, load, podman_digest

    env = dict(section.get("runtime_env") or {})
    if section.get("podman_dir"):
        env.update(ensure_conf(Path(section["podman_dir"]), Path(section["runroot"])))
    found = podman_digest(section["ref"], env)
    if found is None:
        layout = _layout(section)
        if layout is None or not layout.blob_path(digest).exists():
            raise ImageCheckError(f"image {digest} is absent: not in podman's storage nor in "
                                  f"the image store {section.get('store')}")
        layout.verify_image(digest)
        load(layout.root, digest, section["load_as"], env)
        found = podman_digest(section["ref"], env)
    if found is None:
        raise ImageCheckError(f"image {digest} is absent from podman's storage after loading")
    if found != digest:
        raise ImageCheckError(f"image digest mismatch: podman holds {found} for "
                              f"{section['ref']}, the spec pins {digest}")
    return found


def _directory(section: dict[str, Any], digest: str) -> str:
    folder = Path(section["path"]).parent
    if not (folder / MARKER).exists():
        layout = _layout(section)
        if layout is None or not layout.blob_path(digest).exists():
            raise ImageCheckError(f"image {digest} is absent: not unpacked at {folder} nor in "
                                  f"the image store {section.get('store')}")
        unpack(layout, digest, folder.parent)
    return check_tree(folder, digest)
