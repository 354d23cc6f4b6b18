"""Build the tables of BENCHMARKS.md from the JSON under benchmarks/results/, or check them.

    python benchmarks/report.py            # rewrite every table in BENCHMARKS.md
    python benchmarks/report.py --check    # exit 1 if a table differs from its JSON

Each table sits between ``<!-- table: NAME -->`` and ``<!-- end table -->``; NAME is a key of
:data:`TABLES`. A table whose JSON does not exist yet (a GPU claim not measured) needs no place;
once its JSON is there, the document must hold it. A table opens with the command, machine, commit
and date its JSON records, so the document cannot carry a figure its data does not hold. Prose
around the tables is written by hand and says what the figures mean.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENT = ROOT / "BENCHMARKS.md"
MARKER = re.compile(r"<!-- table: ([\w-]+) -->\n.*?<!-- end table -->", re.S)

Table = Tuple[dict, List[str], List[Sequence]]


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _f(x, digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _spread(values: Sequence[float], digits: int = 3) -> str:
    """``mean (min-max)`` of several runs, or the value of one."""
    if len(set(_f(v, digits) for v in values)) == 1:
        return _f(values[0], digits)
    return f"{_f(statistics.mean(values), digits)} ({_f(min(values), digits)}-{_f(max(values), digits)})"


def _median(values: Sequence[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def demo() -> Table:
    d = _load("cpu-x86-2core/demo-synthetic.json")
    rows = [(r["engine"], _f(r["fps"], 1), _f(r["p50_ms"], 2), _f(r["keep_mean"], 2), _f(r["gflops"], 3),
             _f(r["ap50"]), _f(r["ap50_95"])) for r in d["bench"]["rows"]]
    rows.append(("serve --engine auto", _f(d["serve"]["fps"], 1), "", "", "",
                 f"chose {d['serve']['active']}", ""))
    rows.append(("whole demo", f"{d['timings']['total_s'] / 60:.1f} min", "", "", "", "", ""))
    return d, ["engine", "FPS", "p50 ms", "keep", "GFLOPs", "AP50", "AP50-95"], rows


def dense_recipe() -> Table:
    rows = []
    for name, label in (("ema-window-raccoon.json", "raccoon"), ("ema-window-raccoon-half.json", "raccoon, half")):
        d = _load(f"cpu-x86-2core/{name}")
        by: Dict[str, list] = {}
        for r in d["rows"]:
            # the saved average itself is listed as the default; the other windows (2%, 10%) stay in the JSON
            if r["weights"] != "ema f=0.05" and r["weights"] not in ("ema f=0.02", "ema f=0.1"):
                by.setdefault(r["weights"], []).append(r)
        for weights, rs in by.items():
            rows.append((label, weights, len(rs), _spread([r["ap50"] for r in rs]),
                         _spread([r["ap50_95"] for r in rs])))
    for r in _load("cpu-x86-2core/yolov8n-from-scratch-raccoon-half.json")["rows"]:
        rows.append(("raccoon, half", f"Ultralytics {r['model']}, {r['epochs']} epochs, {r['imgsz']} px "
                     "(yolov8n-from-scratch-raccoon-half.json)", 1, _f(r["ap50"]), _f(r["ap50_95"])))
    d = _load("cpu-x86-2core/ema-window-raccoon.json")
    return d, ["data", "weights of the same runs", "seeds", "AP50 mean (range)", "AP50-95 mean (range)"], rows


def robustness() -> Table:
    d = _load("cpu-x86-2core/unseen-robustness.json")
    groups: Dict[tuple, list] = {}
    for r in d["rows"]:
        if "--keep-on mean" not in r["recipe"]:  # ManiDP's own threshold rule: in the JSON, the weakest recipe
            groups.setdefault((r["dataset"], r["stage"], r["recipe"]), []).append(r)
    rows = []
    for (dataset, _, recipe), rs in groups.items():
        gap = [r["dense_ap50"] - r["ap50"] for r in rs if "dense_ap50" in r]
        fall = [r["best_ap50_at_target"] - r["ap50"] for r in rs if "best_ap50_at_target" in r]
        rows.append((dataset, recipe, ", ".join(str(r["seed"]) for r in rs), _spread([r["ap50"] for r in rs]),
                     _spread([r["ap50_95"] for r in rs]), _spread([r["flops"] for r in rs], 2),
                     f"{100 * statistics.mean(gap) + 0.0:.1f}" if gap else "",
                     f"{max(0.0, 100 * max(fall)):.1f}" if fall else ""))
    return d, ["data", "recipe", "seeds", "AP50 mean (range)", "AP50-95", "FLOPs",
               "AP50 points below dense (mean)", "best.pt below its best epoch at the target (worst, points)"], rows


def contention() -> Table:
    d = _load("cpu-x86-2core/contention-one-busy-process.json")
    solo = {(r["setup"], r["engine"]): r["fps_median"] for r in d["rows"] if r["burners"] == 0}
    rows = [(r["setup"], r["engine"], _f(solo[(r["setup"], r["engine"])], 1), _f(r["fps_median"], 1),
             _f(r["of_solo"], 2)) for r in d["rows"] if r["burners"] > 0 and r["setup"] == "governed"]
    return d, ["threads", "engine", "solo FPS", "FPS beside a busy process", "of its solo"], rows


def model_sizes() -> Table:
    d = _load("cpu-x86-2core/model-sizes.json")
    rows = [(r["size"], r["imgsz"], _f(r["params_m"]), _f(r["gflops"]), _f(r["gateable_share"])) for r in d["rows"]
            if r["imgsz"] == 320]  # FLOPs scale with the pixels: 4x at 640 (in the JSON)
    return d, ["size", "input", "parameters (M)", "GFLOPs", "share of FLOPs on gated channels"], rows


def cpu_dynamic() -> Table:
    d = _load("cpu-x86-2core/dynamic-vs-dense-raccoon-320.json")
    groups: Dict[tuple, list] = {}
    for r in d["runs"]:
        if r["commit"] == d["commit"]:  # the current code; earlier commits and models stay in the JSON
            groups.setdefault((r["models"], r["commit"], r["date"], r["threads"]), []).append(r)
    rows = [(models, f"{commit}, {date}", threads, len(rs), _f(statistics.median(r["keep_mean"] for r in rs), 3),
             _median([r["dense_p50_ms"] for r in rs], 2), _median([r["dynamic_p50_ms"] for r in rs], 2),
             _median([r["speedup"] for r in rs], 2)) for (models, commit, date, threads), rs in groups.items()]
    return d, ["models", "commit", "threads", "runs", "keep", "dense p50 ms, median (range)", "dynamic p50 ms",
               "speed-up"], rows


def _bench_rows(d: dict) -> List[Sequence]:
    engines = [r["engine"] for r in d["runs"][0]["rows"]]
    rows = []
    for engine in engines:
        rs = [next(r for r in run["rows"] if r["engine"] == engine) for run in d["runs"]]
        rows.append((engine, _median([r["fps"] for r in rs], 1), _median([r["p50_ms"] for r in rs], 2),
                     _median([r["stages_ms"]["network_ms"] for r in rs], 2), _f(rs[0]["keep_mean"], 3),
                     _f(rs[0]["gflops"], 3), _f(rs[0]["ap50"]), _f(rs[0]["ap50_95"])))
    return rows


BENCH_HEADER = ["engine", "FPS, median (range)", "p50 ms", "network ms", "keep", "GFLOPs", "AP50", "AP50-95"]


def engines_bench() -> Table:
    """Bundles with all four engines through ``dynprune bench`` (raccoon, synthetic): each engine's FPS
    against static's (measured in the same runs), and where its frame time goes (gates, network, the rest), so
    a shortfall shows its cause; then the hybrid engine at --keep 0.7, from its own runs beside the others."""
    rows, first = [], None
    keep07 = {"hybrid": "hybrid, keep 0.7"}
    for dataset, name, engines in (("raccoon", "bench-raccoon.json", None),
                                   ("raccoon", "bench-raccoon-hybrid-keep0.7.json", keep07),
                                   ("synthetic", "bench-synthetic.json", None),
                                   ("synthetic", "bench-synthetic-hybrid-keep0.7.json", keep07)):
        d = _load(f"cpu-x86-2core/{name}")
        first = first or d
        static_fps = [next(r["fps"] for r in run["rows"] if r["engine"] == "static") for run in d["runs"]]
        for engine in engines or [r["engine"] for r in d["runs"][0]["rows"]]:
            rs = [next(r for r in run["rows"] if r["engine"] == engine) for run in d["runs"]]
            other = [r["stages_ms"]["preprocess_ms"] + r["stages_ms"]["postprocess_ms"] for r in rs]
            rows.append((dataset, (engines or {}).get(engine, engine), _median([r["fps"] for r in rs], 1),
                         _median([r["fps"] / s for r, s in zip(rs, static_fps)], 2),
                         _f(statistics.median(r["stages_ms"]["gates_ms"] for r in rs), 2),
                         _f(statistics.median(r["stages_ms"]["network_ms"] for r in rs), 2),
                         _f(statistics.median(other), 2), _f(rs[0]["keep_mean"], 3),
                         _f(rs[0]["gflops"], 3), _f(rs[0]["ap50"]), _f(rs[0]["ap50_95"])))
    return first, ["data", "engine", "FPS, median (range)", "of static", "gates ms", "network ms", "letterbox + NMS ms",
                   "keep", "GFLOPs", "AP50", "AP50-95"], rows


def network_parts() -> Table:
    """Network milliseconds per frame in the layers gates never touch, in the bottlenecks, and the rest."""
    rows, first = [], None
    for dataset in ("raccoon", "synthetic"):
        d = _load(f"cpu-x86-2core/network-parts-{dataset}.json")
        first = first or d
        for r in (r for r in d["rows"] if r["engine"] != "dynamic"):  # dynamic's: in the JSON
            rows.append((dataset, r["engine"], _f(r["network_ms"], 2), f"{_f(r['ungated_ms'], 2)} ms, "
                         f"{_f(r['ungated_gflops'])} GFLOPs", f"{_f(r['bottlenecks_ms'], 2)} ms, "
                         f"{_f(r['bottlenecks_gflops'])} GFLOPs", _f(r["rest_ms"], 2)))
    return first, ["data", "engine (static: its PyTorch form)", "network ms", "un-gated layers",
                   "bottlenecks (gates included)", "rest ms"], rows


def neuron_merging() -> Table:
    """AP50 straight after pruning without and with the merge, the share of the AP50 lost that the merge
    recovers, and after fine-tuning."""
    d = _load("cpu-x86-2core/neuron-merging.json")
    dense = {r["dataset"]: r for r in d["rows"] if r["method"] == "dense"}
    rows = []
    keys = sorted({(r["dataset"], r["method"], r["flops"]) for r in d["rows"] if r["method"] != "dense"},
                  key=lambda k: (k[0], -k[2], k[1]))
    for dataset, method, flops in keys:
        rs = [r for r in d["rows"] if (r["dataset"], r["method"], r["flops"]) == (dataset, method, flops)]

        def pick(merge: bool, finetuned: bool, variant: str = "paper", rs=rs) -> dict:
            return next((r for r in rs if r["merge"] == merge and r["finetuned"] == finetuned
                         and (not merge or finetuned or r.get("variant", "paper") == variant)), {})

        pruned, merged, limited = pick(False, False), pick(True, False), pick(True, False, "scale within 2x")
        lost = dense[dataset]["ap50"] - pruned["ap50"]
        share = (merged["ap50"] - pruned["ap50"]) / lost if lost > 0 else None

        def ap(r: dict) -> str:
            return f"{_f(r.get('ap50'))} / {_f(r.get('ap50_95'))}" if r else ""

        rows.append((dataset, method, flops, ap(dense[dataset]), ap(pruned), ap(merged), ap(limited),
                     "" if share is None else f"{100 * share:.0f}%", ap(pick(False, True)), ap(pick(True, True))))
    return d, ["data", "method", "FLOPs", "dense AP50 / AP50-95", "pruned", "merged", "merged, scale within 2x",
               "AP50 lost that merging recovers", "pruned, fine-tuned", "merged, fine-tuned"], rows


def gate_ablation() -> Table:
    d = _load("cpu-x86-2core/gate-ablation-matched-keep.json")
    rows = [(r["dataset"], r["method"], _f(r["ap50"]), _f(r["ap50_95"]), _f(r["keep_mean"], 2),
             _f(r["flops_mean"], 2)) for r in d["rows"] if "--keep 0.9" not in r["method"]]
    return d, ["data", "gates", "AP50", "AP50-95", "keep", "FLOPs"], rows


def static_methods() -> Table:
    d = _load("cpu-x86-2core/static-pruning-methods.json")
    rows = [(r["dataset"], "dense", "", _f(r["params_m"]), _f(r["gflops"]), _f(r["ap50"]), _f(r["ap50_95"]),
             _f(r["ort_p50_ms"], 2), "") for r in d["dense"]]
    rows += [(r["dataset"], r["method"], r["flops_target"], _f(r["params_m"]), _f(r["gflops"]), _f(r["ap50"]),
              _f(r["ap50_95"]), _f(r["ort_p50_ms"], 2), f"{r['epochs']} ep") for r in d["rows"]
             if r["flops_target"] == 0.5]  # (the 0.3 rows are in the JSON; the prose quotes them)
    e = d["effp_default"]
    rows.append((e["dataset"], "EFFP, default 20 epochs", e["flops_target"], _f(e["params_m"]), _f(e["gflops"]),
                 _f(e["ap50"]), _f(e["ap50_95"]), _f(e.get("ort_p50_ms"), 2), "20 ep"))
    header = ["data", "method", "FLOPs target", "params M", "GFLOPs", "AP50", "AP50-95", "ORT p50 ms", "training"]
    return d, header, rows


def h100_layers() -> Table:
    d = _load("h100/layer-triton-vs-cudnn.json")
    rows = []
    for r in d["layers"]:
        if not r["layer"].startswith("3x3"):
            continue
        t1 = r.get("triton_1.0_r8_ms", r["triton_1.0_ms"])
        rows.append((r["layer"], _f(r["cudnn_ms"] * 1e3, 1), _f(t1 * 1e3, 1), f"{t1 / r['cudnn_ms']:.2f}x",
                     _f(r.get("triton_0.5_r8_ms", r["triton_0.5_ms"]) * 1e3, 1)))
    header = ["layer (nano at 640, fp16)", "cuDNN NHWC us", "Triton keep 1.0 us", "of cuDNN", "Triton keep 0.5 us"]
    return d, header, rows


def h100_network() -> Table:
    d = _load("h100/network-dense-vs-dynamic.json")
    by_keep = _load("h100/network-by-keep.json")
    rows = [(r["imgsz"], _f(r["keep_mean"], 2), _f(r["dense_nhwc_graph_ms"]), _f(r["dynamic_graph_ms"]),
             f"{r['dense_nhwc_graph_ms'] / r['dynamic_graph_ms']:.2f}x") for r in d["network"] if r["imgsz"] <= 640]
    rows += [(r["imgsz"], _f(r["keep_mean"], 2), _f(r["dense_nhwc_graph_ms"]), _f(r["dynamic_graph_ms"]),
              f"{r['dense_nhwc_graph_ms'] / r['dynamic_graph_ms']:.2f}x")
             for r in by_keep["network"] if r["keep_target"] != 0.5 and r["imgsz"] == 640]
    return d, ["input", "keep", "dense ms (CUDA graph, NHWC)", "dynamic ms (CUDA graph)", "speed-up"], rows


def h100_bench() -> Table:
    d = _load("h100/raccoon-bundle-bench.json")
    return d, BENCH_HEADER, _bench_rows(d)


def _sms(n: int) -> str:
    return "all" if not n else str(n)


def _board_configs(d: dict) -> List[Tuple[tuple, Dict[str, dict]]]:
    """The board JSON's rows by (model, input, batch, SMs), each with its engines; fewest SMs first."""
    by_config: Dict[tuple, Dict[str, dict]] = {}
    for r in d["rows"]:
        by_config.setdefault((r["model"], r["imgsz"], r["batch"], r["sms"]), {})[r["engine"]] = r
    return sorted(by_config.items(), key=lambda kv: (kv[0][:3], kv[0][3] or 10**6))


