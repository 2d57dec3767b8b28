"""`hpcgw campaign`: apply, plan, status, cancel and outputs of a declarative sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gateway.cli.common import CONTEXT, _gateway, emit_json, handled


@click.group(context_settings=CONTEXT)
def campaign() -> None:
    """Parameter sweeps kept in a file and re-applied (e.g. from cron) idempotently."""


def _load(path: str) -> Any:
    from gateway.campaigns.spec import load_campaign

    return load_campaign(path)


def _show_plan(result: Any, as_json: bool, verb: str) -> None:
    from gateway.cli import render

    if as_json:
        emit_json(result.to_dict())
        return
    counts = result.counts()
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing"
    render.console.print(f"campaign [bold]{result.campaign.campaign}[/]: {verb} {summary}")
    for action in result.actions:
        if action.kind not in ("keep", "done"):
            job = f" ({action.job.id})" if action.job else ""
            reason = f": {action.reason}" if action.reason else ""
            render.console.print(f"  {action.kind:<8} {action.params}{job}{reason}")


@campaign.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--no-cache", is_flag=True, help="Run members even when an identical result exists.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def apply(ctx: click.Context, file: str, no_cache: bool, as_json: bool) -> None:
    """Converge to FILE: submit what is missing, leave what runs, report what changed."""
    from gateway.campaigns.apply import CampaignLocked, apply as do_apply

    spec, base = _load(file)
    try:
        result = do_apply(_gateway(ctx), spec, base, cache=not no_cache)
    except CampaignLocked as exc:
        click.echo(str(exc), err=True)
        return
    _show_plan(result, as_json, "applied")


@campaign.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--no-cache", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def plan(ctx: click.Context, file: str, no_cache: bool, as_json: bool) -> None:
    """Show what `apply` would do, without doing it."""
    from gateway.campaigns.apply import plan as make_plan

    spec, base = _load(file)
    gw = _gateway(ctx)
    gw.reconcile()
    _show_plan(make_plan(gw, spec, base, cache=not no_cache), as_json, "would do")


def _name(target: str) -> str:
    if target.endswith((".yaml", ".yml")) and Path(target).exists():
        return str(_load(target)[0].campaign)
    return target


@campaign.command(context_settings=CONTEXT)
@click.argument("name_or_file")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def status(ctx: click.Context, name_or_file: str, as_json: bool) -> None:
    """Progress of a campaign: members per state, core-hours used, ETA."""
    from gateway.campaigns.apply import status as get_status
    from gateway.cli import render

    gw = _gateway(ctx)
    gw.reconcile()
    info = get_status(gw, _name(name_or_file))
    if as_json:
        emit_json(info)
        return
    render.campaign_status(info)


@campaign.command(context_settings=CONTEXT)
@click.argument("name_or_file")
@click.pass_context
@handled
def cancel(ctx: click.Context, name_or_file: str) -> None:
    """Cancel every unfinished job of a campaign."""
    gw = _gateway(ctx)
    jobs = [j.id for j in gw.store.campaign_jobs(_name(name_or_file)) if not j.state.terminal]
    changed = gw.cancel(jobs) if jobs else []
    click.echo(f"cancelling {len(changed)} job(s)")


@campaign.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Write the table here.")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]), default="csv")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.pass_context
@handled
def outputs(ctx: click.Context, file: str, out: str | None, fmt: str, as_json: bool) -> None:
    """Collect every member's result into one table (parameters, state, metrics)."""
    from gateway.campaigns import report
    from gateway.campaigns.spec import expand, member_key

    spec, base = _load(file)
    gw = _gateway(ctx)
    gw.reconcile()
    params = {member_key(p): p for p in expand(spec, base)}
    table = report.rows(gw, spec.campaign, params)
    if as_json or not out:
        emit_json(table)
    if out:
        click.echo(str(report.write(table, Path(out), fmt)), err=True)
