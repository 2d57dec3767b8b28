"""hpcgw: a batch-job gateway between a workstation, Slurm/MPI clusters and the cloud.

Imports are lazy so that ``hpcgw --help`` and the node runner start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Gateway", "Job", "JobSpec", "State", "GatewayError", "SpecError", "load_spec",
           "load_config", "__version__"]

_WHERE = {"Gateway": "gateway.api", "Job": "gateway.api", "JobSpec": "gateway.spec",
          "load_spec": "gateway.spec", "State": "gateway.states", "GatewayError": "gateway.errors",
          "SpecError": "gateway.errors", "load_config": "gateway.config"}

if TYPE_CHECKING:
    from gateway.api import Gateway, Job
    from gateway.config import load_config
    from gateway.errors import GatewayError, SpecError
    from gateway.spec import JobSpec, load_spec
    from gateway.states import State


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")
