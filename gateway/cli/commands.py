"""The reading and controlling verbs of the CLI: ls, show, logs, cancel, wait, outputs,
rerun, validate, agent. Each reading verb runs one reconciler pass first (embedded mode)."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

from gateway.cli.common import CONTEXT, _after_submit, _exit_for, _gateway, _pairs, emit_json, handled


@click.command(name="ls", context_settings=CONTEXT)
@click.option("--state", "-s", multiple=True, help="Only jobs in this state (repeatable), e.g. RUNNING.")
@click.option("--label", "-l", multiple=True, metavar="K=V", help="Only jobs with this label.")
@click.option("--target", help="Only jobs for this target (slurm matches slurm:*).")
@click.option("--limit", "-n", type=int, default=50, show_default=True, help="Newest N jobs; 0 for all.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def ls_cmd(ctx: click.Context, state: tuple[str, ...], label: tuple[str, ...], target: str | None,
           limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    from gateway.cli import render
    from gateway.states import State

    valid = [s.value for s in State]
    bad = [s for s in state if s.upper() not in valid]
    if bad:
        raise click.BadParameter(f"{bad[0]!r}; valid states: {', '.join(valid)}", param_hint="--state")
    gw = _gateway(ctx)
    gw.reconcile()
    records = gw.store.jobs(states=[State(s.upper()) for s in state] or None, target=target,
                            labels=_pairs(label, "--label"), limit=limit or None)
    if as_json:
        emit_json([r.to_dict() for r in records])
    else:
        render.job_table(records, gw.store.counts() if not (state or label or target) else None)


@click.command(context_settings=CONTEXT)
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def show(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show a job's record, provenance, attempts and events."""
    from gateway.cli import render

    gw = _gateway(ctx)
    gw.reconcile()
    record = gw.store.get(gw.store.resolve(job_id))
    events = gw.store.events(record.id)
    attempts = gw.store.attempts(record.id)
    if as_json:
        emit_json({**record.to_dict(), "spec": record.spec_dict, "attempts": attempts,
                   "events": [e.to_dict() for e in events],
                   "logs": {s: str(gw.log_path(record.id, s)) for s in ("stdout", "stderr")}})
    else:
        render.job_detail(record, attempts, events, gw.log_path(record.id))


@click.command(context_settings=CONTEXT)
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing as the job writes, until it ends.")
@click.option("--stderr", "stream", flag_value="stderr", help="Show standard error instead.")
@click.option("--stdout", "stream", flag_value="stdout", default=True, hidden=True)
@click.pass_context
@handled
def logs(ctx: click.Context, job_id: str, follow: bool, stream: str) -> None:
    """Print a job's standard output (or --stderr)."""
    gw = _gateway(ctx)
    job_id = gw.store.resolve(job_id)
    if not follow:
        gw.reconcile()
        sys.stdout.write(gw.logs(job_id, stream))
        return
    _follow(gw, job_id, stream)


