"""Shared fixtures for the kernel tests: dtypes, tolerances, running the apps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gateway.testing.require import require_tool

REPO = Path(__file__).resolve().parents[2]

# Agreement with the float64 NumPy references (see docs/kernels.md, "Tolerances").
TOL = {
    np.dtype(np.float32): {"rtol": 2e-5, "atol": 2e-6},
    np.dtype(np.float64): {"rtol": 1e-11, "atol": 1e-12},
}


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def tol(dtype):
    return TOL[dtype]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def app_env(**extra: str) -> dict[str, str]:
    """Environment for running ``python -m kernels.apps.*`` from the repo checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    env.update(extra)
    return env


def _run_app(name: str, *args: str, ranks: int = 1, ok: bool = True,
             timeout: float = 240) -> subprocess.CompletedProcess:
    """Run an app with 1 process, or ``ranks`` processes under mpirun; fail with its output."""
    argv = [sys.executable, "-m", f"kernels.apps.{name}", *args]
    if ranks > 1:
        mpirun = require_tool("mpirun", "apt-get install openmpi-bin libopenmpi-dev")
        argv = [mpirun, "-n", str(ranks), "--oversubscribe", *argv]
    proc = subprocess.run(argv, cwd=REPO, env=app_env(), capture_output=True, text=True,
                          check=False, timeout=timeout)
    if ok and proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def run_app():
    """``run_app(name, *args, ranks=1, ok=True)`` -> CompletedProcess (fixture, so test
    modules need not import conftest)."""
    return _run_app


def _run_python(code: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=app_env(**env),
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def run_python():
    """``run_python(code, **env)`` -> stdout of a fresh interpreter on this checkout."""
    return _run_python
