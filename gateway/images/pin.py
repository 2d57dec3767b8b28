"""``pin``: turn a moving name (name:tag) into the digest it points at now, and rewrite a
spec file's ``image:`` line to ``NAME@sha256:...`` (everything else in the file kept)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from gateway.errors import ImageError, NotFoundError
from gateway.images.store import ImageStore, split_ref

IMAGE_LINE = re.compile(r"^image:[ \t]*(?P<value>[^#\n]*?)[ \t]*(?P<comment>#.*)?$", re.MULTILINE)


def pin_ref(store: ImageStore, ref: str, podman_env: dict[str, str] | None = None) -> str:
    """``name[:tag]`` -> ``name@sha256:...`` from the store, else from podman's storage."""
    name, digest = split_ref(ref)
    repo = re.sub(r":[^/]*$", "", name)
    try:
        return f"{repo}@{store.resolve(ref)}"
    except NotFoundError:
        if podman_env is None:
            raise
    from gateway.images.podman import podman_digest

    found = podman_digest(ref, podman_env)
    if not found:
        raise NotFoundError(f"no image {ref!r} in the store {store.root} nor in podman's storage; "
                            "build or import it first (`hpcgw image build|import`)")
    if digest and found != digest:
        raise ImageError(f"{ref}: podman holds {found}")
    return f"{repo}@{found}"


def rewrite_spec(path: Path, pinned: str) -> str:
    """Set the top-level ``image:`` of a spec file to ``pinned``; returns the old value."""
    from gateway.spec import load_yaml, parse_spec

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ImageError(f"cannot read spec {str(path)!r}: {exc.strerror}") from None
    matches = list(IMAGE_LINE.finditer(text))
    if len(matches) != 1:
        raise ImageError(f"{path}: expected one top-level `image:` line, found {len(matches)}; "
                         "add `image: NAME` to the spec first")
    match = matches[0]
    comment = f"  {match['comment']}" if match["comment"] else ""
    new_text = text[:match.start()] + f"image: {pinned}{comment}" + text[match.end():]
    parse_spec(load_yaml(new_text, str(path)), base_dir=path.resolve().parent,
               source=str(path), check_inputs=False)  # the result must still be a valid spec
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new_text, encoding="utf-8")
    os.replace(tmp, path)
    return match["value"].strip().strip("'\"")
