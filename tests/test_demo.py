"""The README's main job, end to end on its short plan: every stage runs and writes its report."""

import json


def test_quick_demo_runs_every_stage(tmp_path, capsys):
    from dynprune.demo import run_demo

    assert run_demo(str(tmp_path / "demo"), quick=True) == 0
    report = tmp_path / "demo" / "report"
    summary = json.loads((report / "summary.json").read_text())
    rows = {r["engine"]: r for r in summary["bench"]["rows"]}
    assert set(rows) == {"dense", "static", "dynamic", "hybrid"}
    assert all(r["fps"] > 0 and r["p50_ms"] > 0 for r in rows.values())
    assert 0 < rows["dynamic"]["keep_mean"] <= 1 and 0 < rows["hybrid"]["keep_mean"] <= 1
    # the hybrid gates run on the EFFP model's widths: fewer FLOPs per frame than the static engine's
    assert rows["hybrid"]["gflops"] < rows["static"]["gflops"]
    assert summary["serve"]["frames"] == 30 and sum(summary["serve"]["frames_by_engine"].values()) == 30
    for name in ("bench.json", "bench.csv", "latency_vs_keep.png", "flops_hist.png", "frames_by_cost.png",
                 "serve.jsonl", "serve.mp4"):
        assert (report / name).stat().st_size > 0, name
    out = capsys.readouterr().out
    assert "== 8/8 serve" in out and "total demo time" in out
