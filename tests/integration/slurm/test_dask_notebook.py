"""docs/dask-example.ipynb, executed (nbclient) against the real local Slurm cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from slurm_it import REPO

from gateway.testing.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.slurm]
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("numba")

NOTEBOOK = REPO / "docs" / "dask-example.ipynb"


def test_example_notebook_runs_on_slurm(slurm_cluster: SlurmCluster, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    profile = {"env": {**slurm_cluster.env, "PYTHONPATH": str(REPO)}, "max_walltime": "1d"}
    config = tmp_path / "hpcgw.yaml"
    config.write_text(json.dumps({"backends": {"slurm": {"profiles": {"test": profile}}}}))
    monkeypatch.setenv("HPCGW_CONFIG", str(config))
    monkeypatch.setenv("HPCGW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HPCGW_EXAMPLE_TARGET", "slurm:test")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "iterations, inertia" in text
    assert "unfinished worker jobs: []" in text
