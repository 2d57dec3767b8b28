"""The ``charliecloud`` runtime: ``ch-run`` on an unpacked, verified image folder.

The environment starts clean (``--unset-env='*'``) and gets only the job's variables, set
one by one without ``$`` expansion; the image stays read-only; the work folder is bound at
the container's work folder (bind targets must exist in the image: the image builder makes
/work, /in, /out). ch-run has no resource limits: the batch system's cgroup applies.
"""

from __future__ import annotations

from gateway.errors import RuntimeConfigError
from gateway.runtimes.base import RunContext, env_prefix, wants_gpu
from gateway.spec import JobSpec


class CharliecloudRuntime:
    name = "charliecloud"

    def argv(self, spec: JobSpec, ctx: RunContext) -> list[str]:
        if not ctx.image_path:
            raise RuntimeConfigError("charliecloud needs the unpacked image folder (image_path)")
        argv = [*env_prefix(ctx.runtime_env), "ch-run", "--unset-env=*", "--env-no-expand",
                "--private-tmp", f"--bind={_bind(ctx.work_dir, ctx.container_workdir)}",
                f"--cd={ctx.container_workdir}"]
        for mount in ctx.mounts:
            argv.append(f"--bind={_bind(mount.source, mount.target)}")
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/tmp", **ctx.env}
        gpu = wants_gpu(spec, ctx)
        if gpu is not None:
            argv += [f"--bind={_bind(d, d)}" for d in gpu.devices]
            argv += [f"--bind={_bind(m.source, m.target)}" for m in gpu.mounts]
            env.update(gpu.env)
        argv += [f"--set-env={k}={v}" for k, v in sorted(env.items())]
        return [*argv, ctx.image_path, "--", *spec.argv]


def _bind(source: str, target: str) -> str:
    if ":" in source or ":" in target:
        raise RuntimeConfigError(f"ch-run cannot bind a path holding ':' ({source!r}); rename it")
    return f"{source}:{target}"
