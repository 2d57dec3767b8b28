"""OCI image layout primitives: content-addressed blobs, reproducible layers, manifests.

Stdlib only (the node runner imports it to verify an image before a job runs). A layout
folder holds ``oci-layout``, ``index.json`` and ``blobs/sha256/<hex>``; an image is known
by the sha256 of its manifest blob. Layers are written as tar with sorted names, mtime 0,
uid/gid 0 and no user/group names, then gzip with mtime 0 and no file name, so the same
inputs always give the same bytes and so the same digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
REF_ANNOTATION = "org.opencontainers.image.ref.name"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK = 1 << 20


class DigestMismatch(Exception):
    """A blob's bytes do not hash to the digest that names it (or it is missing)."""

    def __init__(self, digest: str, problem: str):
        self.digest, self.problem = digest, problem
        super().__init__(f"blob {digest}: {problem}")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class Layout:
    """An OCI image layout folder. Blobs are written once and never changed."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def blob_path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise DigestMismatch(digest, "not a sha256 digest")
        return self.root / "blobs" / "sha256" / digest.split(":", 1)[1]

    def init(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        marker = self.root / "oci-layout"
        if not marker.exists():
            _write_atomic(marker, canonical_json({"imageLayoutVersion": "1.0.0"}))
        if not (self.root / "index.json").exists():
            _write_atomic(self.root / "index.json",
                          canonical_json({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": []}))

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.exists():
            _write_atomic(path, data)
        return Descriptor(media_type, digest, len(data))

    def put_file(self, src: Path, media_type: str, *, move: bool = False) -> Descriptor:
        digest, size = sha256_file(src), src.stat().st_size
        path = self.blob_path(digest)
        if path.exists():
            if move:
                src.unlink()
        elif move:
            os.replace(src, path)
        else:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(CHUNK):
                    fout.write(chunk)
            os.replace(tmp, path)
        return Descriptor(media_type, digest, size)

    def read_blob(self, digest: str, *, verify: bool = True) -> bytes:
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DigestMismatch(digest, f"missing from {self.root}") from None
        if verify and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise DigestMismatch(digest, "content does not match its digest (tampered or corrupt)")
        return data

    def verify_blob(self, digest: str, size: int | None = None) -> None:
        path = self.blob_path(digest)
        if not path.exists():
            raise DigestMismatch(digest, f"missing from {self.root}")
        if size is not None and path.stat().st_size != size:
            raise DigestMismatch(digest, f"size {path.stat().st_size} but the manifest says {size}")
        if sha256_file(path) != digest:
            raise DigestMismatch(digest, "content does not match its digest (tampered or corrupt)")

    def index(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / "index.json").read_text())
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": []}
        return data if isinstance(data, dict) else {"manifests": []}

    def write_index(self, index: dict[str, Any]) -> None:
        _write_atomic(self.root / "index.json", canonical_json(index))

    def manifest(self, digest: str) -> dict[str, Any]:
        data = json.loads(self.read_blob(digest))
        if not isinstance(data, dict) or "layers" not in data or "config" not in data:
            raise DigestMismatch(digest, "is not an image manifest")
        return data

    def verify_image(self, digest: str) -> list[str]:
        """Check the manifest and every blob it names; returns the digests checked."""
        manifest = self.manifest(digest)
        checked = [digest]
        for desc in [manifest["config"], *manifest["layers"]]:
            self.verify_blob(desc["digest"], desc.get("size"))
            checked.append(desc["digest"])
        return checked


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- reproducible layers ---------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One file system entry of a layer: where it goes in the image and where it comes from."""

    path: str                  # inside the image, relative, no leading slash
    source: Path | None = None  # host file or symlink; None for a folder made from nothing
    mode: int | None = None     # permission bits; None: the source's


def _tarinfo(entry: Entry) -> tuple[tarfile.TarInfo | None, IO[bytes] | None]:
    info = tarfile.TarInfo(entry.path)
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    if entry.source is None:
        info.type, info.mode = tarfile.DIRTYPE, entry.mode if entry.mode is not None else 0o755
        return info, None
    st = entry.source.lstat()
    mode = entry.mode if entry.mode is not None else stat.S_IMODE(st.st_mode)
    info.mode = mode & 0o7777
    if stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(entry.source)
        info.mode = 0o777
        return info, None
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        return info, None
    if not stat.S_ISREG(st.st_mode):
        return None, None  # device files, fifos, sockets: the runtime provides /dev
    info.size = st.st_size
    return info, open(entry.source, "rb")


def write_layer(entries: Iterator[Entry] | list[Entry], dest: Path, *, compress: bool = True
                ) -> tuple[str, str]:
    """Write a reproducible layer tar (gzip unless ``compress`` is False) to ``dest``.

    Returns (diff_id, media type): the diff_id is the sha256 of the uncompressed tar, which
    the image config lists. Entries are sorted by path; later duplicates win.
    """
    unique = {e.path.strip("/"): e for e in entries if e.path.strip("/")}
    raw = hashlib.sha256()
    with open(dest, "wb") as out:
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) \
            if compress else None
        target: Any = gz if gz is not None else out
        sink: Any = _HashingWriter(target, raw)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(unique):
                info, fh = _tarinfo(unique[path])
                if info is None:
                    continue
                try:
                    tar.addfile(info, fh)
                finally:
                    if fh is not None:
                        fh.close()
        if gz is not None:
            gz.close()
    return "sha256:" + raw.hexdigest(), MT_LAYER_GZ if compress else MT_LAYER


class _HashingWriter(io.RawIOBase):
    def __init__(self, sink: IO[bytes], digest: Any):
        self.sink, self.digest = sink, digest

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.digest.update(data)
        self.sink.write(data)
        return len(data)


def tree_entries(root: Path, prefix: str = "") -> Iterator[Entry]:
    """Every entry under ``root`` (not following symlinks), placed under ``prefix``."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        parts = [p for p in (*Path(prefix).parts, *rel.parts) if p not in ("/", ".")]
        base = "/".join(parts)
        if base:
            yield Entry(base, Path(dirpath))
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            if name in dirnames and not full.is_symlink():
                continue  # walked into below
            yield Entry(f"{base}/{name}".strip("/"), full)


def temp_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    os.close(fd)
    return Path(name)