def _sms_cell(sms: int, engines: Dict[str, dict]) -> str:
    return _sms(sms) + ("" if engines["dense"]["confined"] else " (NOT confined)")


def board_emulation() -> Table:
    """The board table: each network on an H100 confined to a Jetson's SMs (``board_emulation.py``)."""
    d = _load("h100/board-emulation.json")
    rows = []
    for (model, imgsz, batch, sms), e in _board_configs(d):
        dense, static, dyn = (e[k]["network_ms_p50"] for k in ("dense", "static", "dynamic"))
        keep1 = e.get("dynamic_keep1", {}).get("network_ms_p50")
        rows.append((model, imgsz, batch, _sms_cell(sms, e),
                     _f(dense), _f(static), _f(dyn), _f(e["dynamic"]["keep_mean"], 2), f"{dense / dyn:.2f}x",
                     f"{static / dyn:.2f}x", _f(keep1)))
    header = ["model", "input", "batch", "SMs", "dense ms", "static ms", "dynamic ms", "keep", "dynamic over dense",
              "dynamic over static", "dynamic, every channel kept, ms"]
    return d, header, rows


def board_tuned() -> Table:
    """The board table's key rows with tiles tuned at each SM count against the default tiles."""
    d = _load("h100/board-emulation-tuned.json")
    rows = []
    for (model, imgsz, batch, sms), e in _board_configs(d):
        dense, static = e["dense"]["network_ms_p50"], e["static"]["network_ms_p50"]
        default, tuned = e["dynamic_default_tiles"]["network_ms_p50"], e["dynamic"]["network_ms_p50"]
        rows.append((f"{model} {imgsz} b{batch}", _sms_cell(sms, e),
                     f"{_f(dense)} ({e['dense'].get('dense_form', 'cudnn')})", _f(static), _f(default), _f(tuned),
                     f"{dense / tuned:.2f}x", f"{static / tuned:.2f}x",
                     _f(e.get("dynamic_keep1", {}).get("network_ms_p50"))))
    header = ["network", "SMs", "dense ms (form)", "static ms", "dynamic ms, default tiles", "dynamic ms, tuned",
              "tuned over dense", "tuned over static", "every channel kept, tuned, ms"]
    return d, header, rows


