"""The ``dynprune`` command line. Each subcommand is a thin layer over the library.

    dynprune demo                                      # the whole flow on built-in data
    dynprune train  --data pigs.yaml                   # dense one-class detector
    dynprune val    --weights runs/dense/best.pt       # AP, FLOPs, latency
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Tuple

import torch

from dynprune.gates import DEFAULT_GATE_GROUP
from dynprune.manidp import DEFAULT_KEEP_ON, DEFAULT_SCHEDULE, DISTILL_WEIGHT, SCHEDULES


class UsageError(ValueError):
    """A flag, value or combination the user gave that cannot work: one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``dynprune train: error: argument --batch: ...``), exit 2,
    and without abbreviated flags (``--resume`` compares the flags the user typed, by their full names)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, low=None, high=None, low_open: bool = False, what: str = ""):
    """An argparse type: ``kind`` within [low, high] (``low_open``: above ``low``)."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if v != v or (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return v

    return parse


positive_int = _number(int, 1, what="must be at least 1")
nonneg_int = _number(int, 0, what="must be 0 or more")
positive_float = _number(float, 0.0, low_open=True, what="must be above 0")
nonneg_float = _number(float, 0.0, what="must be 0 or more")
fraction = _number(float, 0.0, 1.0, low_open=True, what="must be in (0, 1]")
probability = _number(float, 0.0, 1.0, what="must be in [0, 1]")
port = _number(int, 0, 65535, what="a TCP port is 1-65535 (0 picks a free one)")


def _run_folder(path: str, flag: str = "--out") -> str:
    """A folder to write a run into: refused when a file of that name is in the way."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a file, not a folder; give a folder for the run's outputs")
    return path


DATA_HELP = ("dataset: an Ultralytics data.yaml, a COCO yaml (format: coco), a Pascal VOC folder "
             "(annotations/, images/, train.txt, val.txt), or 'synthetic' (built in, no download)")


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    # --data may be left out with --resume: the run's checkpoint records its dataset.
    p.add_argument("--data", help=DATA_HELP + (" (required unless --resume)" if required else ""))
    p.add_argument("--classes", nargs="+", help="keep only these class names (default: all)")
    p.add_argument("--single-class", action="store_true", help="merge all (kept) classes into one")


def _add_train_args(p: argparse.ArgumentParser, epochs: Optional[int], lr: float, epochs_help: str = "") -> None:
    p.add_argument("--epochs", type=positive_int, default=epochs, help=epochs_help or None)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--imgsz", type=positive_int, default=None, help="input size, a multiple of 32 (default 320)")
    p.add_argument("--lr", type=positive_float, default=lr)
    p.add_argument("--workers", type=nonneg_int, default=2, help="data-loading processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mosaic", type=probability, default=0.3, help="probability of a 2x2 mosaic per training image")
    p.add_argument("--val-every", type=positive_int, default=1, help="validate every N epochs (and at the end)")
    p.add_argument("--resume", metavar="LAST_PT",
                   help="continue a stopped run from its last.pt: its folder, dataset and settings come from the "
                        "checkpoint (a larger --epochs extends it)")


def _is_main_process() -> bool:
    """Rank 0 under torchrun (or a plain run): the only process that talks to the user."""
    return int(os.environ.get("RANK", "0")) == 0


# Flags whose value a resumed run takes from its checkpoint's train_config; (flag, TrainConfig field).
_RESUMED_FLAGS = (("--imgsz", "imgsz"), ("--batch", "batch"), ("--lr", "lr"), ("--mosaic", "mosaic"),
                  ("--seed", "seed"), ("--val-every", "val_every"), ("--workers", "workers"))


