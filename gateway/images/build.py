"""Reproducible image builds from a recipe, written straight into the store's OCI layout.

No tools needed: the layer tar, config, manifest and index are written in Python with
every source of variation fixed (sorted names, mtime 0, uid/gid 0, no user names, gzip
mtime 0, config ``created`` at the epoch), so building the same recipe from the same files
twice gives the same manifest digest.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterable

from gateway.errors import ImageError
from gateway.images.oci import (MT_CONFIG, MT_MANIFEST, Descriptor, Entry, canonical_json,
                                temp_file, tree_entries, write_layer)
from gateway.images.recipe import Recipe
from gateway.images.store import ImageInfo, ImageStore

EPOCH = "1970-01-01T00:00:00Z"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}


def _source(base_dir: Path, raw: str, what: str) -> Path:
    path = (base_dir / Path(raw).expanduser())
    if not path.exists() and not path.is_symlink():
        raise ImageError(f"{what} {raw!r} does not exist (looked at {path}); fix the path")
    return path


def _with_parents(entries: list[Entry], base: Iterable[Entry] = ()) -> list[Entry]:
    """Add a 0755 folder entry for every parent not listed, so extraction is explicit."""
    have = {e.path.strip("/") for e in [*entries, *base]}
    parents = set()
    for entry in entries:
        parts = entry.path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parents.add("/".join(parts[:i]))
    return [Entry(p) for p in sorted(parents - have)] + entries


def recipe_entries(recipe: Recipe, base_dir: Path) -> list[Entry]:
    entries = [Entry(d.strip("/"), None, 0o1777 if d == "/tmp" else 0o755) for d in recipe.dirs]
    for item in recipe.add:
        src = _source(base_dir, item.src, "add.src")
        dest = item.dest.strip("/")
        mode = int(item.mode, 8) if item.mode else None
        if src.is_dir() and not src.is_symlink():
            entries.extend(tree_entries(src, dest))
        else:
            entries.append(Entry(dest, src, mode))
    return entries


def _base_tree(recipe: Recipe, base_dir: Path, scratch: Path) -> Path:
    if recipe.base.rootfs:
        root = _source(base_dir, recipe.base.rootfs, "base.rootfs")
        if not root.is_dir():
            raise ImageError(f"base.rootfs {recipe.base.rootfs!r} is not a folder")
        return root
    tarball = _source(base_dir, str(recipe.base.tarball), "base.tarball")
    root = scratch / "base"
    root.mkdir()
    try:
        with tarfile.open(tarball) as tar:
            tar.extractall(root, filter="tar")
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"base.tarball {recipe.base.tarball!r} cannot be read: {exc}") from None
    return root


def _image_config(recipe: Recipe, diff_ids: list[str], base: dict[str, Any]) -> dict[str, Any]:
    env = dict(e.split("=", 1) for e in base.get("Env") or [] if "=" in e)
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(recipe.env)
    inner: dict[str, Any] = {"Env": [f"{k}={v}" for k, v in env.items()],
                             "WorkingDir": recipe.workdir}
    entrypoint = list(recipe.entrypoint) or base.get("Entrypoint")
    cmd = list(recipe.cmd) or (None if recipe.entrypoint else base.get("Cmd"))
    if entrypoint:
        inner["Entrypoint"] = entrypoint
    if cmd:
        inner["Cmd"] = cmd
    if recipe.user or base.get("User"):
        inner["User"] = recipe.user or base.get("User")
    labels = {**(base.get("Labels") or {}), **recipe.labels}
    if labels:
        inner["Labels"] = dict(sorted(labels.items()))
    return {"created": EPOCH, "architecture": ARCH.get(platform.machine(), platform.machine()),
            "os": "linux", "config": inner, "rootfs": {"type": "layers", "diff_ids": diff_ids}}


def _layer(store: ImageStore, entries: Iterable[Entry], compress: bool) -> tuple[Descriptor, str]:
    tmp = temp_file(store.tmp)
    try:
        diff_id, media_type = write_layer(list(entries), tmp, compress=compress)
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise ImageError(f"cannot write the image layer: {exc}") from None
    return store.layout.put_file(tmp, media_type, move=True), diff_id


def build(recipe: Recipe, base_dir: Path, store: ImageStore) -> ImageInfo:
    """Build ``recipe`` into ``store`` and tag it ``name:tag``; returns the image."""
    store.layout.init()
    layers: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    base_config: dict[str, Any] = {}
    added = recipe_entries(recipe, base_dir)
    with tempfile.TemporaryDirectory(dir=_scratch_parent(store)) as scratch:
        if recipe.base.image:
            digest = store.resolve(recipe.base.image)
            store.verify(digest)
            manifest = store.layout.manifest(digest)
            config = json.loads(store.layout.read_blob(manifest["config"]["digest"]))
            layers, diff_ids = list(manifest["layers"]), list(config["rootfs"]["diff_ids"])
            base_config = config.get("config") or {}
            entries = _with_parents(added)
        else:
            root = _base_tree(recipe, base_dir, Path(scratch))
            base_entries = list(tree_entries(root))
            entries = base_entries + _with_parents(added, base_entries)
        desc, diff_id = _layer(store, entries, recipe.compress)
        layers.append(desc.to_json())
        diff_ids.append(diff_id)
    config_desc = store.layout.put_bytes(
        canonical_json(_image_config(recipe, diff_ids, base_config)), MT_CONFIG)
    manifest_bytes = canonical_json({"schemaVersion": 2, "mediaType": MT_MANIFEST,
                                     "config": config_desc.to_json(), "layers": layers})
    manifest_desc = store.layout.put_bytes(manifest_bytes, MT_MANIFEST)
    store.tag(recipe.ref, manifest_desc.digest, manifest_desc.size)
    return store.info(manifest_desc.digest, recipe.ref)


def _scratch_parent(store: ImageStore) -> str:
    store.tmp.mkdir(parents=True, exist_ok=True)
    return os.fspath(store.tmp)


def clean_scratch(store: ImageStore) -> None:
    shutil.rmtree(store.tmp, ignore_errors=True)
