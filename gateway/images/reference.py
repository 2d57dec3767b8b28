"""Reference images: the tiny busybox image for plumbing tests and demos.

    python -m gateway.images.reference busybox DIR   writes DIR/rootfs and DIR/recipe.yaml

The rootfs is made from the machine's static busybox (Debian ``busybox-static``): the binary,
one symlink per applet, and minimal /etc/passwd and /etc/group. Then
``hpcgw image build DIR/recipe.yaml`` gives the same digest on every machine with the same
busybox build.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from gateway.errors import ImageError
from gateway.proc import run

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
RECIPE = """\
# The tiny reference image: static busybox. Built by `hpcgw image build recipe.yaml`.
name: hpcgw/busybox
tag: "1"
base:
  rootfs: ./rootfs
env:
  HOME: /tmp
cmd: [/bin/sh]
"""


def find_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file():
            return path
    raise ImageError("busybox is not installed; install the Debian package busybox-static")


def busybox_tree(dest: Path) -> Path:
    """Write the busybox recipe and its rootfs under ``dest``; returns the recipe path."""
    busybox = find_busybox()
    rootfs = dest / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "etc").mkdir()
    shutil.copyfile(busybox, rootfs / "bin" / "busybox")
    os.chmod(rootfs / "bin" / "busybox", 0o755)
    applets = run([str(busybox), "--list"]).stdout.split()
    for applet in sorted(set(applets) - {"busybox"}):
        os.symlink("busybox", rootfs / "bin" / applet)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/tmp:/bin/sh\n"
                                           "nobody:x:65534:65534:nobody:/tmp:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for path in (rootfs / "etc" / "passwd", rootfs / "etc" / "group"):
        os.chmod(path, 0o644)
    recipe = dest / "recipe.yaml"
    recipe.write_text(RECIPE)
    return recipe


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "busybox":
        print(__doc__, file=sys.stderr)
        return 2
    print(busybox_tree(Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