def _apply_resume(args, kind: str, explicit: set) -> dict:
    """Fill ``args`` from the checkpoint of the run ``--resume`` names, refusing flags that disagree.

    A resumed run continues bit for bit only with the settings it started with, so the run folder,
    dataset, classes, image size, batch, learning rate, augmentation and seed come from the checkpoint;
    a flag given with another value is an error naming both. ``--epochs`` may grow (the run is
    extended, and the learning-rate schedule with it); it may not shrink below the epochs done.
    """
    from pathlib import Path

    from dynprune.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.resume)
    state = ckpt.get("train_state")
    if state is None:
        raise UsageError(f"--resume {args.resume}: has no training state (a best.pt?); resume from the run's last.pt")
    if ckpt.get("kind") != kind:
        cmd = {"dense": "train", "gated": "gate", "pruned": "prune"}.get(ckpt.get("kind"), "?")
        raise UsageError(f"--resume {args.resume}: a {ckpt.get('kind')} run's checkpoint; resume it with "
                         f"dynprune {cmd} --resume {args.resume}")
    tc = ckpt.get("train_config") or {}
    folder = str(Path(args.resume).parent)

    def same(a, b) -> bool:
        return a == b or (isinstance(a, float) or isinstance(b, float)) and abs(float(a) - float(b)) < 1e-12

    if "out" in explicit and os.path.normpath(args.out) != os.path.normpath(folder):
        raise UsageError(f"--out {args.out}: the resumed run's folder is {folder}; leave --out out to continue "
                         "it there")
    args.out = folder
    for flag, field in _RESUMED_FLAGS:
        if field not in tc:
            continue
        if flag.lstrip("-").replace("-", "_") in explicit and not same(getattr(args, field), tc[field]):
            raise UsageError(f"{flag} {getattr(args, field)}: the run being resumed has {flag} {tc[field]}; "
                             f"leave {flag} out (a resumed run keeps its settings)")
        setattr(args, field, tc[field])
    extra = tc.get("extra") or {}
    recorded = ckpt.get("data")
    if args.data and recorded and os.path.abspath(args.data) != os.path.abspath(recorded) and args.data != recorded:
        raise UsageError(f"--data {args.data}: the run being resumed trained on {recorded}; leave --data out")
    args.data = args.data or recorded
    if "classes" in explicit and list(args.classes or []) != list(extra.get("classes") or []):
        raise UsageError(f"--classes {args.classes}: the run being resumed has {extra.get('classes')}")
    args.classes = extra.get("classes")
    args.single_class = bool(extra.get("single_class"))
    done, planned = int(ckpt.get("epoch", -1)) + 1, int(tc.get("epochs", args.epochs))
    if "epochs" not in explicit:
        args.epochs = planned
    if args.epochs <= done:
        raise UsageError(f"--resume {args.resume}: the run has finished {done} of {planned} epochs; give --epochs N "
                         f"with N above {done} to train it longer")
    if args.epochs != planned:
        print(f"resuming with --epochs {args.epochs} instead of the run's {planned}: the learning-rate schedule is "
              "stretched to the new length, so the result differs from a run planned that long")
    return ckpt


# Gate flags a resumed gate run takes from its checkpoint's "gate" record: (flag, args field, record key).
_GATE_FLAGS = (("--keep", "keep", "keep"), ("--gate", "gate", "method"), ("--sparsity", "sparsity", "sparsity"),
               ("--similarity", "similarity", "similarity"), ("--beta", "beta", "beta"),
               ("--threshold-every", "threshold_every", "threshold_every"), ("--keep-on", "keep_on", "keep_on"),
               ("--schedule", "schedule", "schedule"), ("--distill", "distill", "distill"))


def _resume_gate_settings(args, ckpt: dict) -> None:
    """The gate settings of a resumed gate run come from its checkpoint; a flag that disagrees is refused."""
    # a checkpoint without "distill" predates distillation: it was trained without
    record = {"distill": 0.0, **(ckpt.get("gate") or {})}
    for flag, field, key in _GATE_FLAGS:
        if key not in record:
            continue
        if field in args.explicit and getattr(args, field) != record[key]:
            raise UsageError(f"{flag} {getattr(args, field)}: the gate run being resumed has {flag} {record[key]}; "
                             f"leave {flag} out")
        setattr(args, field, record[key])
    if "complexity" in record:
        if "no_complexity" in args.explicit and args.no_complexity == bool(record["complexity"]):
            raise UsageError("--no-complexity: the gate run being resumed was trained "
                             f"{'with' if record['complexity'] else 'without'} the complexity weight; leave it out")
        args.no_complexity = not record["complexity"]


def _load_spec(args):
    from dynprune.data import load_dataset

    if not args.data:
        raise UsageError("--data is required (a data.yaml, a VOC folder, a COCO yaml or 'synthetic')")
    spec = load_dataset(args.data, classes=args.classes, single_class=args.single_class)
    if _is_main_process():
        print(f"{spec.source}: {len(spec.train)} train / {len(spec.val)} val images, classes {spec.names}")
        if spec.issues:
            print(spec.issues.summary("dataset"))
    return spec


def _check_imgsz(imgsz) -> int:
    if not isinstance(imgsz, int) or imgsz <= 0 or imgsz % 32:
        raise UsageError(f"--imgsz {imgsz}: must be a positive multiple of 32")
    return imgsz


def _best_summary(result: dict) -> str:
    """best.pt's epoch and AP, as the end of a training command reports them."""
    best = result.get("best")
    if not best:
        return "no epoch was validated, best.pt is the last epoch"
    return f"best.pt is epoch {best['epoch']} (AP50 {best['ap50']:.4f}, AP50-95 {best['ap50_95']:.4f})"


def _train_config(args, imgsz: int, **overrides):
    """The TrainConfig every training command builds from its shared flags."""
    from dynprune.train.engine import TrainConfig

    return TrainConfig(epochs=args.epochs, batch=args.batch, imgsz=_check_imgsz(imgsz), lr=args.lr,
                       workers=args.workers, device=args.device, seed=args.seed, mosaic=args.mosaic,
                       val_every=args.val_every, out=_run_folder(args.out), **overrides)


