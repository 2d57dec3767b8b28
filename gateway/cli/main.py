"""The ``hpcgw`` command line (click). Heavy modules are imported inside commands so that
``hpcgw --help`` stays fast.

Exit codes: 0 success; 1 a job did not succeed (``wait``/``--wait`` mirror the job: its own
exit code when it failed, 124 on TIMEOUT, 130 when CANCELLED); 2 bad input; 3 not found;
4 a backend is unavailable; 5 the store cannot be used.
"""

from __future__ import annotations

from typing import Any

import click

from gateway.cli.common import CONTEXT, _after_submit, _gateway, _pairs, emit_json, handled

@click.group(context_settings=CONTEXT)
@click.version_option(package_name="hpcgw", prog_name="hpcgw")
@click.option("--data-dir", envvar="HPCGW_DATA_DIR", metavar="DIR",
              help="Where the store and job folders live (default: $XDG_DATA_HOME/hpcgw).")
@click.pass_context
def cli(ctx: click.Context, data_dir: str | None) -> None:
    """hpcgw: run pinned container jobs here, on Slurm, or in the cloud, and never lose one.

    \b
    Quick start:
      hpcgw run -- python -c 'print(6*7)'     run a command as a job
      hpcgw submit job.yaml --wait            submit a spec file and wait
      hpcgw ls                                list jobs
      hpcgw logs -f ID                        follow a job's output
    """


@cli.command(context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--wait", is_flag=True, help="Wait until the jobs end; exit status mirrors them.")
@click.option("--dry-run", is_flag=True, help="Validate and show where each job would go; submit nothing.")
@click.option("--array", "array", metavar="RANGE",
              help="One job per index (0-9, 1,3,5 or 0-99:2); each sees $HPCGW_ARRAY_INDEX.")
@click.option("--json", "as_json", is_flag=True, help="Print the job records as JSON.")
@click.pass_context
@handled
def submit(ctx: click.Context, files: tuple[str, ...], wait: bool, dry_run: bool,
           array: str | None, as_json: bool) -> None:
    """Submit job spec files (YAML). All are validated before any is recorded."""
    from gateway.cli import render
    from gateway.spec import load_spec

    gw = _gateway(ctx)
    specs = [gw.validate(load_spec(f)) for f in files]
    if array is not None:
        indices = parse_range(array)
        if len(specs) != 1:
            raise click.BadParameter("--array takes exactly one spec file", param_hint="--array")
        if not dry_run:
            _after_submit(ctx, gw.submit_array(specs[0], indices), wait, as_json)
            return
    if dry_run:
        plans = [gw.plan(s) for s in specs]   # auto: the broker's choice; cloud: type and cost
        emit_json(plans) if as_json else render.plans(plans)
        return
    _after_submit(ctx, gw.submit_many(specs), wait, as_json)


def parse_range(text: str) -> list[int]:
    """``0-9``, ``1,3,5``, ``0-99:2`` (as Slurm's --array), at most 100,000 indices."""
    out: list[int] = []
    try:
        for part in text.split(","):
            span, _, step = part.partition(":")
            low, _, high = span.partition("-")
            first, last = int(low), int(high or low)
            stride = int(step or 1)
            if first < 0 or last < first or stride < 1:
                raise ValueError
            out += range(first, last + 1, stride)
    except ValueError:
        raise click.BadParameter(f"{text!r}; write 0-9, 1,3,5 or 0-99:2",
                                 param_hint="--array") from None
    if len(out) > 100_000 or len(set(out)) != len(out):
        raise click.BadParameter(f"{text!r}: at most 100000 distinct indices", param_hint="--array")
    return out


@cli.command(context_settings={**CONTEXT, "ignore_unknown_options": False})
@click.argument("command", nargs=-1, required=True)
@click.option("--name", help="Job name (default: the program's name).")
@click.option("--target", help="local, slurm[:profile], aws[:profile] or auto.")
@click.option("--image", help="Container image pinned by digest (NAME@sha256:...).")
@click.option("--cpus", "cpus", type=int, help="CPUs per task.")
@click.option("--tasks", type=int, help="Tasks per node.")
@click.option("--nodes", type=int, help="Nodes.")
@click.option("--memory", help="Memory per node, e.g. 4G.")
@click.option("--gpus", type=int, help="GPUs per node.")
@click.option("--walltime", "-t", help="Time limit: HH:MM:SS or 90m.")
@click.option("--env", "-e", multiple=True, metavar="K=V", help="Environment variable (repeatable).")
@click.option("--label", "-l", multiple=True, metavar="K=V", help="Label (repeatable).")
@click.option("--input", "inputs", multiple=True, metavar="PATH", help="Input file or folder (repeatable).")
@click.option("--output", "outputs", multiple=True, metavar="GLOB", help="Output glob (repeatable).")
@click.option("--retries", type=int, help="Retries on failure.")
@click.option("--wait", is_flag=True, help="Wait until the job ends; exit status mirrors it.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def run(ctx: click.Context, command: tuple[str, ...], name: str | None, target: str | None,
        image: str | None, cpus: int | None, tasks: int | None, nodes: int | None,
        memory: str | None, gpus: int | None, walltime: str | None, env: tuple[str, ...],
        label: tuple[str, ...], inputs: tuple[str, ...], outputs: tuple[str, ...],
        retries: int | None, wait: bool, as_json: bool) -> None:
    """Run a command as a job: hpcgw run [OPTIONS] -- CMD ARGS..."""
    resources = {k: v for k, v in {"cpus_per_task": cpus, "tasks_per_node": tasks, "nodes": nodes,
                 "memory": memory, "gpus": gpus, "walltime": walltime}.items() if v is not None}
    fields: dict[str, Any] = {"resources": resources, "env": _pairs(env, "--env"),
                              "labels": _pairs(label, "--label"), "inputs": list(inputs),
                              "outputs": list(outputs)}
    if target:
        fields["target"] = target
    if image:
        fields["image"] = image
    if retries is not None:
        fields["retries"] = {"max": retries, "on": ["failed", "timeout", "lost", "node_fail", "preempted"]}
    job = _gateway(ctx).run(list(command), name=name, **fields)
    _after_submit(ctx, [job], wait, as_json)


from gateway.cli import commands as _commands  # noqa: E402

_commands.register(cli)


def main() -> None:
    cli(prog_name="hpcgw")


if __name__ == "__main__":
    main()
