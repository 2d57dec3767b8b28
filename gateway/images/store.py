"""The image store: one OCI image layout folder, plus unpacked folders for ch-run.

    ROOT/layout/          OCI image layout (oci-layout, index.json, blobs/sha256/...)
    ROOT/unpacked/<hex>/  verified rootfs of one manifest digest, for directory runtimes
    ROOT/tmp/             work files, renamed into blobs/ when complete

Names are ``name:tag`` (the layout's ``org.opencontainers.image.ref.name`` annotation);
several names may point at one digest. ROOT may be a shared filesystem (Slurm nodes read it).
"""

from __future__ import annotations

import fcntl
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from gateway.errors import ImageError, NotFoundError
from gateway.images.oci import (DIGEST_RE, MT_MANIFEST, REF_ANNOTATION, DigestMismatch, Layout)
from gateway.images.unpack import unpack, unpacked_dir


@dataclass(frozen=True)
class ImageInfo:
    name: str            # name:tag, or "" when untagged
    digest: str          # manifest digest
    size: int            # config + layers, bytes
    created: str

    @property
    def pinned(self) -> str:
        return f"{self.name.rpartition(':')[0] or self.name or 'image'}@{self.digest}"


def split_ref(ref: str) -> tuple[str, str | None]:
    """``name[:tag][@sha256:...]`` -> (name:tag or name, digest or None)."""
    name, _, digest = ref.partition("@")
    if digest and not DIGEST_RE.match(digest):
        raise ImageError(f"{ref!r}: the digest must be sha256:<64 lowercase hex>")
    return name, digest or None


def with_tag(name: str) -> str:
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


class ImageStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.layout = Layout(self.root / "layout")

    @property
    def unpacked_root(self) -> Path:
        return self.root / "unpacked"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    # -- names ----------------------------------------------------------------------------
    def tag(self, name: str, digest: str, size: int) -> None:
        """Point ``name`` (name:tag) at ``digest``; an empty name records it untagged."""
        with self.locked():
            self.layout.init()
            index = self.layout.index()
            name = with_tag(name) if name else ""
            keep = [m for m in index.get("manifests", [])
                    if not (name and m.get("annotations", {}).get(REF_ANNOTATION) == name)
                    and not (m.get("digest") == digest and not m.get("annotations"))]
            entry: dict[str, Any] = {"mediaType": MT_MANIFEST, "digest": digest, "size": size}
            if name:
                entry["annotations"] = {REF_ANNOTATION: name}
            index["manifests"] = sorted(keep + [entry], key=lambda m: (
                m.get("annotations", {}).get(REF_ANNOTATION, ""), m["digest"]))
            self.layout.write_index(index)

    def entries(self) -> list[dict[str, Any]]:
        return list(self.layout.index().get("manifests", []))

    def resolve(self, ref: str) -> str:
        """A name, name:tag, NAME@sha256:... or sha256:... -> the manifest digest here."""
        if DIGEST_RE.match(ref):
            digest = ref
        else:
            name, pinned = split_ref(ref)
            if pinned is None:
                wanted = with_tag(name)
                found = [m["digest"] for m in self.entries()
                         if m.get("annotations", {}).get(REF_ANNOTATION) == wanted]
                if not found:
                    raise NotFoundError(f"no image named {wanted!r} in {self.root}; "
                                        "`hpcgw image ls` lists them")
                return str(found[0])
            digest = pinned
        if not self.layout.blob_path(digest).exists():
            raise NotFoundError(f"image {digest} is not in the store {self.root}; "
                                "build, import or copy it there first")
        return digest

    # -- reading --------------------------------------------------------------------------
    def info(self, digest: str, name: str = "") -> ImageInfo:
        manifest = self.layout.manifest(digest)
        config = json.loads(self.layout.read_blob(manifest["config"]["digest"]))
        size = manifest["config"]["size"] + sum(int(d["size"]) for d in manifest["layers"])
        return ImageInfo(name, digest, size, str(config.get("created", "")))

    def images(self) -> list[ImageInfo]:
        out = []
        for entry in self.entries():
            name = entry.get("annotations", {}).get(REF_ANNOTATION, "")
            try:
                out.append(self.info(entry["digest"], name))
            except DigestMismatch:
                out.append(ImageInfo(name, entry["digest"], 0, "(damaged: run `hpcgw image verify`)"))
        return out

    def inspect(self, ref: str) -> dict[str, Any]:
        digest = self.resolve(ref)
        manifest = self.layout.manifest(digest)
        config = json.loads(self.layout.read_blob(manifest["config"]["digest"]))
        names = [m.get("annotations", {}).get(REF_ANNOTATION) for m in self.entries()
                 if m["digest"] == digest]
        return {"digest": digest, "names": [n for n in names if n], "manifest": manifest,
                "config": config, "unpacked": str(unpacked_dir(self.unpacked_root, digest))
                if (unpacked_dir(self.unpacked_root, digest) / "rootfs").exists() else None}

    def verify(self, ref: str) -> list[str]:
        """Check every blob of the image against the manifest; ImageError names the bad one."""
        digest = self.resolve(ref)
        try:
            return self.layout.verify_image(digest)
        except DigestMismatch as exc:
            raise ImageError(f"image {digest} failed verification: {exc}") from None

    def unpack(self, ref: str) -> Path:
        digest = self.resolve(ref)
        try:
            with self.locked():
                return unpack(self.layout, digest, self.unpacked_root)
        except DigestMismatch as exc:
            raise ImageError(f"image {digest} cannot be unpacked: {exc}") from None

    # -- housekeeping ---------------------------------------------------------------------
    def untag(self, name: str) -> None:
        with self.locked():
            index = self.layout.index()
            wanted = with_tag(name)
            before = len(index.get("manifests", []))
            index["manifests"] = [m for m in index.get("manifests", [])
                                  if m.get("annotations", {}).get(REF_ANNOTATION) != wanted]
            if len(index["manifests"]) == before:
                raise NotFoundError(f"no image named {wanted!r}")
            self.layout.write_index(index)

    def gc(self, *, dry_run: bool = False) -> list[str]:
        """Remove blobs and unpacked folders that no index entry reaches; returns them."""
        with self.locked():
            live: set[str] = set()
            for entry in self.entries():
                live.add(entry["digest"])
                try:
                    manifest = self.layout.manifest(entry["digest"])
                except DigestMismatch:
                    continue
                live.update(d["digest"] for d in [manifest["config"], *manifest["layers"]])
            removed = []
            blobs = self.layout.root / "blobs" / "sha256"
            for path in sorted(blobs.iterdir()) if blobs.is_dir() else []:
                if f"sha256:{path.name}" not in live:
                    removed.append(f"sha256:{path.name}")
                    if not dry_run:
                        path.unlink()
            for folder in sorted(self.unpacked_root.iterdir()) if self.unpacked_root.is_dir() else []:
                if f"sha256:{folder.name}" not in live:
                    removed.append(str(folder))
                    if not dry_run:
                        shutil.rmtree(folder, ignore_errors=True)
            if not dry_run:
                shutil.rmtree(self.tmp, ignore_errors=True)
            return removed
