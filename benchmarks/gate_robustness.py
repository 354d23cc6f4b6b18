"""Default training and gates over datasets and seeds: dense, then each gate variant from it.

    python benchmarks/gate_robustness.py --data raccoon=RACCOON half=RACCOON_HALF synthetic=synthetic \\
        [--seeds 0 1 2] [--variants settle= "paper=--schedule paper" "frames=--keep-on frames"] \\
        [--work runs/robustness] [--json OUT]

For each dataset and seed: ``dynprune train --data D --seed S`` (every other flag at its default),
then ``dynprune gate --weights <that dense>/best.pt --data D --keep 0.5 --seed S`` plus each
variant's flags, and ``dynprune prune`` with each ``--static`` variant's flags (stage: the name up
to its first underscore, e.g. ``effp``). A finished run is not run again (an interrupted one starts
over), so the command goes on after an interruption and collects runs made by hand in the same layout
(``WORK/<dataset>/seed<S>/dense``, ``WORK/<dataset>/seed<S>/<variant>``). Runs go one at a time:
two trainings side by side on a small CPU slow each other down several times.

Rows (``dataset``, ``seed``, ``stage``, ``recipe``, ``ap50``, ``ap50_95``, ``best_epoch``, ``flops``)
are read from each run's ``results.jsonl`` (the epoch best.pt's rule picks now) or its ``best.pt``;
a gate row also has ``best_ap50_at_target`` (the best AP50 among the epochs that could become
best.pt), ``below_best_by_rule`` (how far below that each best.pt rule's choice falls) and
``dense_ap50``.
The table gives the mean and spread per dataset and recipe, and the gap to dense.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from provenance import provenance


def _run(cmd: List[str], log: Path) -> None:
    print("  $", " ".join(shlex.quote(c) for c in cmd), flush=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{cmd[1]} failed (exit {done.returncode}); see {log}")


def _done(run: Path) -> bool:
    """Whether ``run`` holds a finished run (its last.pt at its last epoch), not an interrupted one."""
    from dynprune.checkpoint import safe_load

    if not (run / "last.pt").exists() or not (run / "best.pt").exists():
        return False
    last = safe_load(str(run / "last.pt"))
    return int(last["epoch"]) + 1 >= int(last["train_config"]["epochs"])


def _records(run: Path) -> List[dict]:
    path = run / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _row(run: Path, dataset: str, seed: int, stage: str, recipe: str) -> dict:
    """A run's row, its best epoch chosen by the rule training uses now among the epochs that could
    become best.pt (so that runs made under an earlier rule are read alike); from the checkpoint
    where the run kept no results.jsonl."""
    from dynprune.checkpoint import safe_load
    from dynprune.train.engine import fitness

    ckpt = safe_load(str(run / "best.pt"))
    metrics = ckpt["metrics"]
    flops = metrics.get("flops_mean", metrics.get("flops_fraction", 1.0))
    eligible = [r for r in _records(run) if r.get("eligible") and "ap50" in r]
    if eligible:
        best = max(eligible, key=fitness)  # the first of equals, as training keeps it
        metrics, epoch = best, int(best["epoch"])
        flops = best.get("flops_mean") or flops
    else:
        epoch = int(ckpt["epoch"]) + 1
    row = {"dataset": dataset, "seed": seed, "stage": stage, "recipe": recipe, "ap50": metrics["ap50"],
           "ap50_95": metrics["ap50_95"], "best_epoch": epoch, "flops": flops}
    if stage == "gate" and eligible:
        row["best_ap50_at_target"] = max(r["ap50"] for r in eligible)
        # how far below that each rule's choice falls (BENCHMARKS.md compares the rules): AP50-95
        # alone, and the mean of AP50 and AP50-95 that training uses (train/engine.py, fitness)
        rules = {"ap50_95": lambda r: r["ap50_95"], "mean": fitness}
        row["below_best_by_rule"] = {name: row["best_ap50_at_target"] - max(eligible, key=rule)["ap50"]
                                     for name, rule in rules.items()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", required=True, metavar="NAME=PATH")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["settle="], metavar="NAME=FLAGS",
                    help="gate variants: a name and the flags added to the default command")
    ap.add_argument("--static", nargs="*", default=[], metavar="NAME=FLAGS",
                    help="static pruning runs from the same dense model, e.g. \"effp=--method effp --flops 0.5\"")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--work", default="runs/robustness")
    ap.add_argument("--collect", action="store_true", help="run nothing: gather the finished runs under --work")
    ap.add_argument("--json")
    args = ap.parse_args()
    datasets = dict(item.split("=", 1) for item in args.data)
    variants = dict(item.split("=", 1) for item in args.variants)
    static = dict(item.split("=", 1) for item in args.static)
    exe = [sys.executable, "-m", "dynprune"]
    rows: List[dict] = []
    for name, path in datasets.items():
        for seed in args.seeds:
            base = Path(args.work) / name / f"seed{seed}"
            dense = base / "dense"
            if args.collect and not _done(dense):
                continue
            if not _done(dense):
                base.mkdir(parents=True, exist_ok=True)
                _run([*exe, "train", "--data", path, "--seed", str(seed), "--out", str(dense)], base / "dense.log")
            dense_row = _row(dense, name, seed, "dense", "dynprune train (defaults)")
            rows.append(dense_row)
            dense_w = str(dense / "best.pt")
            jobs = [(variant, ["gate", "--weights", dense_w, "--data", path, "--keep", str(args.keep)], flags, "gate",
                     f"dynprune gate --keep {args.keep:g} {flags}".strip()) for variant, flags in variants.items()]
            jobs += [(variant, ["prune", "--weights", dense_w, "--data", path], flags, variant.split("_")[0],
                      f"dynprune prune {flags}") for variant, flags in static.items()]
            for variant, command, flags, stage, recipe in jobs:
                run = base / variant
                if args.collect and not _done(run):
                    continue
                if not _done(run):
                    _run([*exe, *command, "--seed", str(seed), "--out", str(run), *shlex.split(flags)],
                         base / f"{variant}.log")
                row = _row(run, name, seed, stage, recipe)
                row["dense_ap50"] = dense_row["ap50"]
                rows.append(row)
    print("\n| data | recipe | seeds | AP50 mean (range) | AP50-95 | FLOPs | AP50 below dense "
          "| best.pt below its best |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["recipe"]), []).append(r)
    for (name, recipe), rs in groups.items():
        ap50 = [r["ap50"] for r in rs]
        gap = [r["dense_ap50"] - r["ap50"] for r in rs if "dense_ap50" in r]
        fall = [r["best_ap50_at_target"] - r["ap50"] for r in rs if "best_ap50_at_target" in r]
        print(f"| {name} | {recipe} | {len(rs)} | {statistics.mean(ap50):.3f} ({min(ap50):.3f}-{max(ap50):.3f}) | "
              f"{statistics.mean(r['ap50_95'] for r in rs):.3f} | {statistics.mean(r['flops'] for r in rs):.2f} | "
              f"{f'{100 * statistics.mean(gap):.1f} pts' if gap else ''} | "
              f"{f'{100 * max(fall):.1f} pts' if fall else ''} |")
    if args.json:
        out = {**provenance("python benchmarks/gate_robustness.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])),
               "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
