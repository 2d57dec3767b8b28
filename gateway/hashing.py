"""Content hashes for provenance: files by their bytes, folders by their tree."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def path_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a folder's sorted (relative path, file hash) listing."""
    path = Path(path)
    if path.is_file():
        return "sha256:" + file_sha256(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(path).as_posix()}\0{file_sha256(item)}\n".encode())
    return "sha256:" + digest.hexdigest()
