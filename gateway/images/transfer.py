"""Moving images in and out of the store: OCI layouts and archives, podman/docker archives.

Import checks every blob against the digest that names it before the image is tagged, so a
damaged archive is refused and leaves nothing named. Export writes an OCI layout folder or
a reproducible OCI archive (tar with sorted names, mtime 0) for shipping to nodes or S3.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from gateway.errors import ImageError
from gateway.images.oci import (MT_CONFIG, MT_DOCKER_MANIFEST, MT_LAYER, MT_MANIFEST,
                                REF_ANNOTATION, DigestMismatch, Layout, canonical_json,
                                sha256_file, tree_entries, write_layer)
from gateway.images.store import ImageInfo, ImageStore, with_tag

IMAGE_MANIFESTS = (MT_MANIFEST, MT_DOCKER_MANIFEST)


def _copy_blob(src: Layout, dest: Layout, desc: dict[str, Any]) -> None:
    path = src.blob_path(desc["digest"])
    if not path.exists():
        raise ImageError(f"blob {desc['digest']} is missing from {src.root}")
    got = dest.put_file(path, desc.get("mediaType", ""))
    if got.digest != desc["digest"]:
        dest.blob_path(got.digest).unlink(missing_ok=True)
        raise ImageError(f"blob {desc['digest']} in {src.root} does not match its digest "
                         f"(content hashes to {got.digest}): tampered or corrupt; nothing imported")


def import_layout(store: ImageStore, root: Path, name: str | None = None) -> list[ImageInfo]:
    """Import every image manifest of an OCI layout folder (or the one tagged ``name``)."""
    src = Layout(root)
    entries = [m for m in src.index().get("manifests", []) if m.get("mediaType") in IMAGE_MANIFESTS
               or m.get("mediaType") is None]
    if not entries:
        raise ImageError(f"{root}: the layout's index.json names no image manifest "
                         "(multi-platform indexes are not supported; export one platform)")
    if name and len(entries) > 1:
        tagged = [m for m in entries if m.get("annotations", {}).get(REF_ANNOTATION) in (name, with_tag(name))]
        entries = tagged or entries[:1]
    store.layout.init()
    found = []
    for entry in entries:
        try:
            manifest = src.manifest(entry["digest"])
        except DigestMismatch as exc:
            raise ImageError(f"{root}: {exc}; nothing imported") from None
        for desc in [manifest["config"], *manifest["layers"]]:
            _copy_blob(src, store.layout, desc)
        _copy_blob(src, store.layout, {"digest": entry["digest"], "mediaType": MT_MANIFEST})
        tag = name or entry.get("annotations", {}).get(REF_ANNOTATION, "")
        size = src.blob_path(entry["digest"]).stat().st_size
        store.tag(tag, entry["digest"], size)
        found.append(store.info(entry["digest"], with_tag(tag) if tag else ""))
    return found


def _import_docker_archive(store: ImageStore, folder: Path, name: str | None) -> list[ImageInfo]:
    """podman/docker archive (manifest.json + config + layer tars) -> an OCI image.

    The layers are stored uncompressed as they are, so their diff_ids hold; the manifest is
    new, so the digest differs from the registry's (``podman save --format oci-archive``
    keeps it)."""
    items = json.loads((folder / "manifest.json").read_text())
    store.layout.init()
    found = []
    for item in items:
        config_path = folder / item["Config"]
        config = store.layout.put_file(config_path, MT_CONFIG)
        diff_ids = json.loads(config_path.read_text())["rootfs"]["diff_ids"]
        layers = []
        for rel, diff_id in zip(item["Layers"], diff_ids):
            desc = store.layout.put_file(folder / rel, MT_LAYER)
            if desc.digest != diff_id:
                raise ImageError(f"layer {rel} hashes to {desc.digest}, the config says {diff_id}: "
                                 "tampered or corrupt; nothing tagged")
            layers.append(desc.to_json())
        manifest = store.layout.put_bytes(canonical_json(
            {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config.to_json(),
             "layers": layers}), MT_MANIFEST)
        tag = name or (item.get("RepoTags") or [""])[0]
        store.tag(tag, manifest.digest, manifest.size)
        found.append(store.info(manifest.digest, with_tag(tag) if tag else ""))
    return found


def import_path(store: ImageStore, path: Path, name: str | None = None) -> list[ImageInfo]:
    """An OCI layout folder, an OCI archive, or a podman/docker archive."""
    if path.is_dir():
        if not (path / "oci-layout").exists():
            raise ImageError(f"{path} is a folder but not an OCI layout (no oci-layout file)")
        return import_layout(store, path, name)
    if not path.is_file():
        raise ImageError(f"{path} does not exist; give an OCI layout folder or an archive")
    store.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.tmp) as scratch:
        try:
            with tarfile.open(path) as tar:
                tar.extractall(scratch, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise ImageError(f"{path} is not a readable tar archive: {exc}") from None
        folder = Path(scratch)
        if (folder / "oci-layout").exists():
            return import_layout(store, folder, name)
        if (folder / "manifest.json").exists():
            return _import_docker_archive(store, folder, name)
    raise ImageError(f"{path}: neither an OCI archive (oci-layout) nor a podman/docker archive "
                     "(manifest.json)")


def export_layout(store: ImageStore, digest: str, dest: Path, name: str = "") -> None:
    """Write an OCI layout folder holding only this image (blobs verified on the way)."""
    store.verify(digest)
    out = Layout(dest)
    out.init()
    manifest = store.layout.manifest(digest)
    for desc in [manifest["config"], *manifest["layers"]]:
        out.put_file(store.layout.blob_path(desc["digest"]), desc["mediaType"])
    size = out.put_file(store.layout.blob_path(digest), MT_MANIFEST).size
    entry: dict[str, Any] = {"mediaType": MT_MANIFEST, "digest": digest, "size": size}
    if name:
        entry["annotations"] = {REF_ANNOTATION: name}
    index = out.index()
    index["manifests"] = [m for m in index.get("manifests", []) if m["digest"] != digest] + [entry]
    out.write_index(index)


def export_archive(store: ImageStore, digest: str, dest: Path, name: str = "") -> str:
    """A reproducible OCI archive (uncompressed tar of the layout); returns its sha256."""
    store.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.tmp) as scratch:
        export_layout(store, digest, Path(scratch) / "layout", name)
        tmp = dest.with_name(f".{dest.name}.tmp")
        write_layer(list(tree_entries(Path(scratch) / "layout")), tmp, compress=False)
        shutil.move(str(tmp), dest)
    return sha256_file(dest)
