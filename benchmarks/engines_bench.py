"""Every engine of a bundle through ``dynprune bench``, several times, into one JSON.

    python benchmarks/engines_bench.py BUNDLE --data D [--frames 40] [--runs 3] --note "..." --json OUT

Each run is its own ``dynprune bench`` process (the engines take turns frame by frame within it);
the JSON keeps each run's ``bench.json`` whole (rows, stages, per-frame latency and keep) under
``runs``, with the command, machine, commit and date. benchmarks/report.py turns it into a table
(FPS against static, and where each engine's frame time goes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--data", required=True)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--note", default="", help="what the bundle holds (how each engine was trained)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "dynprune", "bench", args.bundle, "--data", args.data,
                   "--frames", str(args.frames), "--out", out]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            print(f"run {i + 1}/{args.runs}\n{done.stdout.split('measured', 1)[-1].strip()}", flush=True)
            runs.append(json.loads((Path(out) / "bench.json").read_text()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        **provenance(f"dynprune bench BUNDLE --data DATA --frames {args.frames} ({args.runs} runs, one process "
                     "each; python benchmarks/engines_bench.py)"),
        "note": args.note, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
