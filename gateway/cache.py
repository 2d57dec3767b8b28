"""Result cache keys: what determines a job's result, and nothing else.

Two jobs with the same image digest, command, environment, working folder, MPI layout,
output patterns and input *content* hashes produce the same result, so the second can reuse
the first's outputs. Names, labels, targets, retry policies, walltime and memory do not
enter the key; file times and session ids never do. Jobs with inputs whose content is not
known (``s3://`` URIs) get no key and always run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from gateway.spec import JobSpec


def result_key(spec: JobSpec, input_hashes: Mapping[str, str]) -> str | None:
    if any(i.is_remote and i.name not in input_hashes for i in spec.inputs):
        return None
    payload: dict[str, Any] = {
        "image": spec.image or "host", "runtime": spec.effective_runtime,
        "command": spec.command if isinstance(spec.command, str) else list(spec.command),
        "env": spec.env, "workdir": spec.workdir, "mpi": spec.mpi,
        "ranks": [spec.resources.nodes, spec.resources.tasks_per_node, spec.resources.cpus_per_task],
        "gpus": spec.resources.gpus.model_dump(), "outputs": list(spec.outputs),
        "inputs": dict(sorted(input_hashes.items())),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
