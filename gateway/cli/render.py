"""Human output for the CLI, drawn with rich (tables, colours that degrade to plain text)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.table import Table

console = Console(highlight=False, soft_wrap=True)
COLOURS = {"PENDING": "yellow", "SUBMITTING": "yellow", "QUEUED": "cyan", "RUNNING": "blue",
           "SUCCEEDED": "green", "FAILED": "red", "TIMEOUT": "red", "CANCELLED": "magenta",
           "LOST": "red", "UNKNOWN": "yellow"}


def ago(stamp: float | None) -> str:
    if not stamp:
        return ""
    delta = max(0, time.time() - stamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{int(delta // size)}{unit} ago"
    return f"{int(delta)}s ago"


def duration(start: float | None, end: float | None) -> str:
    if not start:
        return ""
    seconds = int((end or time.time()) - start)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def state_text(state: str) -> str:
    return f"[{COLOURS.get(state, 'white')}]{state}[/]"


def job_table(records: Sequence[Any], counts: Mapping[str, int] | None = None) -> None:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "NAME", "STATE", "TARGET", "EXIT", "CREATED", "RUNTIME", "REASON"):
        table.add_column(column, no_wrap=column != "REASON", overflow="ellipsis")
    for r in records:
        table.add_row(r.id, r.name, state_text(r.state.value), r.backend or r.target,
                      "" if r.exit_code is None else str(r.exit_code), ago(r.created_at),
                      duration(r.started_at, r.ended_at), (r.reason or "")[:60])
    console.print(table)
    if counts:
        summary = "  ".join(f"{state_text(k)} {v}" for k, v in sorted(counts.items()))
        console.print(f"[dim]{sum(counts.values())} jobs:[/] {summary}")


def submitted(record: Any, waited: bool = False) -> None:
    extra = f" exit {record.exit_code}" if waited and record.exit_code is not None else ""
    reason = f" ({record.reason})" if waited and record.reason and not record.state.value == "SUCCEEDED" else ""
    console.print(f"{record.id}  {record.name}  {state_text(record.state.value)}{extra}{reason}")


def plans(items: Sequence[Mapping[str, Any]]) -> None:
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "TARGET", "BACKEND", "SPEC DIGEST"):
        table.add_column(column)
    cloud = any("instance_type" in item for item in items)
    if cloud:
        table.add_column("INSTANCE")
        table.add_column("EST. COST (USD)")
    for item in items:
        row = [item["name"], item["target"], item["backend"], item["spec_digest"][:19]]
        if cloud and "instance_type" in item:
            nodes = f"{item['nodes']} x " if item.get("nodes", 1) > 1 else ""
            source = ", spot history" if item.get("price_source") == "spot price history" else ""
            row += [f"{nodes}{item['instance_type']} {item['market']} ({item['price_per_hour']:g}/h{source})",
                    f"{item['estimated_cost']:.4f} (max {item['max_cost']:.4f})"]
        elif cloud:
            row += ["", ""]
        table.add_row(*row)
    console.print(table)
    for item in items:
        if "placement" in item:
            placement(item["name"], item["placement"])


def placement(name: str, data: Mapping[str, Any]) -> None:
    """The broker's decision for ``target: auto``, with every estimate it weighed."""
    console.print(f"[bold]{name}[/]: auto -> {data.get('chosen') or '(none)'}: {data.get('reason')}")
    for e in data.get("estimates", []):
        status = "ok" if e["feasible"] else "no"
        console.print(f"  {e['target']:<16} {status:<3} wait {e['wait_s']:>7.0f} s  run {e['run_s']:>7.0f} s"
                      f"  total {e['total_s']:>7.0f} s  ${e['cost']:.4f}  {e['why']}")


