"""The ``apptainer`` runtime: ``apptainer exec`` on the unpacked image folder (a sandbox).

Not packaged on the development machines, so it is tested as generated argv only.
``--containall --cleanenv`` isolates the job from the host's home, /tmp and environment;
``--nv`` (from the node profile) brings the NVIDIA driver in when GPUs are asked.
"""

from __future__ import annotations

from gateway.errors import RuntimeConfigError
from gateway.runtimes.base import RunContext, env_prefix, wants_gpu
from gateway.spec import JobSpec


class ApptainerRuntime:
    name = "apptainer"

    def argv(self, spec: JobSpec, ctx: RunContext) -> list[str]:
        image = ctx.image_path
        if not image:
            raise RuntimeConfigError("apptainer needs the unpacked image folder (image_path)")
        argv = [*env_prefix(ctx.runtime_env), "apptainer", "exec", "--containall",
                "--cleanenv", "--no-home", "--no-mount=home,cwd",
                f"--bind={_bind(ctx.work_dir, ctx.container_workdir, False)}",
                f"--pwd={ctx.container_workdir}"]
        for mount in ctx.mounts:
            argv.append(f"--bind={_bind(mount.source, mount.target, mount.readonly)}")
        env = dict(ctx.env)
        gpu = wants_gpu(spec, ctx)
        if gpu is not None:
            argv += list(gpu.apptainer_flags)
            argv += [f"--bind={_bind(m.source, m.target, True)}" for m in gpu.mounts
                     if not gpu.apptainer_flags]
            env.update(gpu.env)
        argv += [f"--env={k}={v}" for k, v in sorted(env.items())]
        return [*argv, image, *spec.argv]


def _bind(source: str, target: str, readonly: bool) -> str:
    for path in (source, target):
        if ":" in path or "," in path:
            raise RuntimeConfigError(f"apptainer cannot bind a path holding ':' or ',' ({path!r}); "
                                     "rename the folder")
    return f"{source}:{target}:{'ro' if readonly else 'rw'}"