def _check_classes(weights: str, trained, spec) -> None:
    """A model's classes must be the dataset's (same count, same names, same order)."""
    if list(trained) != list(spec.names):
        raise UsageError(f"{weights}: trained on classes {list(trained)}, the dataset {spec.source} has "
                         f"{list(spec.names)}; pick them with --classes or --single-class")


def cmd_train(args) -> int:
    from dynprune.train.dense import train_dense

    if args.resume:
        ckpt = _apply_resume(args, "dense", args.explicit)
        size = (ckpt.get("train_config") or {}).get("extra", {}).get("size")
        if "size" in args.explicit and size and args.size != size:
            raise UsageError(f"--size {args.size}: the run being resumed trains a {size} model")
        args.size = size or args.size
    spec = _load_spec(args)
    if args.resume:
        _check_classes(args.resume, ckpt["names"], spec)
    cfg = _train_config(args, args.imgsz or 320, extra={"classes": args.classes, "single_class": args.single_class,
                                                         "size": args.size})
    result = train_dense(spec, cfg, size=args.size, pretrained=args.pretrained, resume=args.resume)
    if _is_main_process():
        print(f"done: {_best_summary(result)}; weights in {args.out}/best.pt")
    return 0


def cmd_gate(args) -> int:
    from dynprune.checkpoint import base_of, load_checkpoint, trained_into
    from dynprune.train.gate import accuracy_shortfall, default_gate_epochs, keep_shortfall, train_gates

    if args.resume:
        ckpt = _apply_resume(args, "gated", args.explicit)
        args.weights = args.weights or trained_into(ckpt)
        args.teacher = args.teacher or (ckpt.get("train_config") or {}).get("extra", {}).get("teacher")
        _resume_gate_settings(args, ckpt)
    if not args.weights:
        raise UsageError("--weights is required: the dense or pruned checkpoint to train gates into "
                         "(runs/dense/best.pt, or runs/prune/best.pt for the hybrid engine)")
    spec = _load_spec(args)
    dense = load_checkpoint(args.weights)
    _check_classes(args.weights, dense["names"], spec)
    base = base_of(dense)
    if args.epochs is None:
        args.epochs = default_gate_epochs(len(spec.train))
        if _is_main_process():
            print(f"gate training for {args.epochs} epochs ({len(spec.train)} training images; --epochs to change)")
    cfg = _train_config(args, args.imgsz or dense["imgsz"], warmup_epochs=0.5,
                        extra={"classes": args.classes, "single_class": args.single_class, "dense": args.weights,
                               "teacher": args.teacher})
    result = train_gates(args.weights, spec, cfg, keep=args.keep, method=args.gate, group=args.group,
                         teacher_weights=args.teacher,
                         resume=args.resume, sparsity=args.sparsity, similarity=args.similarity, beta=args.beta,
                         complexity=not args.no_complexity, threshold_every=args.threshold_every,
                         gate_lr_mult=args.gate_lr_mult, keep_on=args.keep_on, schedule=args.schedule,
                         distill=args.distill)
    role = "hybrid" if base == "pruned" else "dynamic"
    print(f"done: {_best_summary(result)}; gated weights in {args.out}/best.pt "
          f"(dynprune val --weights {args.out}/best.pt --report {args.out}/report; "
          f"dynprune export --{role} {args.out}/best.pt)")
    note = keep_shortfall(result, args.keep, args.gate, not args.no_complexity, args.keep_on)
    if note:
        print(f"note: {note}")
    gated = (load_checkpoint(os.path.join(args.out, "best.pt")).get("metrics") or {})
    warning = accuracy_shortfall(gated, dense.get("metrics") or {}, args.keep, args.epochs, args.gate,
                                 distill=args.distill, base=base)
    if warning:
        print(f"warning: {warning}")
    return 0


