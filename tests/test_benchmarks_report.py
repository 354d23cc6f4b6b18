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


def board_rows(engines_ms, sms_counts=(8, 0), confined=True):
    rows = []
    for sms in sms_counts:
        for engine, ms in engines_ms.items():
            rows.append({"sms": sms, "confined": confined or not sms, "imgsz": 640, "model": "nano", "batch": 1,
                         "engine": engine, "network_ms_p50": ms * (4 if sms else 1),
                         "keep_mean": 0.5 if engine in ("dynamic", "dynamic_default_tiles") else None,
                         **({"dense_form": "cudnn"} if engine == "dense" else {})})
    return rows


def test_the_board_tables_wait_for_their_json_then_need_a_place(report, tmp_path, monkeypatch):
    """A GPU claim not measured has no JSON and needs no place; once its JSON lands, the document must
    hold its table, which says whether the SM limit held."""
    results = tmp_path / "results"
    for path in report.RESULTS.rglob("*.json"):
        target = results / path.relative_to(report.RESULTS)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    monkeypatch.setattr(report, "RESULTS", results)
    document = report.DOCUMENT.read_text()
    assert report.build(document)[1] == []  # the board tables are pending
    head = {"command": "python benchmarks/board_emulation.py", "machine": "H100", "commit": "abc1234",
            "date": "2026-12-07"}
    (results / "h100" / "board-emulation.json").write_text(json.dumps({**head, "rows": board_rows(
        {"dense": 1.0, "static": 0.8, "dynamic": 0.5, "dynamic_keep1": 0.9}, confined=False)}))
    with pytest.raises(SystemExit, match="no place for table.*board-emulation"):
        report.build(document)
    text, _ = report.build(document + "\n<!-- table: board-emulation -->\n<!-- end table -->\n")
    table = text.split("<!-- table: board-emulation -->")[1]
    assert "| nano | 640 | 1 | 8 (NOT confined) | 4.000 | 3.200 | 2.000 | 0.50 | 2.00x | 1.60x | 3.600 |" in table
    assert "| nano | 640 | 1 | all | 1.000 | 0.800 | 0.500 | 0.50 | 2.00x | 1.60x | 0.900 |" in table
    assert table.index("| 8 (NOT") < table.index("| all |")  # fewest SMs first


def test_the_tuned_board_and_layer_tables_render(report, tmp_path, monkeypatch):
    results = tmp_path / "results"
    (results / "h100").mkdir(parents=True)
    monkeypatch.setattr(report, "RESULTS", results)
    head = {"command": "CMD", "machine": "H100", "commit": "abc1234", "date": "2026-12-07"}
    (results / "h100" / "board-emulation-tuned.json").write_text(json.dumps({**head, "rows": board_rows(
        {"dense": 1.0, "static": 0.8, "dynamic_default_tiles": 0.7, "dynamic": 0.5, "dynamic_keep1": 0.9})}))
    (results / "h100" / "layers-8sms.json").write_text(json.dumps({**head, "sm_limit": {"sms": 8}, "layers": [
        {"layer": "3x3 64->64 @80x80", "cudnn_ms": 0.010, "triton_dense_ms": 0.012, "triton_1.0_r8_ms": 0.013,
         "triton_1.0_r8_tuned_ms": 0.011, "triton_0.5_r8_ms": 0.008, "triton_0.5_r8_tuned_ms": 0.006},
        {"layer": "1x1 64->64 @80x80", "cudnn_ms": 0.005, "triton_dense_ms": 0.005, "triton_1.0_r8_ms": 0.005,
         "triton_0.5_r8_ms": 0.003}]}))
    _, header, rows = report.board_tuned()
    assert rows[0] == ("nano 640 b1", "8", "4.000 (cudnn)", "3.200", "2.800", "2.000", "2.00x", "1.60x", "3.600")
    _, header, rows = report.board_layers()
    assert "8 SMs" in header[0]
    assert rows == [("3x3 64->64 @80x80", "10.0", "12.0", "13.0", "1.30x", "11.0", "1.10x", "6.0")]


def test_the_whole_frame_table_sets_each_frame_against_its_network(report, tmp_path, monkeypatch):
    results = tmp_path / "results"
    (results / "h100").mkdir(parents=True)
    monkeypatch.setattr(report, "RESULTS", results)
    with pytest.raises(FileNotFoundError):
        report.whole_frame()
    for size, scale in ((640, 2.0), (320, 1.0)):
        rows = [{"engine": name, "p50_ms": frame * scale, "network_only_p50_ms": net * scale,
                 "end_to_end_over_network": frame / net, "host_path_p50_ms": 3.0 * scale}
                for name, frame, net in (("dense", 0.6, 0.5), ("dynamic", 0.5, 0.4))]
        (results / "h100" / f"whole-frame-{size}.json").write_text(json.dumps(
            {"command": f"python benchmarks/gpu_frame.py BUNDLE --source FRAMES --sizes {size}", "machine": "H100",
             "commit": "abc1234", "date": "2026-12-07", "imgsz": size, "rows": rows}))
    data, header, rows = report.whole_frame()
    assert data["command"].endswith("--sizes 320 640")
    assert [r[:2] for r in rows] == [(320, "dense"), (320, "dynamic"), (640, "dense"), (640, "dynamic")]
    assert rows[1] == (320, "dynamic", "0.500", "0.400", "1.25", "3.000", "1.20x of 1.25x (96%)")
