"""Where a container job's image lives for one attempt: the RunContext fields and the
``image`` section of launch.json that the node checks before running (gateway side)."""

from __future__ import annotations

import getpass
import os
import re
from pathlib import Path
from typing import Any

from gateway.config import Config
from gateway.errors import RuntimeConfigError
from gateway.images.podman import default_runroot, podman_env
from gateway.images.store import split_ref
from gateway.images.unpack import unpacked_dir
from gateway.runtimes.base import GpuLayer, RunContext
from gateway.spec import JobSpec


def podman_name(image: str) -> str:
    """The local name podman knows a pinned image by: ``localhost/<repo path>``."""
    name, _ = split_ref(image)
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]  # drop a registry host: the image is local here
    repo = re.sub(r":[^/]*$", "", "/".join(parts)).lower()
    return f"localhost/{repo}"


def container_context(spec: JobSpec, runtime: str, config: Config, adir: Path,
                      env: dict[str, str], gpu: GpuLayer | None = None
                      ) -> tuple[RunContext, dict[str, Any]]:
    """RunContext for ``runtime`` and the launch.json ``image`` section, for a spec with an image."""
    if spec.image is None:
        raise RuntimeConfigError(f"runtime {runtime!r} needs an image")
    _, digest = split_ref(spec.image)
    if digest is None:
        raise RuntimeConfigError("the image must be pinned by digest")
    store = config.images_path
    work = str(adir / "work")
    inner = spec.workdir or "/work"
    section: dict[str, Any] = {"runtime": runtime, "digest": digest, "store": str(store)}
    if runtime == "podman":
        pdir = config.podman_path
        runroot = Path(config.images.podman_runroot) if config.images.podman_runroot \
            else default_runroot(pdir)
        renv = podman_env(pdir)
        name = podman_name(spec.image)
        section.update(ref=f"{name}@{digest}", load_as=f"{name}:sha256-{digest[7:27]}",
                       runtime_env=renv, podman_dir=str(pdir), runroot=str(runroot))
        ctx = RunContext(work_dir=work, attempt_dir=str(adir), env=env,
                         image_ref=section["ref"], container_workdir=inner, runtime_env=renv,
                         gpu=gpu, user=config.images.container_user or None,
                         cgroup_parent=config.images.cgroup_parent or None)
        return ctx, section
    rootfs = unpacked_dir(store / "unpacked", digest) / "rootfs"
    section["path"] = str(rootfs)
    renv = {"USER": os.environ.get("USER") or getpass.getuser()} \
        if runtime == "charliecloud" else {}
    ctx = RunContext(work_dir=work, attempt_dir=str(adir), env=env, image_path=str(rootfs),
                     container_workdir=inner, runtime_env=renv, gpu=gpu)
    return ctx, section