def cmd_calibrate(args) -> int:
    import numpy as np

    from dynprune.calibration import calibrate
    from dynprune.checkpoint import model_from_checkpoint, save_atomic
    from dynprune.data import load_dataset
    from dynprune.data.dataset import DetectionDataset

    if (args.keep is None) == (args.flops is None):
        raise UsageError("give exactly one target, --keep (mean kept fraction) or --flops (fraction of dense)")
    measure, target = ("keep", args.keep) if args.keep is not None else ("flops", args.flops)
    model, ckpt = model_from_checkpoint(args.weights)
    if not model.gated:
        raise UsageError(f"{args.weights}: a dense or statically pruned checkpoint; calibrate a gated one "
                         "(from dynprune gate)")
    imgsz = _check_imgsz(args.imgsz or ckpt["imgsz"])
    data = args.data or ckpt.get("data")
    if not data:
        raise UsageError(f"{args.weights}: records no dataset; pass --data")
    trained = (ckpt.get("train_config") or {}).get("extra", {})
    spec = load_dataset(data, classes=args.classes or trained.get("classes"),
                        single_class=args.single_class or bool(trained.get("single_class")))
    # Thresholds are a property of the training distribution (ManiDP computes them on the
    # training set); a fixed random subset keeps the run short and repeatable.
    pick = np.random.default_rng(0).permutation(len(spec.train))[: args.images]
    ds = DetectionDataset([spec.train[i] for i in sorted(pick)], imgsz)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    before = ckpt.get("gate") or {}
    print(f"{args.weights}: calibrating {before.get('method', 'manidp')} gates to mean {measure} {target} "
          f"on {len(images)} training images of {data} ({imgsz} px)")
    result = calibrate(model, images, target, measure, log=print if args.verbose else (lambda s: None))
    out = args.out or os.path.join(os.path.dirname(args.weights) or ".",
                                   f"{os.path.splitext(os.path.basename(args.weights))[0]}_{measure}{target:g}.pt")
    gate = dict(before)
    if gate.get("mode") == "topk":
        gate["keep"] = result.knob
    # The metrics the checkpoint carries are the trained thresholds'; new thresholds change AP
    # (raccoon, group-1 gates moved from keep 0.479 to 0.50: AP50 0.683 -> 0.630), and export,
    # bench and serve's policy read these, so they are measured again on the val split.
    stale = ckpt.get("metrics") or {}
    metrics = None
    if spec.val:
        from dynprune.validate import run_validation

        measured = run_validation(model, spec.val, spec.names, imgsz)
        metrics = {"epoch": stale.get("epoch"), **{k: v for k, v in measured.items() if isinstance(v, (int, float))}}
        print(f"val ({len(spec.val)} images): AP50 {stale.get('ap50', float('nan')):.4f} -> {metrics['ap50']:.4f}, "
              f"AP50-95 {stale.get('ap50_95', float('nan')):.4f} -> {metrics['ap50_95']:.4f}, "
              f"mean keep {stale.get('keep_mean', float('nan')):.3f} -> {metrics.get('keep_mean', float('nan')):.3f}")
        lost = stale.get("ap50", 0.0) - metrics["ap50"]
        if lost > 0.02:
            # Measured on raccoon: group-8 gates moved from keep 0.44 up to 0.50 lost 17 AP50 points.
            why = ("channels the gates kept off all through training are switched on, and the layers after them "
                   "never learnt to use them" if metrics.get("keep_mean", 0.0) > stale.get("keep_mean", 1.0) else
                   "fewer channels than the gates were trained with")
            keep = f"{target:g}" if measure == "keep" else f"{metrics.get('keep_mean', target):.2f}"
            print(f"warning: AP50 fell {100 * lost:.1f} points at the new thresholds ({why}). Gates trained at the "
                  f"target hold AP better: dynprune gate --keep {keep} ...")
    else:
        print(f"{data} has no val split: the calibrated checkpoint records no metrics (the trained ones no "
              "longer hold)")
    ckpt.update(gate=gate, model={k: v.detach().cpu() for k, v in model.state_dict().items()}, metrics=metrics,
                calibration={**vars(result), "images": len(images), "data": data, "from": args.weights})
    save_atomic(ckpt, out)
    if not result.reachable:
        print(f"warning: {measure} {target} is out of these gates' reach; the closest is {result.achieved:.3f}. "
              "Channels whose saliency is exactly 0 are never kept: retrain the gates with a lower --sparsity "
              "or a higher --keep to get more.")
    print(f"realised on those images: mean keep {result.keep_mean:.3f}, mean FLOPs {result.flops_mean:.3f} of dense "
          f"({'keep factor' if gate.get('mode') != 'topk' else 'top-k ratio'} {result.knob:.4f}, "
          f"{result.steps} steps)\nwrote {out}  (dynprune val --weights {out})")
    return 0


def cmd_prune(args) -> int:
    from dynprune.checkpoint import load_checkpoint
    from dynprune.train.prune import prune_checkpoint

    if args.resume:
        raise UsageError("--resume: dynprune prune runs in one go and cannot be resumed; run it again")
    if not args.weights:
        raise UsageError("--weights is required: the dense checkpoint to prune (runs/dense/best.pt)")
    spec = _load_spec(args)
    dense = load_checkpoint(args.weights)
    _check_classes(args.weights, dense["names"], spec)
    cfg = _train_config(args, args.imgsz or dense["imgsz"], warmup_epochs=0.5)
    res = prune_checkpoint(args.weights, spec, cfg, method=args.method, flops=args.flops, params=args.params,
                           round_to=args.round_to, scope=args.scope, merge=args.merge)
    print(json.dumps({k: v for k, v in res.items() if k != "hidden"}, indent=2) if args.json else
          f"pruned model: {args.out}/best.pt ({res['flops_fraction']:.3f} of dense FLOPs, AP50 {res['ap50']:.4f})")
    return 0


