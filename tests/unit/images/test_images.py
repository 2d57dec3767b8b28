"""The image store without any container tool: recipes, reproducible digests, tampering,
export/import, pinning, unpacking and the node-side check."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gateway.errors import ImageError, NotFoundError, SpecError
from gateway.images.build import build
from gateway.images.check import ImageCheckError, ensure_image
from gateway.images.oci import MT_LAYER_GZ
from gateway.images.pin import pin_ref, rewrite_spec
from gateway.images.recipe import load_recipe, parse_recipe
from gateway.images.store import ImageStore
from gateway.images.transfer import export_archive, export_layout, import_path
from gateway.images.unpack import check_tree
from gateway.spec import parse_spec


def make_tree(root: Path) -> Path:
    (root / "rootfs" / "bin").mkdir(parents=True)
    (root / "rootfs" / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    os.chmod(root / "rootfs" / "bin" / "tool", 0o755)
    os.symlink("tool", root / "rootfs" / "bin" / "alias")
    (root / "rootfs" / ".hidden").write_text("dot file\n")
    (root / "app").mkdir()
    (root / "app" / "main.py").write_text("print('hi')\n")
    (root / "recipe.yaml").write_text(
        "name: team/app\ntag: '1'\nbase: {rootfs: ./rootfs}\n"
        "add:\n  - {src: ./app, dest: /opt/app}\n  - {src: ./app/main.py, dest: /usr/local/bin/main, mode: '0755'}\n"
        "env: {LANG: C.UTF-8}\ncmd: [/bin/tool]\n")
    return root / "recipe.yaml"


@pytest.fixture
def built(tmp_path: Path) -> tuple[ImageStore, str, Path]:
    recipe, base = load_recipe(make_tree(tmp_path / "src"))
    store = ImageStore(tmp_path / "store")
    return store, build(recipe, base, store).digest, tmp_path


def layer_path(store: ImageStore, digest: str) -> Path:
    return store.layout.blob_path(store.layout.manifest(digest)["layers"][0]["digest"])


# -- recipes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    ({"name": "a", "base": {"rootfs": "x"}, "bogus": 1}, "valid keys here are: add, base, cmd"),
    ({"name": "a", "base": {"rootfs": "x", "image": "y"}}, "exactly one of rootfs"),
    ({"name": "a", "base": {}}, "exactly one of rootfs"),
    ({"name": "A B", "base": {"rootfs": "x"}}, "name"),
    ({"name": "a", "base": {"rootfs": "x"}, "add": [{"src": "f", "dest": "rel/path"}]},
     "add.0.dest: dest must be an absolute path"),
    ({"name": "a", "base": {"rootfs": "x"}, "add": [{"src": "f", "dest": "/a/../etc"}]}, "'..'"),
    ({"name": "a", "base": {"rootfs": "x"}, "env": {"1X": "v"}}, "not a valid variable name"),
    ({"name": "a", "base": {"rootfs": "x", "tar": "y"}}, "base.tar: unknown key; valid keys here are: image, rootfs, tarball"),
])
def test_bad_recipes_name_the_field_and_the_fix(data: dict[str, object], message: str) -> None:
    with pytest.raises(ImageError, match="invalid image recipe") as info:
        parse_recipe(data)
    assert message in str(info.value)


def test_missing_source_is_named(tmp_path: Path) -> None:
    recipe = parse_recipe({"name": "a", "base": {"rootfs": "./nope"}})
    with pytest.raises(ImageError, match="base.rootfs './nope' does not exist"):
        build(recipe, tmp_path, ImageStore(tmp_path / "store"))
    assert not (tmp_path / "store" / "layout" / "index.json").exists() or \
        ImageStore(tmp_path / "store").images() == []


# -- reproducibility ----------------------------------------------------------------------------

def test_same_recipe_twice_gives_the_same_digest(tmp_path: Path) -> None:
    digests = []
    for n in range(2):
        recipe, base = load_recipe(make_tree(tmp_path / f"src{n}"))
        digests.append(build(recipe, base, ImageStore(tmp_path / f"store{n}")).digest)
    assert digests[0] == digests[1]
    os.utime(tmp_path / "src0" / "app" / "main.py", (1, 1))  # times do not matter
    recipe, base = load_recipe(tmp_path / "src0" / "recipe.yaml")
    assert build(recipe, base, ImageStore(tmp_path / "store0")).digest == digests[0]
    (tmp_path / "src0" / "app" / "main.py").write_text("print('changed')\n")
    assert build(recipe, base, ImageStore(tmp_path / "store0")).digest != digests[0]


def test_built_image_content(built: tuple[ImageStore, str, Path]) -> None:
    store, digest, _ = built
    info = store.inspect("team/app:1")
    assert info["digest"] == digest and info["names"] == ["team/app:1"]
    config = info["config"]
    assert config["created"] == "1970-01-01T00:00:00Z"
    assert "LANG=C.UTF-8" in config["config"]["Env"] and config["config"]["Cmd"] == ["/bin/tool"]
    assert info["manifest"]["layers"][0]["mediaType"] == MT_LAYER_GZ
    rootfs = store.unpack(digest)
    assert (rootfs / "opt" / "app" / "main.py").read_text() == "print('hi')\n"
    assert os.access(rootfs / "usr" / "local" / "bin" / "main", os.X_OK)
    assert os.readlink(rootfs / "bin" / "alias") == "tool"
    assert (rootfs / ".hidden").exists() and (rootfs / "work").is_dir()


def test_image_on_image_base_and_tarball_base(built: tuple[ImageStore, str, Path]) -> None:
    store, digest, tmp = built
    (tmp / "extra.txt").write_text("x\n")
    child = parse_recipe({"name": "team/child", "base": {"image": "team/app:1"},
                          "add": [{"src": "extra.txt", "dest": "/etc/extra.txt"}]})
    info = build(child, tmp, store)
    manifest = store.layout.manifest(info.digest)
    assert len(manifest["layers"]) == 2
    assert manifest["layers"][0] == store.layout.manifest(digest)["layers"][0]
    shutil.make_archive(str(tmp / "root"), "gztar", tmp / "src" / "rootfs")
    from_tar = parse_recipe({"name": "team/tar", "base": {"tarball": "root.tar.gz"}})
    assert (store.unpack(build(from_tar, tmp, store).digest) / "bin" / "tool").exists()


# -- tampering ----------------------------------------------------------------------------------

def test_tampered_blob_is_refused_naming_it(built: tuple[ImageStore, str, Path]) -> None:
    store, digest, _ = built
    layer = layer_path(store, digest)
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=f"sha256:{layer.name}.*tampered or corrupt"):
        store.verify("team/app:1")
    with pytest.raises(ImageError, match="cannot be unpacked"):
        store.unpack(digest)


def test_missing_blob_is_refused(built: tuple[ImageStore, str, Path]) -> None:
    store, digest, _ = built
    layer_path(store, digest).unlink()
    with pytest.raises(ImageError, match="missing from"):
        store.verify(digest)


def test_changed_unpacked_file_is_detected(built: tuple[ImageStore, str, Path]) -> None:
    store, digest, _ = built
    rootfs = store.unpack(digest)
    assert check_tree(rootfs.parent, digest) == digest
    (rootfs / "bin" / "tool").write_text("#!/bin/sh\necho evil\n")
    with pytest.raises(Exception, match="tree digest mismatch"):
        check_tree(rootfs.parent, digest)


# -- shipping -----------------------------------------------------------------------------------

def test_export_import_keeps_the_digest_and_archives_are_reproducible(
        built: tuple[ImageStore, str, Path]) -> None:
    store, digest, tmp = built
    sums = [export_archive(store, digest, tmp / f"app{n}.tar", "team/app:1") for n in range(2)]
    assert sums[0] == sums[1]
    other = ImageStore(tmp / "other")
    [info] = import_path(other, tmp / "app0.tar")
    assert (info.digest, info.name) == (digest, "team/app:1")
    export_layout(store, digest, tmp / "layout")
    [again] = import_path(ImageStore(tmp / "third"), tmp / "layout", "copy:2")
    assert (again.digest, again.name) == (digest, "copy:2")


def test_tampered_archive_imports_nothing(built: tuple[ImageStore, str, Path]) -> None:
    store, digest, tmp = built
    export_layout(store, digest, tmp / "layout", "team/app:1")
    layer = tmp / "layout" / "blobs" / "sha256" / layer_path(store, digest).name
    layer.write_bytes(layer.read_bytes() + b"junk")
    other = ImageStore(tmp / "other")
    with pytest.raises(ImageError, match="does not match its digest"):
        import_path(other, tmp / "layout")
    assert other.images() == []


def test_gc_removes_only_unreachable_blobs(built: tuple[ImageStore, str, Path]) -> None:
    store, digest, _ = built
    stray = store.layout.put_bytes(b"orphan", "application/octet-stream")
    store.unpack(digest)
    assert store.gc() == [stray.digest]
    store.verify(digest)
    store.untag("team/app:1")
    assert len(store.gc()) == 4  # manifest, config, layer, unpacked folder
    with pytest.raises(NotFoundError):
        store.resolve("team/app:1")


# -- pinning ------------------------------------------------------------------------------------

def test_tag_refused_digest_accepted(built: tuple[ImageStore, str, Path]) -> None:
    store, digest, tmp = built
    with pytest.raises(SpecError, match="hpcgw image pin team/app:1"):
        parse_spec({"name": "j", "image": "team/app:1", "command": ["true"]})
    pinned = pin_ref(store, "team/app:1")
    assert pinned == f"team/app@{digest}"
    assert parse_spec({"name": "j", "image": pinned, "command": ["true"]}).image == pinned


def test_pin_rewrites_only_the_image_line(built: tuple[ImageStore, str, Path]) -> None:
    store, digest, tmp = built
    spec = tmp / "job.yaml"
    spec.write_text("# my job\nname: j\nimage: team/app:1   # moving tag\ncommand: [/bin/true]\n")
    old = rewrite_spec(spec, pin_ref(store, "team/app:1"))
    assert old == "team/app:1"
    assert spec.read_text() == (f"# my job\nname: j\nimage: team/app@{digest}  # moving tag\n"
                                "command: [/bin/true]\n")
    (tmp / "noimage.yaml").write_text("name: j\ncommand: [/bin/true]\n")
    with pytest.raises(ImageError, match="add `image: NAME`"):
        rewrite_spec(tmp / "noimage.yaml", f"team/app@{digest}")


def test_unknown_name_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="hpcgw image ls"):
        ImageStore(tmp_path).resolve("nope:1")


# -- node-side check (directory runtimes) -------------------------------------------------------

def test_node_check_unpacks_from_the_store_and_reports_the_digest_found(
        built: tuple[ImageStore, str, Path]) -> None:
    store, digest, tmp = built
    section = {"runtime": "charliecloud", "digest": digest, "store": str(store.root),
               "path": str(store.unpacked_root / digest[7:] / "rootfs")}
    assert ensure_image(section) == digest
    (Path(section["path"]) / "bin" / "tool").write_text("evil")
    with pytest.raises(ImageCheckError, match="digest mismatch"):
        ensure_image(section)


def test_node_check_absent_image(tmp_path: Path) -> None:
    digest = "sha256:" + "0" * 64
    section = {"runtime": "charliecloud", "digest": digest, "store": str(tmp_path / "none"),
               "path": str(tmp_path / "none" / "unpacked" / ("0" * 64) / "rootfs")}
    with pytest.raises(ImageCheckError, match="absent"):
        ensure_image(section)


def test_unpack_refuses_paths_outside_the_folder(tmp_path: Path) -> None:
    import io
    import tarfile

    from gateway.images.unpack import _apply_layer

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("etc")
        link.type, link.linkname = tarfile.SYMTYPE, "/"
        tar.addfile(link)
        evil = tarfile.TarInfo("etc/evil-" + tmp_path.name)
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    buf.seek(0)
    (tmp_path / "rootfs").mkdir()
    with tarfile.open(fileobj=buf, mode="r|") as tar, pytest.raises(tarfile.TarError):
        _apply_layer(tar, tmp_path / "rootfs")
    assert not Path("/evil-" + tmp_path.name).exists()


def test_index_json_is_valid_oci(built: tuple[ImageStore, str, Path]) -> None:
    store, digest, _ = built
    index = json.loads((store.layout.root / "index.json").read_text())
    assert index["schemaVersion"] == 2
    assert json.loads((store.layout.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}


def test_unpack_again_reuses_the_verified_folder(built: tuple[ImageStore, str, Path]) -> None:
    from gateway.images.unpack import unpack

    store, digest, _ = built
    rootfs = store.unpack(digest)
    inode = rootfs.parent.stat().st_ino
    assert unpack(store.layout, digest, store.unpacked_root) == rootfs
    assert rootfs.parent.stat().st_ino == inode  # not replaced under a running job
