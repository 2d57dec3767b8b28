"""Skip-or-fail for tests that need a tool from the machine.

On a developer machine without the tool the test is skipped with the install hint; where
the environment variable ``CI`` is set it fails instead: CI installs every tool, so a
skip there would hide a broken setup (a missing package, a wrong PATH).
"""

from __future__ import annotations

import os
import shutil

import pytest


def require(present: bool, what: str) -> None:
    """Return if ``present``; otherwise skip (developer machine) or fail (CI) with ``what``."""
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must install it)")
    pytest.skip(what)


def require_tool(name: str, install: str) -> str:
    """The path of executable ``name``, or skip/fail naming the package that provides it."""
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed ({install})")
    assert path is not None
    return path
