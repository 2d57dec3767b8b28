"""Verified unpacking of an image into a folder (for ch-run and apptainer), and the tree
digest that lets a node check the folder has not changed since.

Stdlib only. The manifest and every layer are verified before extraction; layers are
applied in order with OCI whiteouts; extraction refuses paths that would land outside the
folder (``tarfile``'s ``tar`` filter). The folder is ``ROOT/<manifest hex>/rootfs`` with
``ROOT/<hex>/hpcgw-image.json`` recording the manifest digest and the tree digest.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import Any

from gateway.images.oci import DigestMismatch, Layout

MARKER = "hpcgw-image.json"
# Mount points directory runtimes need and cannot create in a read-only image.
MOUNT_POINTS = ("dev", "proc", "sys", "tmp", "work", "in", "out", "home")


def unpacked_dir(root: Path, digest: str) -> Path:
    return Path(root) / digest.split(":", 1)[1]


def _apply_layer(tar: tarfile.TarFile, rootfs: Path) -> None:
    for member in tar:
        name = member.name
        while name.startswith("./"):
            name = name[2:]
        name = name.lstrip("/")
        parent, _, base = name.rpartition("/")
        if base.startswith(".wh."):
            target = rootfs / parent / base[len(".wh."):]
            if base == ".wh..wh..opq":
                folder = rootfs / parent
                for child in folder.iterdir() if folder.is_dir() else []:
                    _remove(child)
            else:
                _remove(target)
            continue
        existing = rootfs / name
        if existing.is_symlink() or (existing.exists() and not existing.is_dir()) \
                or (existing.is_dir() and not member.isdir()):
            _remove(existing)
        tar.extract(member, rootfs, set_attrs=True, filter="tar")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def unpack(layout: Layout, digest: str, root: Path) -> Path:
    """Verify ``digest`` in ``layout`` and unpack it under ``root``; returns the rootfs.

    Already unpacked and unchanged: returned as is. Work happens in a temporary folder
    renamed into place, so a half-unpacked image is never seen."""
    final = unpacked_dir(root, digest)
    if (final / MARKER).exists():
        check_tree(final, digest)
        return final / "rootfs"
    manifest = layout.manifest(digest)
    layout.verify_image(digest)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "rootfs").mkdir(parents=True)
    for desc in manifest["layers"]:
        path = layout.blob_path(desc["digest"])
        opener: Any = gzip.open if desc["mediaType"].endswith("gzip") else open
        with opener(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            _apply_layer(tar, tmp / "rootfs")
    for name in MOUNT_POINTS:
        point = tmp / "rootfs" / name
        if not point.exists() and not point.is_symlink():
            point.mkdir(mode=0o755)
    config = json.loads(layout.read_blob(manifest["config"]["digest"]))
    (tmp / MARKER).write_text(json.dumps({"manifest_digest": digest,
                                          "tree_digest": tree_digest(tmp / "rootfs"),
                                          "config": config.get("config", {})}, sort_keys=True))
    if final.exists() and not (final / MARKER).exists():
        shutil.rmtree(final, ignore_errors=True)  # a broken folder from an interrupted run
    try:
        os.replace(tmp, final)
    except OSError:  # another process unpacked it meanwhile: keep theirs (jobs may use it)
        shutil.rmtree(tmp, ignore_errors=True)
        check_tree(final, digest)
    return final / "rootfs"


def tree_digest(rootfs: Path) -> str:
    """sha256 over every entry's path, type, mode and content (or link target), sorted."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(rootfs):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            st = full.lstat()
            rel = full.relative_to(rootfs).as_posix()
            if stat.S_ISLNK(st.st_mode):
                h.update(f"L {rel} {os.readlink(full)}\n".encode("utf-8", "surrogateescape"))
            elif stat.S_ISREG(st.st_mode):
                fh = hashlib.sha256()
                with open(full, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        fh.update(chunk)
                h.update(f"F {rel} {stat.S_IMODE(st.st_mode):o} {fh.hexdigest()}\n"
                         .encode("utf-8", "surrogateescape"))
            else:
                h.update(f"D {rel} {stat.S_IMODE(st.st_mode):o} {stat.S_IFMT(st.st_mode):o}\n"
                         .encode("utf-8", "surrogateescape"))
    return "sha256:" + h.hexdigest()


def check_tree(folder: Path, digest: str) -> str:
    """Re-verify an unpacked image; returns the manifest digest it records."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        raise DigestMismatch(digest, f"no unpacked image at {folder}") from None
    if marker.get("manifest_digest") != digest:
        raise DigestMismatch(digest, f"{folder} holds {marker.get('manifest_digest')}")
    found = tree_digest(folder / "rootfs")
    if found != marker.get("tree_digest"):
        raise DigestMismatch(digest, f"files under {folder / 'rootfs'} changed since unpacking "
                                     "(tree digest mismatch)")
    return str(marker["manifest_digest"])