def cmd_export(args) -> int:
    from dynprune.serve.bundle import export_bundle

    meta = export_bundle(_run_folder(args.o, "-o"), dynamic=args.dynamic, static=args.static, dense=args.dense,
                         conf=args.conf, iou=args.iou, hybrid=args.hybrid)
    print(f"bundle {args.o}: engines {sorted(meta['engines'])}, classes {meta['names']}, {meta['imgsz']} px")
    for name, e in meta["engines"].items():
        ap = f"AP50-95 {e['ap50_95']:.4f}" if "ap50_95" in e else "AP unknown"
        print(f"  {name:<8} {e['file']:<12} {e['gflops']:.3f} GFLOPs dense-equivalent, {ap}")
    return 0


def cmd_bench(args) -> int:
    from dynprune.serve.bench import run_bench

    if not (args.source or args.data):
        raise UsageError("give --source (video, camera, images) or --data (a labelled dataset, adds AP)")
    _run_folder(args.out)
    res = run_bench(args.bundle, args.source, args.data, args.frames, args.engines, args.out, args.device,
                    args.backend, cuda_graph=not args.no_cuda_graph, precision=args.precision,
                    adapt_threads=args.threads is None, sms=args.sms)
    print(f"written: {args.out}/bench.json, bench.csv, latency_vs_keep.png")
    return 0 if res["rows"] else 1


def cmd_tune(args) -> int:
    from dynprune.serve.tune import run_tune

    if not (args.source or args.data):
        raise UsageError("give --source (video, camera, images) or --data (a dataset) for the frames to tune on")
    run_tune(args.bundle, args.source, args.data, args.frames, args.engines, args.device, args.sms, args.precision)
    return 0


def cmd_serve(args) -> int:
    import logging

    from dynprune.serve.app import ServeOptions, serve

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    opts = ServeOptions(engine=args.engine, device=args.device, backend=args.backend, precision=args.precision,
                        cuda_graph=not args.no_cuda_graph,
                        max_frames=args.frames, loop=args.loop, json=args.json, save=args.save, show=args.show,
                        http=args.http, host=args.host, route_by_keep=args.route_by_keep,
                        adapt_threads=args.threads is None)
    res = serve(args.bundle, args.source, opts)
    import sys as _sys

    out = _sys.stderr if args.json == "-" else _sys.stdout
    print(f"served {res['frames']} frames in {res['wall_s']:.1f}s ({res['fps']:.1f} FPS); engines used "
          f"{res['frames_by_engine']}; switches {len(res['switches'])}; reconnects {res['reconnects']}", file=out)
    return 0


def validate_checkpoint(weights: str, data: Optional[str] = None, imgsz: Optional[int] = None, batch: int = 8,
                        device: str = "auto", classes=None, single_class: bool = False,
                        report_dir: Optional[str] = None) -> dict:
    """Everything ``dynprune val`` reports, as a dict."""
    from dynprune.checkpoint import model_from_checkpoint
    from dynprune.data import load_dataset
    from dynprune.flops import CostModel, count_parameters
    from dynprune.timing import measure_latency
    from dynprune.train.engine import pick_device
    from dynprune.validate import run_validation

    model, ckpt = model_from_checkpoint(weights)
    imgsz = _check_imgsz(imgsz or ckpt["imgsz"])
    data = data or ckpt.get("data")
    if not data:
        raise UsageError(f"{weights}: records no dataset; pass --data")
    if classes is None and not single_class:  # default: the classes the model was trained on
        trained = (ckpt.get("train_config") or {}).get("extra", {})
        classes, single_class = trained.get("classes"), bool(trained.get("single_class"))
    spec = load_dataset(data, classes=classes, single_class=single_class)
    _check_classes(weights, ckpt["names"], spec)
    dev = pick_device(device)
    model.to(dev)
    result = run_validation(model, spec.val, spec.names, imgsz, batch=batch, device=dev,
                            keep_predictions=report_dir is not None)
    cost = CostModel(model, imgsz)
    x = torch.full((1, 3, imgsz, imgsz), 114 / 255, device=dev)  # a letterbox-grey frame
    with torch.no_grad():
        lat = measure_latency(lambda: model(x), device=str(dev))
    result.update({
        "weights": weights, "data": data, "imgsz": imgsz, "images": len(spec.val), "kind": ckpt.get("kind"),
        "params_m": count_parameters(model) / 1e6, "gflops": cost.dense / 1e9, "device": str(dev),
        "latency_ms_b1": lat["p50_ms"],
    })
    if report_dir and "frame_flops" in result:
        from dynprune.report import write_gate_report

        result["report"] = write_gate_report(result, spec.val, report_dir)
    result.pop("predictions", None)
    return result


