"""Shared fixtures: an isolated gateway home per test, and a runner for the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which kernel paths this CPU ran (also under -q): on a CPU without AVX-512F
    (in CI too, since no setup step can add it) the AVX-512-only kernels (the float64
    softmax exp pass, float64 GELU's 16-piece path) cannot run; they are compiled for an
    AVX-512 target and their code checked (test_avx512_kernels_compile_to_512_bit_code).
    The softmax and layer norm row and block kernels and GELU run at the CPU's width."""
    if "kernels" not in sys.modules:
        return
    from kernels import _avx512

    width = f"row and block kernels and GELU at {_avx512.row_lanes(True) * 32} bits"
    terminalreporter.write_line(
        "kernels: AVX-512F " + (f"present: vector and portable paths tested ({width})"
                                if _avx512.AVAILABLE else
                                f"absent: portable paths and the {width} tested, the "
                                "AVX-512-only ones compiled, not run"))


def python_image_store() -> Path:
    """Where the Python reference image is cached between test sessions."""
    return Path(os.environ.get("HPCGW_TEST_IMAGE_CACHE")
                or Path.home() / ".cache" / "hpcgw" / "test-images")


_PREBUILD: list[subprocess.Popen[bytes]] = []  # the background build, while it is ours


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that wait for work started in the background when collection ends (the
    Python image's build below, the kernel tests' ``background`` checks) run last, so
    that work, at a lower priority, has the whole session to fill the CPU the other
    tests leave idle (they mostly wait on Slurm, or compile on one core) instead of
    starving them: on a loaded 2-core machine a starved test waits, polls and times out
    longer. Otherwise the order is pytest's (the sort is stable)."""
    items.sort(key=lambda item: item.path.name == "test_python_image.py"
               or item.get_closest_marker("background") is not None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start building the Python reference image in the background when its tests are
    selected (and not skipped for want of debootstrap, podman or skopeo) and it is not
    in the store yet: the build (about 5 min alone, most of it Numba compiling the
    kernels inside the image) then overlaps every other test, at nice 10 (its tests run
    last: ``pytest_collection_modifyitems``). The ``python_image`` fixture waits for it,
    then finds the image by its key; if the background build failed, the fixture builds
    again and shows that error."""
    if not any(item.path.name == "test_python_image.py" and not item.get_closest_marker("skip")
               for item in session.items):
        return
    from gateway.errors import NotFoundError
    from gateway.images.python_image import debian_mirror, kernels_source, python_image_ref
    from gateway.images.store import ImageStore

    root = python_image_store()
    try:
        ImageStore(root).resolve(python_image_ref(debian_mirror(), kernels_source()))
        return  # already built
    except NotFoundError:
        pass
    except Exception:  # no mirror configured and the like: the fixture reports it
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "prebuild.log", "wb") as log:
        _PREBUILD.append(subprocess.Popen(  # nice: it fills the CPU the tests leave idle
            ["nice", "-n", "10", sys.executable, "-m", "gateway.images.python_image", str(root)],
            cwd=REPO,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A background image build still running (its tests deselected or interrupted) is
    stopped with its children (debootstrap, the chroot's Python)."""
    import signal

    while _PREBUILD:
        proc = _PREBUILD.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


@pytest.fixture(scope="session")
def python_image() -> tuple[Path, str]:
    """The Python reference image, built (or found) in ``python_image_store()``: its
    store's root and its pinned reference."""
    from gateway.images.python_image import build_python_image
    from gateway.images.store import ImageStore

    while _PREBUILD:
        _PREBUILD.pop().wait(timeout=1800)
    root = python_image_store()
    info = build_python_image(ImageStore(root))
    return root, info.pinned


@dataclass
class CLI:
    env: dict[str, str]
    cwd: Path

    def __call__(self, *args: str, check: bool | None = None, timeout: float = 120,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "gateway.cli.main", *args], env=self.env,
                              cwd=self.cwd, capture_output=True, text=True, timeout=timeout,
                              input=input)
        if check and done.returncode != 0:
            raise AssertionError(f"hpcgw {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json", check=True).stdout)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    data = tmp_path / "hpcgw-home"
    data.mkdir()
    return data


@pytest.fixture
def gw_env(home: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCGW_")}
    env.update(HPCGW_DATA_DIR=str(home), HPCGW_CONFIG=str(tmp_path / "none.yaml"),
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    (tmp_path / "none.yaml").write_text("{}\n")
    return env


@pytest.fixture
def cli(gw_env: dict[str, str], tmp_path: Path) -> CLI:
    return CLI(gw_env, tmp_path)


@pytest.fixture
def gateway(home: Path, gw_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    from gateway.api import Gateway

    for key, value in gw_env.items():
        if key.startswith("HPCGW_"):
            monkeypatch.setenv(key, value)
    gw = Gateway()
    yield gw
    gw.close()


MISSING_TOOL = ("needs ", "not installed", "apt-get install", "pip install", "could not import")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (``CI`` set) a test skipped because a tool is missing FAILS: CI installs every
    tool, so a skip there would hide a broken setup. On a developer machine it stays a skip."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped:
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if any(marker in reason for marker in MISSING_TOOL):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI because a tool is missing: {reason}"
