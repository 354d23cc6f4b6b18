"""Deployable bundles (``dynprune export``): one folder a user copies to the board.

    metadata.json    class names, input size and normalisation, thresholds, each engine's AP
    dynamic.pt       the gated model (dynamic engine)
    hybrid.pt        gates trained into the statically pruned model (hybrid engine)
    static.pt        the statically pruned model, and static.onnx its ONNX (static engine)
    dense.pt         the dense model, for reference
    static-trt<version>-<precision>-<gpu>.plan   TensorRT plans, built and cached on the board
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional

from dynprune import __version__
from dynprune.checkpoint import base_of, load_checkpoint, model_from_checkpoint, trained_into
from dynprune.export import export_onnx
from dynprune.flops import CostModel

BUNDLE_FORMAT = "dynprune-bundle-1"


class BundleError(ValueError):
    pass


def _engine_entry(ckpt: Dict[str, Any], file: str, imgsz: int) -> Dict[str, Any]:
    model, _ = model_from_checkpoint(ckpt)
    metrics = ckpt.get("metrics") or {}
    entry = {"file": file, "kind": ckpt.get("kind"), "gflops": CostModel(model, imgsz).dense / 1e9}
    for k in ("ap50", "ap50_95", "flops_mean", "flops_p95"):
        if k in metrics:
            entry[k] = metrics[k]
    return entry


def export_bundle(out: str, dynamic: Optional[str] = None, static: Optional[str] = None,
                  dense: Optional[str] = None, conf: float = 0.25, iou: float = 0.6,
                  hybrid: Optional[str] = None) -> Dict[str, Any]:
    """Write a bundle folder from checkpoints; at least one engine is required.

    Without ``dense``, the dense model the dynamic gates were trained into; without ``static``, the
    pruned model the hybrid gates were trained into (where the run recorded them and they exist)."""
    if not (dynamic or static or dense or hybrid):
        raise BundleError("nothing to export: give --dynamic, --hybrid, --static and/or --dense checkpoints")
    gated = {}
    for role, path in (("dynamic", dynamic), ("hybrid", hybrid)):
        if not path:
            continue
        ckpt = load_checkpoint(path)
        if not ckpt.get("gated"):
            raise BundleError(f"{path}: --{role} needs a gated checkpoint (from dynprune gate)")
        base = base_of(ckpt)
        if role == "dynamic" and base == "pruned":
            raise BundleError(f"{path}: gates trained into a pruned model; export it with --hybrid")
        if role == "hybrid" and base == "dense":
            raise BundleError(f"{path}: gates trained into a dense model; export it with --dynamic (--hybrid takes "
                              "gates trained into a pruned checkpoint: dynprune gate --weights runs/prune/best.pt)")
        gated[role] = ckpt
    recorded = {"dense": dense, "static": static}
    for role, fills in (("dynamic", "dense"), ("hybrid", "static")):
        if role in gated and not recorded[fills]:
            base_w = trained_into(gated[role])
            if base_w and Path(base_w).is_file():
                recorded[fills] = base_w
    dense, static = recorded["dense"], recorded["static"]
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    engines: Dict[str, Any] = {}
    names, imgsz = None, None
    for role, path in (("dynamic", dynamic), ("hybrid", hybrid), ("static", static), ("dense", dense)):
        if not path:
            continue
        ckpt = gated.get(role) or load_checkpoint(path)
        if role not in gated and ckpt.get("gated"):
            raise BundleError(f"{path}: --{role} needs a dense or pruned checkpoint, not a gated one")
        if names is None:
            names, imgsz = ckpt["names"], ckpt["imgsz"]
        elif ckpt["names"] != names or ckpt["imgsz"] != imgsz:
            raise BundleError(f"{path}: classes {ckpt['names']} / size {ckpt['imgsz']} differ from "
                              f"{names} / {imgsz} of the other checkpoints")
        shutil.copyfile(path, out_p / f"{role}.pt")
        engines[role] = _engine_entry(ckpt, f"{role}.pt", imgsz)
        if role == "static":
            model, _ = model_from_checkpoint(ckpt)
            export_onnx(model, str(out_p / "static.onnx"), imgsz)
            engines[role]["onnx"] = "static.onnx"
    meta = {
        "format": BUNDLE_FORMAT, "dynprune_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "names": names, "imgsz": imgsz,
        "input": {"layout": "NCHW", "color": "RGB", "scale": 1 / 255, "letterbox": 114},
        "conf": conf, "iou": iou, "engines": engines,
    }
    (out_p / "metadata.json").write_text(json.dumps(meta, indent=2))
    return meta


ENGINE_NAMES = ("dense", "static", "dynamic", "hybrid")
#: The engines that run gates on compact activations (serve.engines.DynamicEngine).
GATED_ENGINES = ("dynamic", "hybrid")


def load_bundle(path: str) -> Dict[str, Any]:
    """Read and check a bundle's ``metadata.json``; every problem is a :class:`BundleError` that
    names the file and the field. The engines' own files are checked when they load."""
    p = Path(path)
    if not p.is_dir():
        raise BundleError(f"{p}: no such bundle folder; make one with dynprune export")
    meta_path = p / "metadata.json"
    if not meta_path.is_file():
        raise BundleError(f"{p}: not a dynprune bundle (no metadata.json); make one with dynprune export")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{meta_path}: not valid JSON ({e}); the file is damaged or cut off, export the bundle "
                          "again") from e
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: expected a JSON object")
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path}: unknown bundle format {meta.get('format')!r} (expected {BUNDLE_FORMAT})")

    def bad(field: str, want: str) -> BundleError:
        return BundleError(f"{meta_path}: '{field}' is {meta.get(field)!r}, expected {want}; export the bundle again")

    imgsz = meta.get("imgsz")
    if not isinstance(imgsz, int) or isinstance(imgsz, bool) or imgsz <= 0 or imgsz % 32:
        raise bad("imgsz", "a positive multiple of 32")
    names = meta.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad("names", "a list of class names")
    for field in ("conf", "iou"):
        v = meta.get(field)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
            raise bad(field, "a number in [0, 1]")
    engines = meta.get("engines")
    if not isinstance(engines, dict) or not engines:
        raise bad("engines", f"an object with at least one of {list(ENGINE_NAMES)}")
    for name, entry in engines.items():
        if name not in ENGINE_NAMES:
            raise BundleError(f"{meta_path}: unknown engine {name!r} (engines are {list(ENGINE_NAMES)})")
        key = "onnx" if name == "static" else "file"
        if not isinstance(entry, dict) or not isinstance(entry.get(key), str):
            raise BundleError(f"{meta_path}: engine {name!r} names no '{key}' file; export the bundle again")
        if Path(entry[key]).is_absolute() or ".." in Path(entry[key]).parts:
            raise BundleError(f"{meta_path}: engine {name!r} file {entry[key]!r} points outside the bundle")
    meta["root"] = str(p)
    return meta