def board_layers() -> Table:
    """Per gated 3x3 layer at a Jetson's SM count: cuDNN against the Triton kernel, default and tuned tiles."""
    d = _load("h100/layers-8sms.json")
    rows = []
    for r in d["layers"]:
        if not r["layer"].startswith("3x3"):
            continue
        cudnn = r["cudnn_ms"]
        t1, t1_tuned = r["triton_1.0_r8_ms"], r.get("triton_1.0_r8_tuned_ms")
        rows.append((r["layer"], _f(cudnn * 1e3, 1), _f(r["triton_dense_ms"] * 1e3, 1),
                     _f(t1 * 1e3, 1), f"{t1 / cudnn:.2f}x",
                     _f(t1_tuned * 1e3, 1) if t1_tuned else "", f"{t1_tuned / cudnn:.2f}x" if t1_tuned else "",
                     _f(r.get("triton_0.5_r8_tuned_ms", r["triton_0.5_r8_ms"]) * 1e3, 1)))
    sms = (d.get("sm_limit") or {}).get("sms", "all")
    header = [f"layer (nano at 640, fp16, {sms} SMs)", "cuDNN us", "Triton, no lists, us", "keep 1.0 us", "of cuDNN",
              "keep 1.0 tuned us", "of cuDNN", "keep 0.5 us (tuned where measured)"]
    return d, header, rows