def cmd_val(args) -> int:
    result = validate_checkpoint(args.weights, args.data, args.imgsz, args.batch, args.device, args.classes,
                                 args.single_class, args.report)
    if args.json:
        slim = {k: v for k, v in result.items() if k != "frame_flops"}
        print(json.dumps(slim, indent=2))
        return 0
    print(f"{result['weights']}  on {result['data']} val ({result['images']} images, {result['imgsz']} px)")
    print(f"  precision {result['precision']:.3f}  recall {result['recall']:.3f}  "
          f"AP50 {result['ap50']:.4f}  AP50-95 {result['ap50_95']:.4f}")
    print(f"  params {result['params_m']:.3f} M  dense GFLOPs {result['gflops']:.3f}  "
          f"batch-1 latency {result['latency_ms_b1']:.2f} ms on {result['device']}")
    if "flops_mean" in result:
        print(f"  per-frame FLOPs / dense: mean {result['flops_mean']:.3f}  p5 {result['flops_p5']:.3f}  "
              f"p50 {result['flops_p50']:.3f}  p95 {result['flops_p95']:.3f}  mean keep {result['keep_mean']:.3f}")
        print("  keep ratio per block (hidden1, hidden2): " +
              " ".join(f"{a:.2f}/{b:.2f}" for a, b in result["layer_keep"]))
        if "report" in result:
            print(f"  plots: {', '.join(result['report'].values())}")
    return 0


def cmd_doctor(args) -> int:
    import logging

    from dynprune.doctor import format_report, report

    # the probes' own log lines (a Triton trial's verdict) belong in the report, not above it
    logging.basicConfig(level=logging.ERROR)
    say = (lambda line: print(line, file=sys.stderr)) if not args.json else (lambda _: None)
    sections = report(args.bundle, log=say)
    if args.json:
        print(json.dumps({s["name"]: s for s in sections}, indent=1, default=str))
    else:
        print(format_report(sections))
    return 0