def _follow(gw: Any, job_id: str, stream: str) -> None:
    path: Path | None = None
    offset = 0
    while True:
        gw.reconcile()
        done = gw.store.get(job_id).state.terminal
        if not done:
            gw.refresh_log(job_id, stream)   # aws: one GET of the uploaded log per tick
        current: Path = gw.log_path(job_id, stream)
        if current != path:
            path, offset = current, 0
        if current.exists():
            with open(current, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            offset += len(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        if done:
            return
        time.sleep(0.25)


@click.command(context_settings=CONTEXT)
@click.argument("job_ids", nargs=-1, required=True)
@click.pass_context
@handled
def cancel(ctx: click.Context, job_ids: tuple[str, ...]) -> None:
    """Cancel jobs (a running job gets TERM, then KILL after a grace period)."""
    gw = _gateway(ctx)
    changed = gw.cancel(list(job_ids))
    for job_id in changed:
        click.echo(f"cancelling {job_id}")
    if not changed:
        click.echo("nothing to cancel (already ended or already cancelling)")


@click.command(context_settings=CONTEXT)
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 1).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def wait(ctx: click.Context, job_ids: tuple[str, ...], timeout: float | None, as_json: bool) -> None:
    """Wait until jobs end; the exit status mirrors them (0 when all succeeded)."""
    from gateway.cli import render

    jobs = _gateway(ctx).wait(list(job_ids), timeout=timeout)
    if as_json:
        emit_json([j.record.to_dict() for j in jobs])
    else:
        for job in jobs:
            render.submitted(job.record, waited=True)
    sys.exit(_exit_for([j.record for j in jobs]))


@click.command(context_settings=CONTEXT)
@click.argument("job_id")
@click.option("--copy-to", type=click.Path(file_okay=False), help="Copy the outputs into this folder.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def outputs(ctx: click.Context, job_id: str, copy_to: str | None, as_json: bool) -> None:
    """List (or copy) the files a job produced, as matched by its spec's outputs."""
    gw = _gateway(ctx)
    gw.reconcile()
    job = gw.store.get(gw.store.resolve(job_id))
    paths = gw.outputs(job.id)
    if copy_to:
        dest = Path(copy_to)
        for rel, path in zip(job.outputs, paths):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)
        paths = [dest / rel for rel in job.outputs]
    if as_json:
        emit_json([str(p) for p in paths])
    else:
        for path in paths:
            click.echo(str(path))


@click.command(context_settings=CONTEXT)
@click.argument("job_id")
@click.option("--wait", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def rerun(ctx: click.Context, job_id: str, wait: bool, as_json: bool) -> None:
    """Submit again exactly the spec a job ran (same spec digest)."""
    _after_submit(ctx, [_gateway(ctx).rerun(job_id)], wait, as_json)


@click.command(context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the canonical specs as JSON.")
@click.pass_context
@handled
def validate(ctx: click.Context, files: tuple[str, ...], as_json: bool) -> None:
    """Check spec files without submitting; prints each spec's digest."""
    from gateway.spec import load_spec

    gw = _gateway(ctx)
    specs = [gw.validate(load_spec(f)) for f in files]
    if as_json:
        emit_json([{"spec": s.canonical(), "spec_digest": s.spec_digest} for s in specs])
    else:
        for path, spec in zip(files, specs):
            click.echo(f"{path}: ok  {spec.name}  {spec.spec_digest}")


@click.command(context_settings=CONTEXT)
@click.option("--interval", type=float, help="Seconds between passes (default: agent.interval_s).")
@click.option("--once", is_flag=True, help="Run one pass and exit.")
@click.option("--until-idle", is_flag=True,
              help="Run passes until no job is pending or active, then exit (for cron).")
@click.option("--json", "as_json", is_flag=True, help="With --once: print the pass report.")
@click.pass_context
@handled
def agent(ctx: click.Context, interval: float | None, once: bool, until_idle: bool,
          as_json: bool) -> None:
    """Run reconciler passes continuously (optional: commands also run passes themselves)."""
    import dataclasses

    gw = _gateway(ctx)
    if until_idle:
        gw.agent(interval=interval, until_idle=True)
        return
    if once:
        report = gw.reconcile(block=True)
        if as_json:
            emit_json(dataclasses.asdict(report) if report else None)
        return
    click.echo(f"hpcgw agent: store {gw.config.store_path}", err=True)
    gw.agent(interval=interval)


def register(group: click.Group) -> None:
    from gateway.cli.campaign import campaign
    from gateway.cli.cloud import cloud
    from gateway.cli.dask import dask_group
    from gateway.cli.demo import demo
    from gateway.cli.image import image

    for command in (ls_cmd, show, logs, cancel, wait, outputs, rerun, validate, agent, campaign,
                    backends, image, demo, dask_group, cloud):
        group.add_command(command)


@click.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def backends(ctx: click.Context, as_json: bool) -> None:
    """List the configured backends and check that each is reachable (exit 4 if one is not)."""
    from gateway.cli import render

    gw = _gateway(ctx)
    rows = [_probe(gw, target) for target in _targets(gw)]
    if as_json:
        emit_json(rows)
    else:
        render.backends_table(rows)
    if any(not r["reachable"] for r in rows):
        sys.exit(4)


def _targets(gw: Any) -> list[str]:
    from gateway.config import packaged_configs

    targets = ["local"]
    for kind in ("slurm", "aws"):
        section = getattr(gw.config.backends, kind)
        names = set(section.profiles)
        packaged = packaged_configs() / kind
        if kind == "slurm" and packaged.is_dir():
            names |= {p.stem for p in packaged.glob("*.yaml") if p.stem != "example-site"}
        targets += [f"{kind}:{name}" for name in sorted(names)]
    return targets


def _probe(gw: Any, target: str) -> dict[str, Any]:
    from gateway.errors import GatewayError

    row: dict[str, Any] = {"target": target, "reachable": False, "detail": ""}
    try:
        caps = gw.backends.get(target).capabilities()
    except GatewayError as exc:
        row["detail"] = str(exc).splitlines()[0]
        return row
    row.update(reachable=True, max_nodes=caps.max_nodes, max_cpus=caps.max_cpus,
               max_gpus=caps.max_gpus, gpu_types=sorted(caps.gpu_types or []),
               features=sorted(caps.features or []), runtimes=sorted(caps.runtimes),
               max_walltime=caps.max_walltime, arrays=caps.arrays)
    return row
