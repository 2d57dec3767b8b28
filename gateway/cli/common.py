"""Helpers shared by the CLI's commands: the Gateway per invocation, error mapping to exit
codes, JSON output."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _gateway(ctx: click.Context) -> Any:
    from gateway.api import Gateway

    if ctx.obj is None:
        overrides = {"data_dir": ctx.find_root().params["data_dir"]} \
            if ctx.find_root().params.get("data_dir") else None
        ctx.obj = Gateway(overrides)
    return ctx.obj


def handled(fn: F) -> F:
    """Map the gateway's errors to a one-paragraph message and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from gateway.errors import GatewayError

        try:
            return fn(*args, **kwargs)
        except GatewayError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except TimeoutError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _exit_for(states: list[Any]) -> int:
    from gateway.states import State

    for record in states:
        if record.state == State.SUCCEEDED:
            continue
        if record.state == State.FAILED:
            return record.exit_code if record.exit_code and 0 < record.exit_code < 256 else 1
        return {State.TIMEOUT: 124, State.CANCELLED: 130}.get(record.state, 1)
    return 0


def _after_submit(ctx: click.Context, jobs: list[Any], wait: bool, as_json: bool) -> None:
    from gateway.cli import render

    gw = _gateway(ctx)
    if wait:
        jobs = gw.wait([j.id for j in jobs])
    if as_json:
        emit_json([j.refresh().record.to_dict() for j in jobs])
    else:
        for job in jobs:
            render.submitted(job.refresh().record, waited=wait)
    if wait:
        sys.exit(_exit_for([j.record for j in jobs]))


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=option)
        out[key] = value
    return out
