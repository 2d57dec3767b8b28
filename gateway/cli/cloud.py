"""``hpcgw cloud``: what the aws backend has running, and cleaning up what it left."""

from __future__ import annotations

import time
from typing import Any

import click

from gateway.cli.common import CONTEXT, _gateway, emit_json, handled


@click.group(context_settings=CONTEXT)
def cloud() -> None:
    """Cloud instances launched by this gateway (aws profiles in the config)."""


def _backends(gw: Any, profile: str | None) -> list[Any]:
    from gateway.errors import ConfigError

    names = [profile] if profile else sorted(gw.config.backends.aws.profiles)
    if not names:
        raise ConfigError("no aws profile configured (backends.aws.profiles in your config)")
    return [gw.backends.get(f"aws:{name}") for name in names]


def _row(backend: Any, inst: Any, now: float) -> dict[str, Any]:
    return {"profile": backend.profile.name, "instance": inst.id, "key": inst.key,
            "state": inst.state, "type": inst.type, "market": inst.market, "zone": inst.zone,
            "launched": inst.launched, "expiry": inst.expiry, "price_per_hour": inst.price,
            "cost_so_far": inst.cost_so_far(now) if inst.alive else None}


def _table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold", title=title)
    for column in ("PROFILE", "INSTANCE", "KEY", "STATE", "TYPE", "MARKET", "EXPIRES IN", "COST"):
        table.add_column(column)
    now = time.time()
    for r in rows:
        left = f"{(r['expiry'] - now) / 60:.0f} min" if r["expiry"] else ""
        cost = "" if r["cost_so_far"] is None else f"{r['cost_so_far']:.4f}"
        table.add_row(r["profile"], r["instance"], r["key"], r["state"], r["type"], r["market"],
                      left, cost)
    Console().print(table)


@cloud.command("ls", context_settings=CONTEXT)
@click.option("--profile", help="One aws profile (default: every configured one).")
@click.option("--all", "show_all", is_flag=True, help="Also instances already terminated.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def ls(ctx: click.Context, profile: str | None, show_all: bool, as_json: bool) -> None:
    """List the instances the gateway launched (one describe per profile)."""
    gw, now = _gateway(ctx), time.time()
    rows = [_row(b, inst, now) for b in _backends(gw, profile) for inst in b.snapshot(0)
            if show_all or inst.alive]
    emit_json(rows) if as_json else _table(rows, "cloud instances")


@cloud.command(context_settings=CONTEXT)
@click.option("--profile", help="One aws profile (default: every configured one).")
@click.option("--dry-run", is_flag=True, help="Show what would be terminated.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def reap(ctx: click.Context, profile: str | None, dry_run: bool, as_json: bool) -> None:
    """Terminate instances past their expiry or whose job is no longer active."""
    from gateway.backends.base import attempt_key
    from gateway.states import ACTIVE

    gw, now = _gateway(ctx), time.time()
    with gw.reconciler.locked(block=True):   # no pass launches while we decide
        active = {attempt_key(j.id, j.attempt) for j in gw.store.jobs(states=list(ACTIVE))}
        rows = [_row(b, inst, now) for b in _backends(gw, profile)
                for inst in b.reap(active, max_age=0, dry_run=dry_run)]
    emit_json(rows) if as_json else _table(rows, "would reap" if dry_run else "reaped")
