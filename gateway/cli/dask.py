"""`hpcgw dask`: list the Dask clusters this gateway knows, close one, reap those whose owner died."""

from __future__ import annotations

import time
from typing import Any

import click

from gateway.cli.common import CONTEXT, _gateway, emit_json, handled


@click.group(name="dask", context_settings=CONTEXT)
def dask_group() -> None:
    """Dask clusters whose workers are gateway jobs (see docs/dask.md)."""


def _owner(row: dict[str, Any]) -> str:
    alive = {True: "alive", False: "gone", None: "other host"}[row["owner_alive"]]
    return f"{row['owner'] or '-'} ({alive})"


@dask_group.command(name="ls", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def ls_clusters(ctx: click.Context, as_json: bool) -> None:
    """Clusters: scheduler address, owner process (alive?), unfinished worker jobs."""
    from gateway.cli import render
    from gateway.dask.reaper import status

    gw = _gateway(ctx)
    gw.reconcile()
    rows = status(gw)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        render.console.print("no dask clusters")
    for row in rows:
        age = f"{(time.time() - row['created_at']) / 60:.0f} min" if row["created_at"] else "?"
        render.console.print(f"[bold]{row['name']}[/]  {row['address'] or 'no registry entry'}  "
                             f"target {row['target'] or '?'}  owner {_owner(row)}  age {age}  "
                             f"{len(row['active_jobs'])} unfinished worker job(s)")


@dask_group.command(context_settings=CONTEXT)
@click.option("--dry-run", is_flag=True, help="Only show what would be reaped.")
@click.option("--timeout", type=float, default=60, show_default=True,
              help="Seconds to wait for the backend to confirm the cancellations.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def reap(ctx: click.Context, dry_run: bool, timeout: float, as_json: bool) -> None:
    """Cancel the worker jobs of clusters whose owner process has exited (exit 1 if some
    job could not be confirmed ended)."""
    import sys

    from gateway.cli import render
    from gateway.dask.reaper import reap as do_reap

    rows = do_reap(_gateway(ctx), dry_run=dry_run, timeout=timeout)
    if as_json:
        emit_json(rows)
    else:
        verb = "would reap" if dry_run else "reaped"
        for row in rows:
            render.console.print(f"{verb} {row['name']}: {len(row['active_jobs'])} worker job(s)"
                                 + (f", still active: {', '.join(row['still_active'])}"
                                    if row["still_active"] else ""))
        if not rows:
            render.console.print("nothing to reap")
    if any(row["still_active"] for row in rows):
        sys.exit(1)


@dask_group.command(name="close", context_settings=CONTEXT)
@click.argument("name")
@click.option("--timeout", type=float, default=60, show_default=True,
              help="Seconds to wait for the backend to confirm the cancellations.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def close_cluster(ctx: click.Context, name: str, timeout: float, as_json: bool) -> None:
    """Close cluster NAME from any process: shut its scheduler down, cancel its scheduler
    and worker jobs (exit 1 if some job could not be confirmed ended)."""
    import sys

    from gateway.cli import render
    from gateway.dask import close

    left = close(_gateway(ctx), name, timeout=timeout)
    if as_json:
        emit_json({"name": name, "still_active": left})
    else:
        render.console.print(f"closed {name}" + (f", still active: {', '.join(left)}"
                                                  if left else ""))
    if left:
        sys.exit(1)
