"""`hpcgw demo`: the README's first command. Runs the reference training workload as a job
on the embedded default (local backend, SQLite store), in the pinned Python reference image
when podman is available (built once, then reused), on the host otherwise."""

from __future__ import annotations

import json
import shutil
import sys
from typing import Any

import click

from gateway.cli.common import CONTEXT, _exit_for, _gateway, handled


def demo_spec(image: str | None, epochs: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "train-demo",
        "command": ["python3", "-m", "kernels.apps.train", "--epochs", str(epochs), "--seed", "0",
                    "--checkpoint-dir", "checkpoints", "--metrics", "metrics.json"],
        "outputs": ["metrics.json"],
        "resources": {"cpus_per_task": 1, "memory": "1G", "walltime": "15m"},
        "labels": {"example": "demo"},
    }
    if image:
        spec["image"] = image
    return spec


def _reference_image(gw: Any) -> str:
    from gateway.images.python_image import build_python_image
    from gateway.images.store import ImageStore

    click.echo("hpcgw demo: the Python reference image (debootstrap + NumPy + Numba + kernels, "
               "built once, a few minutes; then reused)", err=True)
    return str(build_python_image(ImageStore(gw.config.images_path)).pinned)


@click.command(context_settings=CONTEXT)
@click.option("--host", "on_host", is_flag=True, help="Run on the host runtime, without an image.")
@click.option("--epochs", type=int, default=3, show_default=True)
@click.pass_context
@handled
def demo(ctx: click.Context, on_host: bool, epochs: int) -> None:
    """Train the reference MLP as a job, show its metrics and what ran (provenance)."""
    gw = _gateway(ctx)
    image = None
    if not on_host and shutil.which("podman") and shutil.which("debootstrap"):
        image = _reference_image(gw)
    elif not on_host:
        click.echo("hpcgw demo: podman or debootstrap missing; running on the host", err=True)
    job = gw.submit(demo_spec(image, epochs))
    click.echo(f"hpcgw demo: job {job.id} submitted ({'image ' + image if image else 'host runtime'})",
               err=True)
    record = gw.wait([job.id])[0].record
    sys.stdout.write(gw.logs(job.id))
    metrics = [p for p in gw.outputs(job.id) if p.name == "metrics.json"]
    summary = {"job": job.id, "state": record.state.value, "exit_code": record.exit_code,
               "reason": record.reason,
               "image_digest": record.provenance.get("image_digest"),
               "spec_digest": record.spec_digest, "runtime": record.provenance.get("runtime"),
               "metrics": json.loads(metrics[0].read_text()) if metrics else None}
    click.echo(json.dumps(summary, indent=2, default=str))
    sys.exit(_exit_for([record]))
