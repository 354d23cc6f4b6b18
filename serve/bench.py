"""``dynprune bench``: dense, static, dynamic and hybrid engines on the same frames, side by side.

The engines take turns frame by frame (see :func:`measure_in_turns`), so that none is measured
on a colder machine than another. For each engine: FPS, p50/p95 latency (pre-process to
post-process), mean and p95 keep ratio, GFLOPs per frame, and AP when the frames come from a
labelled dataset. Writes ``bench.json``, ``bench.csv`` and ``latency_vs_keep.png`` (per-frame
latency against keep ratio, with each gated engine's break-even point against static marked).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from dynprune.runtime import ThreadGovernor
from dynprune.serve.bundle import GATED_ENGINES, load_bundle
from dynprune.serve.engines import load_engines, pick_device
from dynprune.sm_limit import checked_limit

COLUMNS = ["engine", "fps", "p50_ms", "p95_ms", "keep_mean", "keep_p95", "gflops", "ap50", "ap50_95"]


def load_frames(source: Optional[str], data: Optional[str], frames: int):
    """``(images, records or None, names)``: a labelled dataset's val split, or frames of a source."""
    if data:
        from dynprune.data import load_dataset
        from dynprune.data.transforms import read_image

        spec = load_dataset(data)
        records = spec.val[:frames] if frames else spec.val
        return [read_image(r.path) for r in records], records, spec.names
    from dynprune.serve.sources import iterate, open_source

    src = open_source(source)
    try:
        images = [f.image for f in iterate(src, frames or None)]
    finally:
        src.close()
    if not images:
        raise ValueError(f"{source}: gave no frames")
    return images, None, None


def break_even(keep: np.ndarray, ms: np.ndarray, static_ms: float) -> Optional[float]:
    """Keep ratio where the dynamic engine's fitted latency equals the static engine's median."""
    if len(keep) < 3 or np.ptp(keep) < 1e-3:
        return None
    slope, intercept = np.polyfit(keep, ms, 1)
    if slope <= 0:
        return None
    return float((static_ms - intercept) / slope)


def measure_in_turns(engines: Dict[str, Callable[[np.ndarray], Any]], images: List[np.ndarray],
                     warmup: int = 5, progress: Optional[Callable[[int, int], None]] = None,
                     every_s: float = 5.0, governor: Optional[ThreadGovernor] = None) -> Dict[str, Dict[str, Any]]:
    """Run every engine on every frame and collect, per engine, ``lat`` (each result's
    ``total_ms``), ``wall`` (seconds in the calls), ``keep``, ``gflops`` and ``stages``.

    The engines take turns on each frame, in an order that rotates from frame to frame, after
    all of them are warm: run one after the other, the first engine measured is slower in code
    that every engine shares (letterboxing, NMS) while CPU clocks and caches settle.

    ``progress(done, total)`` is called every ``every_s`` seconds (not timed). With a
    ``governor``, the engines on PyTorch's CPU threads run with the thread count it chooses, as
    ``dynprune serve`` runs them.
    """
    names = list(engines)
    measured: Dict[str, Dict[str, Any]] = {
        name: {"lat": [], "wall": 0.0, "keep": [], "gflops": [], "stages": []} for name in names}
    with torch.inference_mode():
        for eng in engines.values():
            for img in images[:warmup]:
                eng(img)
        last_report = time.perf_counter()
        for i, img in enumerate(images):
            if progress is not None and time.perf_counter() - last_report > every_s:
                progress(i, len(images))
                last_report = time.perf_counter()
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                m = measured[name]
                governed = governor is not None and getattr(engines[name], "torch_cpu_threads", False)
                threads = governor.before_frame(name) if governed else 0
                t0 = time.perf_counter()
                r = engines[name](img)
                m["wall"] += time.perf_counter() - t0
                if governed:
                    governor.after_frame(name, threads, r.total_ms)
                m["lat"].append(r.total_ms)
                m["stages"].append(r.timings)
                if r.keep_ratio is not None:
                    m["keep"].append(r.keep_ratio)
                if r.gflops is not None:
                    m["gflops"].append(r.gflops)
    return measured


