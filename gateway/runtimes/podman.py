"""The ``podman`` runtime (with runc): a read-only container from local storage, by digest.

``--pull=never`` so an absent image fails instead of reaching for a registry; the work
folder is bind-mounted read-write; host network and IPC for MPI; CPU and memory limits from
the spec; GPU devices and driver libraries from the node profile when GPUs are asked.
Private configuration comes from ``runtime_env`` (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF).
"""

from __future__ import annotations

from gateway.errors import RuntimeConfigError
from gateway.runtimes.base import RunContext, env_prefix, wants_gpu
from gateway.spec import JobSpec


class PodmanRuntime:
    name = "podman"

    def argv(self, spec: JobSpec, ctx: RunContext) -> list[str]:
        image = ctx.image_ref or spec.image
        if not image or "@sha256:" not in image:
            raise RuntimeConfigError("podman needs an image pinned by digest (NAME@sha256:...)")
        res = spec.resources
        argv = [*env_prefix(ctx.runtime_env), "podman", "run", "--rm", "--pull=never",
                "--read-only", "--network=host", "--ipc=host",
                f"--name=hpcgw-{_slug(ctx.env.get('HPCGW_JOB_ID', spec.name))}"
                f"-{ctx.env.get('HPCGW_ATTEMPT', '0')}",
                f"--cpus={res.cpus_per_task * res.tasks_per_node}"]
        if res.memory:
            argv.append(f"--memory={res.memory}b")
        if ctx.cgroup_parent:
            argv.append(f"--cgroup-parent={ctx.cgroup_parent}")
        if ctx.user:
            argv.append(f"--user={ctx.user}")
        argv += [f"--volume={_volume(ctx.work_dir, ctx.container_workdir, False)}",
                 f"--workdir={ctx.container_workdir}"]
        for mount in ctx.mounts:
            argv.append(f"--volume={_volume(mount.source, mount.target, mount.readonly)}")
        gpu = wants_gpu(spec, ctx)
        env = dict(ctx.env)
        if gpu is not None:
            argv += [f"--device={d}" for d in gpu.devices]
            argv += [f"--volume={_volume(m.source, m.target, m.readonly)}" for m in gpu.mounts]
            env.update(gpu.env)
        argv += [f"--env={k}={v}" for k, v in sorted(env.items())]
        return [*argv, "--", image, *spec.argv]


def _volume(source: str, target: str, readonly: bool) -> str:
    for path in (source, target):
        if ":" in path or "," in path:
            raise RuntimeConfigError(f"podman cannot bind a path holding ':' or ',' ({path!r}); "
                                     "rename the folder")
    return f"{source}:{target}:{'ro' if readonly else 'rw'}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "-" for c in text)[:40]
