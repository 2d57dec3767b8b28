"""Shared fixtures for the kernel tests: dtypes, tolerances, running the apps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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


def _run_python(code: str, **env: str | None) -> str:
    full = app_env(**{k: v for k, v in env.items() if v is not None})
    for name in (k for k, v in env.items() if v is None):  # None: unset it
        full.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def run_python():
    """``run_python(code, **env)`` -> stdout of a fresh interpreter on this checkout (an
    ``env`` value of None removes that variable)."""
    return _run_python


# -- subprocess checks started in the background ------------------------------------------
# A few tests compile the kernels in a fresh interpreter, for another CPU target or into
# an empty cache folder: up to a minute of single-core Numba work each, which needs no
# result of the session. Marked ``@pytest.mark.background(commands=...)``, where
# ``commands(folder)`` gives the interpreter arguments and extra environment of each
# subprocess, they start as soon as collection ends, one after another on one thread,
# at a lower priority (nice 10), and so overlap the integration tests that run first and
# mostly wait, without starving them (tests/conftest.py runs these tests last). The test's
# ``background`` fixture then waits for them and hands over their results. A test whose
# checks were not started (run through another path) runs them itself. Each may take
# ``_CHECK_TIMEOUT`` s: at nice 10 a check gets little CPU while the integration tests
# run (the 256-bit one, 5 min alone, hit 900 s in a CI run once the float64 GELU forward
# compiled a staged loop too).
_CHECK_TIMEOUT = 1200

Commands = Callable[[Path], list[tuple[list[str], dict[str, str]]]]
_STARTED: dict[str, tuple[Path, Future[list[subprocess.CompletedProcess[str]]]]] = {}
_RUNNING: list[subprocess.Popen[str]] = []
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpcgw-background")


def _commands(item: pytest.Item) -> Commands | None:
    marker = item.get_closest_marker("background")
    return marker.kwargs["commands"] if marker is not None else None


def _run_checks(commands: list[tuple[list[str], dict[str, str]]]
                ) -> list[subprocess.CompletedProcess[str]]:
    done = []
    for args, env in commands:
        argv = [sys.executable, *args]
        with subprocess.Popen(["nice", "-n", "10", *argv], cwd=REPO, env=app_env(**env),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            _RUNNING.append(proc)
            try:
                out, err = proc.communicate(timeout=_CHECK_TIMEOUT)
            finally:
                _RUNNING.remove(proc)
        done.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    return done


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        commands = _commands(item)
        skipped = item.get_closest_marker("skip") is not None or any(
            m.args and m.args[0] is True for m in item.iter_markers("skipif"))
        if commands is not None and not skipped:
            folder = Path(tempfile.mkdtemp(prefix="hpcgw-background-"))
            _STARTED[item.nodeid] = (folder, _POOL.submit(_run_checks, commands(folder)))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Checks not waited for (their tests deselected by -x, interrupted) are stopped."""
    for _, future in _STARTED.values():
        future.cancel()
    for proc in list(_RUNNING):
        proc.kill()
    _POOL.shutdown(wait=True)
    for folder, _ in _STARTED.values():
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def background(request: pytest.FixtureRequest, tmp_path: Path
               ) -> tuple[Path, list[subprocess.CompletedProcess[str]]]:
    """(folder, results) of this test's background subprocesses, in the order given."""
    started = _STARTED.pop(request.node.nodeid, None)
    if started is None:
        commands = _commands(request.node)
        assert commands is not None, "the background fixture needs @pytest.mark.background"
        return tmp_path, _run_checks(commands(tmp_path))
    folder, future = started
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    return folder, future.result()


@pytest.fixture
def gemm_split():
    """``kernels.gemm`` splits products over Numba's threads where NumPy's BLAS is the
    OpenBLAS NumPy bundles; there its entry points must be found (a failure, not a skip).
    Elsewhere (a NumPy built against MKL or a system BLAS: a property of the install)
    the library never splits, which is checked before the test is skipped."""
    from threadpoolctl import threadpool_info

    from kernels import gemm

    bundled = any(i.get("internal_api") == "openblas" and "numpy" in (i.get("filepath") or "")
                  for i in threadpool_info())
    if not bundled:
        assert not gemm.split_available()
        pytest.skip("NumPy's BLAS here is not its bundled OpenBLAS: matmul never splits")
    assert gemm.split_available(), "NumPy's bundled OpenBLAS lacks cblas_?gemm64_"


def _require_vec_gelu() -> None:
    """The GELU vector kernels run where numba targets AVX2 and FMA (float32: 16 lanes
    with AVX-512, 8 without; float64: 8 lanes and 16 pieces in registers with AVX-512, 4
    lanes and 128 pieces from memory without)."""
    from kernels import _simd, activations, nn

    if not _simd._host_has_avx2_fma():
        # a CPU property no set-up can add; skip only where the library itself never
        # takes these paths, so nothing it runs goes untested
        assert not (activations.VEC_F32 or activations.VEC_F64 or nn.VEC_F64)
        pytest.skip("no AVX2/FMA target: only the portable GELU runs here")


@pytest.fixture
def vec_gelu() -> None:
    """For tests of the GELU vector kernels (``_require_vec_gelu``)."""
    _require_vec_gelu()


@pytest.fixture(params=["vector", "vector-nt", "portable"])
def gelu_path(request, monkeypatch):
    """Run a GELU test through each implementation: the vector kernels at the CPU's
    width ("vector-nt": with non-temporal stores however small the output) and the
    portable loops (``kernels.nn`` and ``kernels.fused`` alike)."""
    from kernels import _avx512, _simd, activations, nn

    vec = request.param != "portable"
    if vec:
        _require_vec_gelu()
    monkeypatch.setattr(activations, "VEC_F64", vec)
    monkeypatch.setattr(activations, "VEC_F32", vec)
    monkeypatch.setattr(nn, "VEC_F64", vec and _avx512.AVAILABLE)
    if request.param == "vector-nt":
        monkeypatch.setattr(_simd, "NT_MIN_BYTES", 0)
    return request.param
