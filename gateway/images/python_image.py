"""The Python reference image for the kernels' workloads, built from Debian packages.

    python -m gateway.images.python_image STORE     build (or reuse) and print NAME@sha256:...

debootstrap (minbase) with python3, NumPy and Numba from the machine's own Debian mirror
(read from /etc/apt/sources.list[.d], never hard-coded), trimmed (apt lists, docs, man pages,
locales), the project's ``kernels`` package added, byte code compiled with unchecked hashes
(valid in a read-only image), and Numba's cache warmed inside so jobs do not recompile.

File times become 0 in the image; Numba's cache index records the source file's mtime, so
the kernels' sources get mtime 0 *before* warming, and the cache stays valid in the image.

Built once: the image is tagged ``hpcgw/python:<key>``, where the key hashes everything
that goes in (suite, packages, mirror, builder version, kernels sources). With the same key
in the store, nothing is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from gateway.errors import ImageError, NotFoundError
from gateway.images.build import build
from gateway.images.oci import tree_entries
from gateway.images.recipe import parse_recipe
from gateway.images.store import ImageInfo, ImageStore
from gateway.proc import run

SUITE = "bookworm"
PACKAGES = ("python3", "python3-numpy", "python3-numba", "python3-threadpoolctl")
BUILDER_VERSION = "2"
SITE = "usr/local/lib/python3/dist-packages"
TRIM = ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man",
        "usr/share/info", "usr/share/locale", "var/log")
WARM = ("import runpy, sys\n"
        "sys.argv = ['kernels.warmup']\n"
        "runpy.run_module('kernels.warmup', run_name='__main__')\n")


def debian_mirror() -> str:
    """The first Debian mirror apt is configured with on this machine."""
    texts = [p.read_text() for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    for text in texts:
        for uri in re.findall(r"^URIs:\s*(\S+)", text, flags=re.M):
            if "security" not in uri:
                return uri
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        match = re.search(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", legacy.read_text(), flags=re.M)
        if match:
            return match.group(1)
    raise ImageError("no Debian mirror configured for apt; cannot build the Python image")


def kernels_source() -> Path:
    import kernels

    return Path(kernels.__file__).resolve().parent


def cache_key(mirror: str, kernels_dir: Path) -> str:
    h = hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)} {mirror} {BUILDER_VERSION}\n".encode())
    for entry in tree_entries(kernels_dir):
        if entry.source is None or "__pycache__" in entry.path or not entry.source.is_file():
            continue
        h.update(entry.path.encode() + b"\0" + entry.source.read_bytes())
    return h.hexdigest()[:16]


def _rootfs(dest: Path, mirror: str, kernels_dir: Path) -> Path:
    rootfs = dest / "rootfs"
    run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
         str(rootfs), mirror], timeout=1800)
    for rel in TRIM:
        shutil.rmtree(rootfs / rel, ignore_errors=True)
    target = rootfs / SITE / "kernels"
    shutil.copytree(kernels_dir, target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [target, *target.rglob("*")]:
        os.utime(path, (0, 0), follow_symlinks=False)  # as in the image: keeps Numba's cache valid
    env = {"NUMBA_CACHE_DIR": "/opt/numba-cache", "HPCGW_NUMBA_CACHE_DIR": "/opt/numba-cache",
           "PYTHONPATH": f"/{SITE}"}
    (rootfs / "opt" / "numba-cache").mkdir(parents=True, exist_ok=True)
    run(["chroot", str(rootfs), "python3", "-m", "compileall", "-q",
         "--invalidation-mode", "unchecked-hash", "/usr/lib/python3", f"/{SITE}"],
        env=env, timeout=900, check=False)
    run(["chroot", str(rootfs), "python3", "-c", WARM], env=env, timeout=1800)
    return rootfs


def python_image_ref(mirror: str, kernels_dir: Path) -> str:
    """The image's name and tag: the tag is ``cache_key`` of what goes in."""
    return f"hpcgw/python:{cache_key(mirror, kernels_dir)}"


def build_python_image(store: ImageStore) -> ImageInfo:
    mirror, kernels_dir = debian_mirror(), kernels_source()
    ref = python_image_ref(mirror, kernels_dir)
    try:
        return store.info(store.resolve(ref), ref)
    except NotFoundError:  # not built yet: build it
        pass
    store.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.tmp) as scratch:
        _rootfs(Path(scratch), mirror, kernels_dir)
        name, tag = ref.split(":")
        recipe = parse_recipe({"name": name, "tag": tag, "base": {"rootfs": "rootfs"},
                               "env": {"NUMBA_CACHE_DIR": "/opt/numba-cache",
                                       "HPCGW_NUMBA_CACHE_DIR": "/opt/numba-cache",
                                       "PYTHONPATH": f"/{SITE}", "HOME": "/tmp",
                                       "PYTHONDONTWRITEBYTECODE": "1"},
                               "cmd": ["python3"]})
        return build(recipe, Path(scratch), store)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(build_python_image(ImageStore(argv[0])).pinned)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