def run_bench(bundle_dir: str, source: Optional[str] = None, data: Optional[str] = None, frames: int = 200,
              engines: Optional[List[str]] = None, out: str = "runs/bench", device: str = "auto",
              backend: str = "auto", warmup: int = 5, log=print, cuda_graph: bool = True,
              precision: str = "fp16", adapt_threads: bool = True, sms: Optional[int] = None) -> Dict[str, Any]:
    """``sms``: run every GPU kernel on at most that many SMs (:mod:`dynprune.sm_limit`; checked, and the
    check is in the result)."""
    bundle = load_bundle(bundle_dir)
    dev = pick_device(device)
    limit, sm_check = checked_limit(sms, dev.index or 0 if dev.type == "cuda" else 0, log,
                                    cuda_available=dev.type == "cuda")
    with limit:  # every GPU kernel of the run, CUDA graph replays included
        which = engines or list(bundle["engines"])
        loaded = load_engines(bundle, which, dev, backend, precision, cuda_graph=cuda_graph)
        if not frames:
            log(f"reading every frame of {source or data} (--frames 0)...")
        images, records, names = load_frames(source, data, frames)
        log(f"measuring {len(images)} frames on {', '.join(loaded)} (the engines take turns)...")
        rows, per_frame = [], {}
        governor = ThreadGovernor(torch.get_num_threads()) if adapt_threads else None
        measured = measure_in_turns(loaded, images, warmup,
                                    progress=lambda done, total: log(f"  {done}/{total} frames measured"),
                                    governor=governor)
        for name, eng in loaded.items():
            m = measured[name]
            lat, keep, gflops, stages, wall = m["lat"], m["keep"], m["gflops"], m["stages"], m["wall"]
            row: Dict[str, Any] = {
                "engine": name, "fps": len(images) / wall, "p50_ms": float(np.median(lat)),
                "p95_ms": float(np.percentile(lat, 95)),
                "keep_mean": float(np.mean(keep)) if keep else None,
                "keep_p95": float(np.percentile(keep, 95)) if keep else None,
                "gflops": float(np.mean(gflops)) if gflops else None, "ap50": None, "ap50_95": None,
                "stages_ms": {k: float(np.mean([s[k] for s in stages])) for k in stages[0]},
                "description": eng.description,
            }
            if records is not None:
                from dynprune.metrics import evaluate_detections

                # AP needs low-score detections too: re-run NMS output at conf 0.001 for the metric.
                eng_conf = eng.conf
                eng.conf = 0.001
                with torch.inference_mode():
                    low = [eng(img) for img in images]
                eng.conf = eng_conf
                metrics = evaluate_detections([{"boxes": r.boxes, "scores": r.scores, "labels": r.labels} for r in low],
                                              records, names)
                row["ap50"], row["ap50_95"] = metrics["ap50"], metrics["ap50_95"]
            rows.append(row)
            per_frame[name] = {"latency_ms": lat, "keep": keep}
        breaks: Dict[str, Optional[float]] = {}
        if "static" in per_frame:
            static_p50 = next(r["p50_ms"] for r in rows if r["engine"] == "static")
            for name in GATED_ENGINES:
                if name in per_frame:
                    frames_of = per_frame[name]
                    breaks[name] = break_even(np.array(frames_of["keep"]), np.array(frames_of["latency_ms"]),
                                              static_p50)
        out_p = Path(out)
        out_p.mkdir(parents=True, exist_ok=True)
        result = {"bundle": bundle_dir, "source": source or data, "frames": len(images), "device": str(dev),
                  # what the engines ran: on the CPU every engine is float32, whatever was asked for
                  "precision": precision if dev.type == "cuda" else "fp32",
                  "threads": governor.options[0] if governor else torch.get_num_threads(),
                  "threads_at_end": governor.current if governor else torch.get_num_threads(),
                  "thread_switches": governor.switches if governor else [],
                  "thread_trials": governor.trials if governor else 0,
                  "imgsz": bundle["imgsz"], "rows": rows, "sm_limit": sm_check,
                  # keep ratio at which each gated engine is as fast as static (None: not measured or no crossing)
                  "break_even_keep": breaks.get("dynamic"), "break_even": breaks,
                  "per_frame": per_frame}
        (out_p / "bench.json").write_text(json.dumps(result, indent=2))
        with open(out_p / "bench.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(r)
        plot_latency_vs_keep(per_frame, rows, breaks, str(out_p / "latency_vs_keep.png"))
        log(format_table(result))
        return result


def format_table(result: Dict[str, Any]) -> str:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    lines = [f"{result['frames']} frames from {result['source']}, {result['imgsz']} px, batch 1, "
             f"{result['device']} ({_threads(result)})",
             f"{'engine':<9}{'FPS':>8}{'p50 ms':>9}{'p95 ms':>9}{'keep':>7}{'keep95':>8}{'GFLOPs':>8}"
             f"{'AP50':>8}{'AP50-95':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['engine']:<9}{r['fps']:>8.1f}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}"
                     f"{f(r['keep_mean'], '.3f'):>7}{f(r['keep_p95'], '.3f'):>8}{f(r['gflops'], '.3f'):>8}"
                     f"{f(r['ap50'], '.4f'):>8}{f(r['ap50_95'], '.4f'):>9}")
    breaks = result.get("break_even") or {"dynamic": result.get("break_even_keep")}
    for name, be in breaks.items():
        if be is None:
            continue
        if 0 < be < 1:
            lines.append(f"break-even keep ratio ({name} as fast as static): {be:.3f}")
        else:  # the fitted line crosses outside [0, 1]: say what that means
            faster = "static" if be <= 0 else name
            lines.append(f"break-even keep ratio of {name}: none, {faster} is faster at every keep ratio "
                         f"(fit crosses at {be:.3f})")
    return "\n".join(lines)


def _threads(result: Dict[str, Any]) -> str:
    switches = result.get("thread_switches") or []
    if not switches:
        return f"{result['threads']} threads"
    return (f"{result['threads']} threads, {len(switches)} switch(es) by trial, {result['threads_at_end']} at the end: "
            "other processes used the cores")


def plot_latency_vs_keep(per_frame, rows, breaks: Dict[str, Optional[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    colors = {"dense": "#888888", "static": "#d95f02", "dynamic": "#1b9e77", "hybrid": "#7570b3"}
    for name, d in per_frame.items():
        p50 = next(r["p50_ms"] for r in rows if r["engine"] == name)
        if d["keep"]:
            ax.scatter(d["keep"], d["latency_ms"], s=8, alpha=0.6, color=colors.get(name), label=f"{name} (per frame)")
        else:
            ax.axhline(p50, color=colors.get(name), ls="--", label=f"{name} p50 {p50:.1f} ms")
    for name, be in breaks.items():
        if be is not None and 0 < be < 1:
            ax.axvline(be, color=colors.get(name), lw=1, label=f"{name} as fast as static at keep {be:.2f}")
    ax.set_xlabel("keep ratio of the frame (mean over gated layers)")
    ax.set_ylabel("latency per frame (ms)")
    ax.set_title("Per-frame latency against keep ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