def job_detail(record: Any, attempts: Sequence[Mapping[str, Any]], events: Sequence[Any],
               log_path: Path) -> None:
    spec = record.spec
    res = spec.resources
    rows = [
        ("id", record.id), ("name", record.name), ("state", state_text(record.state.value)),
        ("reason", record.reason or ""), ("target", record.target),
        ("backend", f"{record.backend or ''} {record.ref or ''}".strip()),
        ("attempt", str(record.attempt)),
        ("exit code", "" if record.exit_code is None else str(record.exit_code)),
        ("image", spec.image or "(host runtime, no image)"),
        ("command", " ".join(spec.argv)),
        ("resources", f"{res.nodes} node(s) x {res.tasks_per_node} task(s) x {res.cpus_per_task} cpu"
                      f", gpus {res.gpus.count}, walltime {res.walltime}s"),
        ("spec digest", record.spec_digest), ("node", record.node or ""),
        ("runtime", duration(record.started_at, record.ended_at)),
        ("logs", str(log_path)),
    ]
    if record.labels:
        rows.append(("labels", ", ".join(f"{k}={v}" for k, v in record.labels.items())))
    prov = record.provenance
    if prov.get("image_digest") or prov.get("runtime") not in (None, "host"):
        rows.append(("ran image", f"{prov.get('image_digest') or '(not recorded)'}"
                                  f" via {prov.get('runtime')}"))
    for key, value in sorted(record.provenance.items()):
        if key in ("inputs",) and value:
            rows.append(("input hashes", ", ".join(f"{k}={v[:19]}" for k, v in value.items())))
    if record.outputs:
        rows.append(("outputs", ", ".join(record.outputs)))
    if record.cost:
        rows.append(("cost", f"${record.cost:.4f}"))
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if len(attempts) > 1 or (attempts and record.attempt > 1):
        console.print("[bold]attempts[/]")
        for a in attempts:
            console.print(f"  #{a['attempt']} {a['backend']} {a['state']} exit={a['exit_code']} {a['reason'] or ''}")
    if record.provenance.get("placement"):
        placement(record.name, record.provenance["placement"])
    console.print("[bold]events[/]")
    for event in events:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.at))
        move = f"{event.old_state or ''} -> {event.new_state}" if event.new_state else ""
        console.print(f"  {stamp}  {event.kind:<16} {move:<24} {event.message or ''}")


def campaign_status(info: Mapping[str, Any]) -> None:
    from rich.progress import BarColumn, Progress, TextColumn

    counts = info["counts"]
    finished = sum(v for k, v in counts.items() if k in ("SUCCEEDED", "CACHED", "FAILED",
                                                          "TIMEOUT", "CANCELLED", "LOST"))
    console.print(f"campaign [bold]{info['campaign']}[/]: {info['members']} members, "
                  f"{info['jobs']} jobs")
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), console=console,
                  transient=False, auto_refresh=False) as bar:
        bar.add_task("finished", total=max(info["members"], 1), completed=finished)
        bar.refresh()
    console.print("  " + "  ".join(f"{state_text(k) if k != 'CACHED' else '[green]CACHED[/]'} {v}"
                                   for k, v in sorted(counts.items())))
    budget = info.get("budget_core_hours")
    used = f"{info['core_hours']:.3f} core-hours" + (f" of {budget:g}" if budget else "")
    eta = f", ETA {info['eta_s']:.0f} s" if info.get("eta_s") is not None and info["remaining"] else ""
    console.print(f"  {used}{eta}")


def backends_table(rows: Sequence[Mapping[str, Any]]) -> None:
    table = Table(box=None, header_style="bold")
    for column in ("TARGET", "STATUS", "NODES", "CPUS", "GPUS", "FEATURES", "RUNTIMES"):
        table.add_column(column, overflow="fold")
    problems = []
    for row in rows:
        if not row["reachable"]:
            table.add_row(row["target"], "[red]unreachable[/]", "", "", "", "", "")
            problems.append(f"{row['target']}: {row['detail']}")
            continue
        gpus = f"{row['max_gpus']}" + (f" ({', '.join(row['gpu_types'])})" if row["gpu_types"] else "")
        table.add_row(row["target"], "[green]ok[/]", str(row["max_nodes"]), str(row["max_cpus"] or "-"),
                      gpus, " ".join(row["features"]), " ".join(row["runtimes"]))
    console.print(table)
    for problem in problems:
        console.print(f"[red]{problem}[/]")