def cmd_demo(args) -> int:
    from dynprune.demo import run_demo

    return run_demo(_run_folder(args.out), quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    from dynprune.serve.bundle import ENGINE_NAMES, GATED_ENGINES

    parser = Parser(
        prog="dynprune",
        description="Dynamic per-frame channel pruning for real-time one-class detection on NVIDIA Jetson. "
                    "Start with 'dynprune demo' (built-in data, CPU, a few minutes).",
    )
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for PyTorch and the compiled runtime (default: all cores; serve and "
                             "bench then drop to fewer while other processes keep the cores busy)")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also DYNPRUNE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole flow on built-in synthetic data, end to end (no downloads, CPU)")
    p.add_argument("--out", default="runs/demo", help="where runs, weights and the report go")
    p.add_argument("--quick", action="store_true", help="a much shorter run, to check an install")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("doctor", help="what this machine has for dynprune (GPU, Triton, TensorRT, cameras, Jetson "
                                      "clocks) and, with a bundle, which engines serve can run here and why")
    p.add_argument("bundle", nargs="?", help="a bundle folder (from dynprune export)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("train", help="train a dense one-class detector")
    _add_data_args(p)
    p.add_argument("--size", default="nano", choices=["nano", "small"], help="model size")
    p.add_argument("--pretrained", help="your own weights to start from (dynprune checkpoint or state_dict)")
    p.add_argument("--out", default="runs/dense", help="run folder (last.pt, best.pt)")
    _add_train_args(p, epochs=60, lr=2e-3)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("gate", help="train ManiDP (or FBS) gates into a dense checkpoint, or into a pruned one "
                                    "(the hybrid engine)")
    p.add_argument("--weights", help="the dense checkpoint (from dynprune train), or a pruned one (from dynprune "
                                     "prune: the hybrid engine); with --resume, the run's")
    _add_data_args(p)
    p.add_argument("--keep", type=fraction, default=0.5, help="target mean fraction of hidden channels kept")
    p.add_argument("--gate", default="manidp", choices=["manidp", "fbs"],
                   help="manidp: thresholds + complexity-weighted sparsity + similarity; fbs: top-k baseline")
    p.add_argument("--group", type=int, default=DEFAULT_GATE_GROUP, choices=[1, 8, 16],
                   help="gate channels in groups of 8 (default), 16 or 1: whole groups let the GPU kernels read "
                        "kept channels as vectors")
    p.add_argument("--sparsity", type=nonneg_float, default=0.1,
                   help="sparsity loss weight lambda' (ManiDP code: 0.1)")
    p.add_argument("--similarity", type=nonneg_float, default=0.1,
                   help="similarity loss weight gamma (ManiDP code: 0.1)")
    p.add_argument("--beta", type=nonneg_float, default=1.0, help="complexity weight exponent (ManiDP code: 1.0)")
    p.add_argument("--no-complexity", action="store_true", help="ablation: weight every image equally")
    p.add_argument("--gate-lr-mult", type=positive_float, default=10.0,
                   help="learning-rate multiplier of the new gates")
    p.add_argument("--keep-on", default=DEFAULT_KEEP_ON, choices=["frames", "mean"],
                   help="frames (default): thresholds at the per-frame saliency quantile, so the mean per-frame "
                        "keep is --keep; mean: ManiDP's k-th largest mean saliency (frames keep less than --keep)")
    p.add_argument("--schedule", default=DEFAULT_SCHEDULE, choices=sorted(SCHEDULES),
                   help="settle: thresholds reach the target at 65%% of the epochs and the rest fine-tunes at it; "
                        "paper: ManiDP's official schedule, at the target only in the last epoch")
    p.add_argument("--distill", type=nonneg_float, default=DISTILL_WEIGHT, metavar="W",
                   help=f"weight of a loss pulling each block's output toward the --weights model's (default "
                        f"{DISTILL_WEIGHT:g}; 0: off)")
    p.add_argument("--teacher", metavar="CKPT",
                   help="the model --distill pulls toward (default: --weights itself); for gates on a pruned model, "
                        "the dense model it was pruned from may teach more than it")
    p.add_argument("--threshold-every", type=nonneg_int, default=0, metavar="N",
                   help="reset thresholds every N steps instead of every epoch (smoother on short schedules)")
    p.add_argument("--out", default="runs/gate")
    _add_train_args(p, epochs=None, lr=5e-4,
                    epochs_help="default: 20, more on small datasets so that training sees at least 3200 images")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("calibrate", help="move a gated checkpoint's thresholds so that the mean per-frame keep "
                                         "ratio or FLOPs hits a target (no retraining)")
    p.add_argument("--weights", required=True, help="a gated checkpoint (from dynprune gate)")
    _add_data_args(p, required=False)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--keep", type=fraction, help="target mean fraction of hidden channels kept per frame")
    target.add_argument("--flops", type=fraction, help="target mean FLOPs per frame, as a fraction of dense")
    p.add_argument("--images", type=positive_int, default=128, help="training images to calibrate on")
    p.add_argument("--imgsz", type=positive_int, default=None, help="input size (default: the checkpoint's)")
    p.add_argument("--out", help="output checkpoint (default: next to --weights, e.g. best_keep0.5.pt)")
    p.add_argument("--verbose", action="store_true", help="print every bisection step")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("prune", help="static pruning (EFFP or a baseline) to a FLOPs/parameter target")
    p.add_argument("--weights", help="the dense checkpoint (from dynprune train)")
    _add_data_args(p)
    p.add_argument("--method", default="effp", choices=["effp", "l1", "slim", "fmcluster"])
    p.add_argument("--flops", type=fraction, default=0.5, help="target FLOPs as a fraction of dense")
    p.add_argument("--params", type=fraction, default=None, help="target parameters as a fraction of dense")
    p.add_argument("--round-to", type=positive_int, default=8,
                   help="kept widths are multiples of this (TensorRT likes 8)")
    p.add_argument("--scope", default="global", choices=["global", "local"],
                   help="l1: one global threshold, or the same ratio in every layer")
    p.add_argument("--merge", action="store_true",
                   help="Neuron Merging: compensate each removed channel in the layer that reads it, through its most "
                        "similar kept channel, before fine-tuning (data-free)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default="runs/prune")
    _add_train_args(p, epochs=20, lr=1e-3)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("export", help="a deployable bundle: dynamic, hybrid, static (ONNX) and dense engines + "
                                      "metadata")
    p.add_argument("--dynamic", help="gates trained into the dense model (dynprune gate --weights runs/dense/best.pt)")
    p.add_argument("--hybrid", help="gates trained into a pruned model (dynprune gate --weights runs/prune/best.pt)")
    p.add_argument("--static", help="pruned checkpoint (dynprune prune; default: the one the --hybrid gates were "
                                    "trained into)")
    p.add_argument("--dense", help="dense checkpoint (default: the one the --dynamic gates were trained into)")
    p.add_argument("-o", required=True, metavar="DIR", help="bundle folder to write")
    p.add_argument("--conf", type=probability, default=0.25, help="score threshold recorded for serving")
    p.add_argument("--iou", type=probability, default=0.6, help="NMS IoU threshold recorded for serving")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="dense vs static vs dynamic vs hybrid FPS, latency, keep ratio and AP on the same "
                                     "frames")
    p.add_argument("bundle", help="a bundle folder (dynprune export)")
    p.add_argument("--source", help="frames: video file, camera, folder or glob of images, stream URI")
    p.add_argument("--data", help="a labelled dataset: its val images are the frames, and AP is reported")
    p.add_argument("--frames", type=nonneg_int, default=200, help="frames to measure (0: all the source has)")
    p.add_argument("--engines", nargs="+", choices=list(ENGINE_NAMES))
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cpu", "reference"],
                   help="how the dynamic and hybrid engines run gated blocks (auto: Triton on a GPU, else compiled "
                        "CPU blocks)")
    p.add_argument("--precision", default="fp16", choices=["fp16", "int8", "fp32"],
                   help="TensorRT plan precision; on a GPU also the PyTorch engines' (int8 runs them in fp16)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on a GPU, launch the PyTorch engines' kernels one by one instead of replaying a CUDA graph")
    p.add_argument("--sms", type=positive_int, metavar="N",
                   help="run every GPU kernel on at most N SMs (a CUDA green context): a Jetson's regime on a big "
                        "GPU, e.g. 8 for an Orin Nano/NX, 16 for an AGX Orin; checked and reported")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("tune", help="time the GPU kernels' tile sizes on this GPU (and SM count) for a bundle's gated "
                                    "engines; serve and bench use them from then on")
    p.add_argument("bundle", help="a bundle folder (dynprune export)")
    p.add_argument("--source", help="frames: video file, camera, folder or glob of images, stream URI")
    p.add_argument("--data", help="a dataset: its val images are the frames")
    p.add_argument("--frames", type=positive_int, default=8,
                   help="frames to look at; the one whose keep is the median is tuned on")
    p.add_argument("--engines", nargs="+", choices=list(GATED_ENGINES))
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"], help="the precision serve runs in")
    p.add_argument("--sms", type=positive_int, metavar="N",
                   help="tune for at most N SMs (a CUDA green context): what bench --sms N then runs with")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("serve", help="run a camera or stream through the fastest engine that holds the AP bar")
    p.add_argument("bundle", help="a bundle folder (dynprune export)")
    p.add_argument("--source", required=True,
                   help="csi://0, /dev/video0, 0, file.mp4, folder/, 'imgs/*.jpg', rtsp://..., or a GStreamer pipeline")
    p.add_argument("--engine", default="auto", choices=["auto", *ENGINE_NAMES])
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cpu", "reference"],
                   help="how the dynamic and hybrid engines run gated blocks (auto: Triton on a GPU, else compiled "
                        "CPU blocks)")
    p.add_argument("--precision", default="fp16", choices=["fp16", "int8", "fp32"],
                   help="TensorRT plan precision; on a GPU also the PyTorch engines' (int8 runs them in fp16)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on a GPU, launch the PyTorch engines' kernels one by one instead of replaying a CUDA graph")
    p.add_argument("--frames", type=positive_int, help="stop after N frames")
    p.add_argument("--loop", action="store_true", help="loop a file or folder source")
    p.add_argument("--json", metavar="FILE", help="detections as JSON lines ('-' for stdout)")
    p.add_argument("--save", metavar="OUT.mp4", help="annotated video (finalised on Ctrl-C)")
    p.add_argument("--show", action="store_true", help="a window (needs a display and OpenCV with GUI)")
    p.add_argument("--http", type=port, metavar="PORT", help="live preview, /stats and /metrics on this port")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the preview binds to (0.0.0.0 opens it, unauthenticated, to the network)")
    p.add_argument("--route-by-keep", action="store_true",
                   help="send a frame to the static engine when the gates' keep ratio is above break-even")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("val", help="AP50, AP50-95, precision/recall, params, GFLOPs, latency of a checkpoint")
    p.add_argument("--weights", required=True, help="a checkpoint (best.pt, last.pt)")
    _add_data_args(p, required=False)
    p.add_argument("--imgsz", type=positive_int, help="default: the checkpoint's")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--report", metavar="DIR", help="gated models: write FLOPs histogram and frame grid PNGs here")
    p.set_defaults(func=cmd_val)
    return parser


