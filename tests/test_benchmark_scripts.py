"""The benchmark scripts start: each answers --help (its imports and arguments hold), and the board
table's script runs its loops on the CPU. What they measure needs the machine they are run on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "provenance.py")


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_script_answers_help(script):
    done = run(f"benchmarks/{script}", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_the_board_table_runs_its_loops_on_the_cpu(tmp_path):
    out = tmp_path / "board.json"
    done = run("benchmarks/board_emulation.py", "--device", "cpu", "--sms", "0", "--sizes", "64", "--models", "nano",
               "--batches", "1", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"command", "machine", "commit", "date"} <= set(result)
    engines = {r["engine"] for r in result["rows"]}
    assert engines == {"dense", "static", "dynamic", "dynamic_keep1"}
    for row in result["rows"]:
        assert row["network_ms_p50"] > 0 and row["confined"] is True and row["imgsz"] == 64
        assert (row["keep_mean"] is not None) == (row["engine"] == "dynamic")