def whole_frame() -> Table:
    """The whole frame on the GPU against the network alone, per engine and input size (``gpu_frame.py``)."""
    paths = sorted((RESULTS / "h100").glob("whole-frame-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if not paths:
        raise FileNotFoundError(RESULTS / "h100" / "whole-frame-<size>.json")
    runs = [json.loads(p.read_text()) for p in paths]
    rows = []
    for d in runs:
        by_engine = {r["engine"]: r for r in d["rows"]}
        for name, r in by_engine.items():
            speedups = ""
            if name != "dense" and "dense" in by_engine:
                dense = by_engine["dense"]
                e2e = dense["p50_ms"] / r["p50_ms"]
                net = dense["network_only_p50_ms"] / r["network_only_p50_ms"]
                speedups = f"{e2e:.2f}x of {net:.2f}x ({100 * e2e / net:.0f}%)"
            rows.append((d["imgsz"], name, _f(r["p50_ms"]), _f(r["network_only_p50_ms"]),
                         f"{r['end_to_end_over_network']:.2f}", _f(r["host_path_p50_ms"]), speedups))
    header = ["input", "engine", "frame p50 ms (on the GPU)", "network alone ms", "frame / network",
              "frame through the host, ms", "over dense: frame of network (kept)"]
    sizes = " ".join(str(d["imgsz"]) for d in runs)
    return {**runs[-1], "command": f"python benchmarks/gpu_frame.py BUNDLE --source FRAMES --sizes {sizes}"}, \
        header, rows


TABLES: Dict[str, Callable[[], Table]] = {
    "demo": demo, "dense-recipe": dense_recipe, "robustness": robustness,
    "contention": contention,
    "model-sizes": model_sizes, "cpu-dynamic": cpu_dynamic, "engines-bench": engines_bench,
    "network-parts": network_parts, "neuron-merging": neuron_merging,
    "gate-ablation": gate_ablation, "static-methods": static_methods,
    "h100-layers": h100_layers, "h100-network": h100_network, "h100-bench": h100_bench,
    "board-emulation": board_emulation, "board-tuned": board_tuned, "board-layers": board_layers,
    "whole-frame": whole_frame,
}


def pending(name: str) -> bool:
    """Whether table ``name`` has no JSON yet (a claim not measured): it needs no place in the document."""
    try:
        TABLES[name]()
    except FileNotFoundError:
        return True
    return False


def render(name: str) -> str:
    data, header, rows = TABLES[name]()
    source = (f"`{data['command']}` ({data['machine']}; commit {data.get('commit', '?')}, {data['date']})")
    lines = [f"<!-- table: {name} -->", source, "", "| " + " | ".join(header) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines + ["<!-- end table -->"])


def build(text: str) -> Tuple[str, List[str]]:
    """``(text with every table rebuilt, names of the tables that changed)``."""
    changed: List[str] = []
    missing = set(TABLES)

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise SystemExit(f"BENCHMARKS.md: unknown table {name!r}; known: {', '.join(TABLES)}")
        missing.discard(name)
        new = render(name)
        if new != match.group(0):
            changed.append(name)
        return new

    out = MARKER.sub(replace, text)
    missing = {name for name in missing if not pending(name)}
    if missing:
        raise SystemExit(f"BENCHMARKS.md: no place for table(s) {', '.join(sorted(missing))}")
    return out, changed


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a table differs from its JSON")
    args = ap.parse_args(argv)
    text = DOCUMENT.read_text()
    new, changed = build(text)
    if args.check:
        if changed:
            print(f"BENCHMARKS.md: table(s) {', '.join(changed)} differ from benchmarks/results/; "
                  "run python benchmarks/report.py", file=sys.stderr)
            return 1
        waiting = [name for name in TABLES if pending(name)]
        print(f"BENCHMARKS.md: {len(TABLES) - len(waiting)} tables match benchmarks/results/"
              + (f" ({', '.join(waiting)}: no JSON yet)" if waiting else ""))
        return 0
    DOCUMENT.write_text(new)
    print(f"BENCHMARKS.md: rebuilt {len(changed)} of {len(TABLES)} tables")
    return 0


if __name__ == "__main__":
    sys.exit(main())
