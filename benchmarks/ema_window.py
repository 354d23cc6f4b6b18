"""How long the dense detector's weight average should be: raw weights against EMAs of several
windows, all from the same training run.

    python benchmarks/ema_window.py --data DATASET [--seeds 0 1 2] [--epochs 60] [--imgsz 320]
        [--fractions 0.02 0.05 0.1] [--json out.json]

One ``dynprune train`` run per seed (the default recipe, validated only at the end) carries, beside
the EMA it saves, one extra EMA per window fraction ``f`` (window = f x the run's steps, see
``train/ema.py``) and the EMA the trainer used before the window followed the run (decay 0.9998
ramped with tau = steps / 15). At the end each is validated on the val split. The table gives AP50
and AP50-95 per seed and the mean and spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch
from provenance import provenance

from dynprune.config import config_for
from dynprune.data import load_dataset
from dynprune.model import build_detector
from dynprune.train.ema import ModelEMA
from dynprune.train.engine import TrainConfig, Trainer
from dynprune.validate import run_validation


class ManyEMATrainer(Trainer):
    """The dense trainer, keeping extra averages of the same weights."""

    def __init__(self, *a, fractions=(), **kw) -> None:
        super().__init__(*a, **kw)
        self.extra_emas: Dict[str, ModelEMA] = {
            f"ema f={f:g}": ModelEMA.for_run(self.model, self.total_iters, fraction=f) for f in fractions}
        self.extra_emas["ema before (0.9998, tau=steps/15)"] = ModelEMA(
            self.model, decay=0.9998, tau=max(20.0, self.total_iters / 15))

    def after_step(self, step: int) -> None:
        for ema in self.extra_emas.values():
            ema.update(self.model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--classes", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--size", default="nano")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    ap.add_argument("--out", default="runs/ema_window")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    spec = load_dataset(args.data, classes=args.classes)
    rows: List[Dict] = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        cfg = TrainConfig(epochs=args.epochs, imgsz=args.imgsz, seed=seed, val_every=args.epochs,
                          out=f"{args.out}/seed{seed}")
        model = build_detector(config_for(args.size, num_classes=len(spec.names)))
        t = ManyEMATrainer(model, spec, cfg, log=lambda *_: None, fractions=args.fractions)
        t0 = time.time()
        t.fit()
        minutes = (time.time() - t0) / 60
        variants = {"raw weights": t.model, f"ema saved (default, f={t.ema.fraction:g})": t.ema.ema,
                    **{k: e.ema for k, e in t.extra_emas.items()}}
        for name, m in variants.items():
            met = run_validation(m, spec.val, spec.names, args.imgsz, batch=16, device=t.device)
            rows.append({"data": args.data, "seed": seed, "weights": name, "ap50": met["ap50"],
                         "ap50_95": met["ap50_95"], "steps": t.total_iters, "train_minutes": minutes})
            print(f"seed {seed}  {name:<36} AP50 {met['ap50']:.4f}  AP50-95 {met['ap50_95']:.4f}", flush=True)
    print(f"\n{args.data}: {len(spec.train)} train images, {args.epochs} epochs, {rows[0]['steps']} steps")
    print(f"{'weights':<38}{'AP50 mean':>10}{'range':>16}{'AP50-95 mean':>14}{'range':>16}")
    for name in dict.fromkeys(r["weights"] for r in rows):
        a = [r["ap50"] for r in rows if r["weights"] == name]
        b = [r["ap50_95"] for r in rows if r["weights"] == name]
        print(f"{name:<38}{statistics.mean(a):>10.4f}{f'{min(a):.3f}-{max(a):.3f}':>16}"
              f"{statistics.mean(b):>14.4f}{f'{min(b):.3f}-{max(b):.3f}':>16}")
    if args.json:
        record = {**provenance(), "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
