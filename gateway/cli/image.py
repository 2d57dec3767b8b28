"""``hpcgw image``: build, import, pin, ls, inspect, export, verify, load, unpack, gc."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gateway.cli.common import CONTEXT, emit_json, handled


def _store(ctx: click.Context) -> Any:
    from gateway.config import load_config
    from gateway.images.store import ImageStore

    root = ctx.find_root().params.get("data_dir")
    config = load_config({"data_dir": root} if root else None)
    ctx.meta["hpcgw.config"] = config
    return ImageStore(config.images_path)


def _info_dict(info: Any) -> dict[str, Any]:
    return {"name": info.name, "digest": info.digest, "pinned": info.pinned, "size": info.size,
            "created": info.created}


@click.group(name="image", context_settings=CONTEXT)
def image() -> None:
    """Container images: build reproducibly, import, pin by digest, verify, ship."""


@image.command(context_settings=CONTEXT)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def build(ctx: click.Context, recipe: str, as_json: bool) -> None:
    """Build an image from a recipe (YAML). Same recipe and files -> same digest."""
    from gateway.images.build import build as do_build
    from gateway.images.recipe import load_recipe

    parsed, base_dir = load_recipe(recipe)
    info = do_build(parsed, base_dir, _store(ctx))
    emit_json(_info_dict(info)) if as_json else click.echo(f"{info.name}  {info.pinned}")


@image.command(name="import", context_settings=CONTEXT)
@click.argument("path", type=click.Path())
@click.option("--name", help="Tag the image as NAME[:TAG] (default: the name in the archive).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def import_cmd(ctx: click.Context, path: str, name: str | None, as_json: bool) -> None:
    """Import an OCI layout or archive, or a podman/docker archive; every blob is checked."""
    from gateway.images.transfer import import_path

    found = import_path(_store(ctx), Path(path), name)
    if as_json:
        emit_json([_info_dict(i) for i in found])
    for info in [] if as_json else found:
        click.echo(f"{info.name or '(untagged)'}  {info.pinned}")


@image.command(context_settings=CONTEXT)
@click.argument("ref")
@click.option("--spec", "specs", multiple=True, type=click.Path(dir_okay=False),
              help="Rewrite this spec file's image: line to the pinned reference (repeatable).")
@click.option("--podman/--no-podman", default=True, show_default=True,
              help="Also look in the gateway's podman storage when the store lacks REF.")
@click.pass_context
@handled
def pin(ctx: click.Context, ref: str, specs: tuple[str, ...], podman: bool) -> None:
    """Print REF (name[:tag]) pinned as NAME@sha256:..., and rewrite spec files to use it."""
    from gateway.images.pin import pin_ref, rewrite_spec

    store = _store(ctx)
    env = None
    if podman:
        from gateway.images.podman import ensure_conf

        env = ensure_conf(ctx.meta["hpcgw.config"].podman_path)
    pinned = pin_ref(store, ref, env)
    for spec in specs:
        old = rewrite_spec(Path(spec), pinned)
        click.echo(f"{spec}: image {old or '(empty)'} -> {pinned}", err=True)
    click.echo(pinned)


@image.command(name="ls", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def ls_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the images in the store."""
    infos = _store(ctx).images()
    if as_json:
        emit_json([_info_dict(i) for i in infos])
        return
    for info in infos:
        click.echo(f"{info.name or '(untagged)':<32} {info.digest}  {info.size / 1e6:8.1f} MB")


@image.command(context_settings=CONTEXT)
@click.argument("ref")
@click.pass_context
@handled
def inspect(ctx: click.Context, ref: str) -> None:
    """Print an image's digest, names, manifest and config as JSON."""
    emit_json(_store(ctx).inspect(ref))


@image.command(context_settings=CONTEXT)
@click.argument("refs", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def verify(ctx: click.Context, refs: tuple[str, ...], as_json: bool) -> None:
    """Check every blob's sha256 against the manifest (all images when none is named)."""
    store = _store(ctx)
    targets = list(refs) or sorted({i.digest for i in store.images()})
    results = {ref: store.verify(ref) for ref in targets}
    if as_json:
        emit_json(results)
        return
    for ref, blobs in results.items():
        click.echo(f"{ref}: ok ({len(blobs)} blobs)")


@image.command(context_settings=CONTEXT)
@click.argument("ref")
@click.argument("dest", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["oci-archive", "oci-layout"]),
              default="oci-archive", show_default=True)
@click.pass_context
@handled
def export(ctx: click.Context, ref: str, dest: str, fmt: str) -> None:
    """Write an image as an OCI archive (a tar) or layout folder, for shipping."""
    from gateway.images.transfer import export_archive, export_layout

    store = _store(ctx)
    digest = store.resolve(ref)
    name = ref if "@" not in ref and not ref.startswith("sha256:") else ""
    if fmt == "oci-layout":
        export_layout(store, digest, Path(dest), name)
        click.echo(f"{dest}: {digest}")
    else:
        click.echo(f"{dest}: {digest} (archive {export_archive(store, digest, Path(dest), name)})")


@image.command(context_settings=CONTEXT)
@click.argument("ref")
@click.pass_context
@handled
def load(ctx: click.Context, ref: str) -> None:
    """Copy an image into the gateway's podman storage (digest kept, blobs verified)."""
    from gateway.images.context import podman_name
    from gateway.images.podman import ensure_conf
    from gateway.images.podman import load as podman_load

    store = _store(ctx)
    digest = store.resolve(ref)
    store.verify(digest)
    env = ensure_conf(ctx.meta["hpcgw.config"].podman_path)
    name = podman_name(ref if "@" in ref or ":" in ref else f"{ref}@{digest}")
    podman_load(store.layout.root, digest, f"{name}:sha256-{digest[7:27]}", env)
    click.echo(f"{name}@{digest}")


@image.command(context_settings=CONTEXT)
@click.argument("ref")
@click.pass_context
@handled
def unpack(ctx: click.Context, ref: str) -> None:
    """Unpack a verified image into the store's folder for ch-run / apptainer; prints it."""
    click.echo(str(_store(ctx).unpack(ref)))


@image.command(context_settings=CONTEXT)
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.pass_context
@handled
def gc(ctx: click.Context, dry_run: bool) -> None:
    """Remove blobs and unpacked folders no named image uses."""
    removed = _store(ctx).gc(dry_run=dry_run)
    for item in removed:
        click.echo(("would remove " if dry_run else "removed ") + item)
    click.echo(f"{len(removed)} item(s)", err=True)
