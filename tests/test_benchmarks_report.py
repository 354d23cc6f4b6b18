"""BENCHMARKS.md's tables are built from benchmarks/results/: they must agree, and a change shows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("benchmarks_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_table_in_benchmarks_md_matches_its_json(report, capsys):
    assert report.main(["--check"]) == 0


def test_a_changed_figure_makes_its_table_stale(report, tmp_path, monkeypatch):
    results = tmp_path / "results"
    for path in report.RESULTS.rglob("*.json"):
        target = results / path.relative_to(report.RESULTS)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    sizes = results / "cpu-x86-2core" / "model-sizes.json"
    data = json.loads(sizes.read_text())
    data["rows"][0]["gflops"] += 1.0
    sizes.write_text(json.dumps(data))
    monkeypatch.setattr(report, "RESULTS", results)
    text, changed = report.build(report.DOCUMENT.read_text())
    assert changed == ["model-sizes"]
    assert f"{data['rows'][0]['gflops']:.3f}" in text


def test_a_table_without_a_place_in_the_document_is_an_error(report):
    with pytest.raises(SystemExit, match="no place for table"):
        report.build("<!-- table: demo -->\n<!-- end table -->\n")


def test_results_hold_only_json_in_machine_folders(report):
    files = [p for p in report.RESULTS.rglob("*") if p.is_file()]
    assert len(files) < 40
    for p in files:
        assert p.suffix == ".json", p
        assert p.parent.parent == report.RESULTS, p


def test_benchmarks_md_stays_short():
    """One current figure per claim: the document stays under 300 lines (history lives in git)."""
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[1] / "BENCHMARKS.md").read_text().splitlines()
    assert len(lines) < 300, f"BENCHMARKS.md has {len(lines)} lines; say less, or drop a superseded table"