def _explicit_flags(parser: argparse.ArgumentParser, argv: List[str]) -> set:
    """The ``dest`` of every option the user typed (``--resume`` compares only those with the checkpoint)."""
    actions = list(parser._actions)
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                actions += sp._actions
    given = set()
    for a in actions:
        for opt in a.option_strings:
            if any(t == opt or t.startswith(opt + "=") for t in argv):
                given.add(a.dest)
    return given


def _debug_wanted(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("DYNPRUNE_DEBUG", "") not in ("", "0")


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def error_message(e: BaseException) -> Tuple[int, str]:
    """(exit status, one-line message) for an exception that ends a command.

    Mistakes in what the user gave (files, flags, data, bundles) are ``ValueError`` subclasses
    or ``OSError`` s that name their file: status 2. Anything else is a fault of dynprune or of
    the machine: status 1, with a pointer to ``--debug`` for the traceback.
    """
    from dynprune.serve.sources import SourceError

    if isinstance(e, (ValueError, SourceError)):
        return 2, _one_line(e)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return 2, f"{where}{e.strerror or _one_line(e)}"
    return 1, (f"unexpected {type(e).__name__}: {_one_line(e)} (rerun with --debug, or DYNPRUNE_DEBUG=1, for the "
               "traceback, and please report it)")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = _explicit_flags(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from dynprune.runtime import configure_threads

    configure_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"dynprune {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our stdout stopped reading: not an error of ours
        from dynprune.serve.outputs import quiet_stdout

        quiet_stdout()
        return 0
    except Exception as e:
        if _debug_wanted(args):
            raise
        code, message = error_message(e)
        print(f"dynprune {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
