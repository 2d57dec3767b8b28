"""The kernel benchmark's command line: ``--only`` and ``--repeat`` re-measure some rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tests" / "benchmarks" / "bench_kernels.py"


def _bench(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), "--quick", *args], cwd=tmp,
                          capture_output=True, text=True, timeout=600)


def test_only_runs_the_matching_rows_each_against_a_triad(tmp_path):
    out = tmp_path / "res.json"
    r = _bench("--only", "quantize", "--repeat", "2", "--json", str(out), tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    names = [row["kernel"] for row in res["kernels"]]
    assert names == ["quantize_int8", "dequantize_int8"]
    for row in res["kernels"]:
        assert row["gb_s"] > 0 and row["triad_gb_s"] > 0
        assert row["pct_triad"] == 100 * row["gb_s"] / row["triad_gb_s"]
        # the read-only stream raced in the same rounds, and the row against it
        assert row["read_gb_s"] > 0
        assert row["pct_read"] == 100 * row["gb_s"] / row["read_gb_s"]
    assert res["ceilings"] == []  # no compute ceilings, k-means, training or compile times
    assert "kmeans" not in res and "compile" not in res
    assert "| quantize_int8 |" in r.stdout and "Compute ceilings" not in r.stdout
    assert "| % triad | read GB/s | % read |" in r.stdout


def test_only_without_a_match_and_a_bad_repeat_are_refused(tmp_path):
    out = tmp_path / "res.json"
    r = _bench("--only", "no such kernel", "--json", str(out), tmp=tmp_path)
    assert r.returncode == 2
    assert "--only 'no such kernel' matches no kernel row" in r.stderr
    assert not out.exists()
    r = _bench("--repeat", "0", tmp=tmp_path)
    assert r.returncode == 2 and "--repeat must be at least 1" in r.stderr


def test_a_new_kernels_section_keeps_the_notes_on_earlier_runs(tmp_path):
    # --out replaces the '## Kernels' section with the new tables; what the section holds
    # under '### Earlier runs' (notes on past runs) stays, after them, and so does every
    # other section
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench_kernels
    finally:
        sys.path.remove(str(BENCH.parent))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Kernels\n\nold tables\n\nthis run: old\n\n"
                   "### Earlier runs\n\n**A past run.** notes\n\n## Slurm\n\nslurm text\n")
    bench_kernels.write_section(doc, "## Kernels\n\nnew tables\n")
    assert doc.read_text() == ("# Benchmarks\n\n## Kernels\n\nnew tables\n\n### Earlier runs\n\n"
                               "**A past run.** notes\n\n## Slurm\n\nslurm text\n")
    doc.write_text("# Benchmarks\n\n## Kernels\n\nold tables\n\n## Slurm\n\nslurm text\n")
    bench_kernels.write_section(doc, "## Kernels\n\nnew tables\n")
    assert doc.read_text() == "# Benchmarks\n\n## Kernels\n\nnew tables\n\n## Slurm\n\nslurm text\n"
