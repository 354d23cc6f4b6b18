"""``dynprune demo``: the whole flow on built-in synthetic data, on the CPU, with no downloads.

synthetic data -> dense nano detector -> ManiDP gates -> dense vs dynamic on the CPU, with a
results table at the end and a report folder (JSON, plots) under ``--out``.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch

from dynprune.data.synthetic import ensure_synthetic


@dataclass
class DemoPlan:
    """Sizes of each stage; the full plan fits 2 CPU cores in the time the README states."""

    n_train: int = 480
    imgsz: int = 256
    dense_epochs: int = 12
    gate_epochs: int = 5
    keep: float = 0.5
    batch: int = 16
    latency_frames: int = 40


QUICK = DemoPlan(n_train=48, imgsz=128, dense_epochs=2, gate_epochs=1, batch=8, latency_frames=5)


def cpu_speed(dense: torch.nn.Module, gated: torch.nn.Module, records, imgsz: int, frames: int) -> Dict[str, float]:
    """Batch-1 latency of the dense model (BN folded) and the compact dynamic model on real frames."""
    from dynprune.compact import CompactDetector, dense_inference_model
    from dynprune.data.dataset import DetectionDataset
    from dynprune.timing import measure_latency

    ds = DetectionDataset(records[:frames], imgsz)
    images = [ds[i][0][None] for i in range(len(ds))]
    dense_fast = dense_inference_model(dense)
    compact = CompactDetector(gated)
    out = {}
    for name, model in (("dense", dense_fast), ("dynamic", compact)):
        frames = itertools.cycle(images)
        with torch.no_grad():
            lat = measure_latency(lambda m=model, f=frames: m(next(f)), warmup=3, iters=3 * len(images))
        out[f"{name}_ms"] = lat["p50_ms"]
    out["speedup"] = out["dense_ms"] / out["dynamic_ms"]
    return out


def run_demo(out: str = "runs/demo", quick: bool = False) -> int:
    from dynprune.checkpoint import model_from_checkpoint
    from dynprune.data import load_dataset
    from dynprune.train.dense import train_dense
    from dynprune.train.engine import TrainConfig
    from dynprune.train.gate import train_gates
    from dynprune.validate import run_validation

    plan = QUICK if quick else DemoPlan()
    root = Path(out)
    t_start = time.time()
    timings: Dict[str, float] = {}
    rows: List[Dict[str, Any]] = []

    def stage(name: str) -> None:
        print(f"\n== {name} ({time.time() - t_start:.0f}s elapsed)")

    stage("1/4 synthetic one-class dataset")
    data_yaml = ensure_synthetic(str(root / "data"), n_train=plan.n_train, n_val=max(plan.n_train // 4, 16))
    spec = load_dataset(data_yaml)
    print(f"{len(spec.train)} train / {len(spec.val)} val images of '{spec.names[0]}' in {Path(data_yaml).parent}")

    stage("2/4 dense nano detector")
    t = time.time()
    dense_cfg = TrainConfig(epochs=plan.dense_epochs, batch=plan.batch, imgsz=plan.imgsz, lr=4e-3, workers=1,
                            out=str(root / "dense"), val_every=max(1, plan.dense_epochs // 3))
    train_dense(spec, dense_cfg, size="nano")
    timings["dense_train_s"] = time.time() - t
    dense_w = str(root / "dense" / "best.pt")

    stage("3/4 ManiDP gates")
    t = time.time()
    gate_cfg = TrainConfig(epochs=plan.gate_epochs, batch=plan.batch, imgsz=plan.imgsz, lr=1e-3, workers=1,
                           out=str(root / "gate"), warmup_epochs=0.5, mosaic=0.0)
    train_gates(dense_w, spec, gate_cfg, keep=plan.keep, method="manidp")
    timings["gate_train_s"] = time.time() - t
    gate_w = str(root / "gate" / "best.pt")

    stage("4/4 evaluation: accuracy, per-frame FLOPs, CPU latency")
    dense, _ = model_from_checkpoint(dense_w)
    gated, _ = model_from_checkpoint(gate_w)
    m_dense = run_validation(dense, spec.val, spec.names, plan.imgsz)
    m_gated = run_validation(gated, spec.val, spec.names, plan.imgsz, keep_predictions=True)
    from dynprune.report import write_gate_report

    plots = write_gate_report(m_gated, spec.val, str(root / "report"))
    speed = cpu_speed(dense, gated, spec.val, plan.imgsz, plan.latency_frames)
    rows.append({"engine": "dense", "ap50": m_dense["ap50"], "ap50_95": m_dense["ap50_95"], "flops": 1.0,
                 "flops_p95": 1.0, "cpu_ms": speed["dense_ms"]})
    rows.append({"engine": f"dynamic (ManiDP, keep {plan.keep})", "ap50": m_gated["ap50"],
                 "ap50_95": m_gated["ap50_95"], "flops": m_gated["flops_mean"], "flops_p95": m_gated["flops_p95"],
                 "cpu_ms": speed["dynamic_ms"]})
    timings["total_s"] = time.time() - t_start

    print("\nResults on the synthetic validation set "
          f"({len(spec.val)} images, {plan.imgsz} px, batch 1, {torch.get_num_threads()} CPU threads)")
    print(f"{'engine':<28}{'AP50':>7}{'AP50-95':>9}{'FLOPs':>7}{'p95':>7}{'CPU ms':>8}")
    for r in rows:
        print(f"{r['engine']:<28}{r['ap50']:>7.3f}{r['ap50_95']:>9.3f}{r['flops']:>7.2f}{r['flops_p95']:>7.2f}"
              f"{r['cpu_ms']:>8.1f}")
    print(f"dynamic speed-up on this CPU: {speed['speedup']:.2f}x; total demo time {timings['total_s']:.0f}s")
    summary = {"plan": plan.__dict__, "rows": rows, "speed": speed, "timings": timings, "plots": plots,
               "weights": {"dense": dense_w, "gated": gate_w}}
    (root / "report").mkdir(parents=True, exist_ok=True)
    (root / "report" / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"report: {root / 'report'} (summary.json, {Path(plots['histogram']).name}, {Path(plots['frames']).name})")
    return 0
