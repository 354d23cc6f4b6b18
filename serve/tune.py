"""``dynprune tune``: the Triton gather convolutions' tiles timed on this GPU, at this SM count.

The default tiles were chosen on an H100's 132 SMs (:func:`dynprune.kernels.conv_tiles.default_tile`);
a Jetson has 8 or 16 and wants others. For each gated engine of a bundle this runs the frames
through the network, takes the frame whose keep is the median as the one to tune on, records its
gather convolutions with their real kept lists, and times every candidate tile of every distinct
layer in CUDA graphs (:func:`~dynprune.kernels.conv_tiles.tune_calls`). The fastest correct tile
of each layer is kept in ``<cache>/conv_tiles.json`` under this GPU, Triton version and SM count;
``serve`` and ``bench`` use it from then on, with and without ``--sms``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from dynprune.kernels import conv_tiles
from dynprune.serve.bundle import GATED_ENGINES, load_bundle
from dynprune.serve.engines import DynamicEngine, pick_device
from dynprune.sm_limit import checked_limit
from dynprune.timing import graph_ms


class TuneError(ValueError):
    """The run cannot tune anything here (no GPU, no gated engine): a usage error, exit 2."""


def median_frame(engine: DynamicEngine, images: List[np.ndarray]) -> torch.Tensor:
    """The network input of the frame whose mean keep is the median of ``images``' (each runs once)."""
    inputs, keeps = [], []
    widths = engine.widths.float()
    with torch.inference_mode():
        for image in images:
            x = engine.input(image)[0].to(engine.device, engine.dtype)
            engine.net(x)
            keeps.append(float((engine.net.kept_counts()[0].float().cpu() / widths).mean()))
            inputs.append(x)
    return inputs[keeps.index(statistics.median_low(keeps))]


def run_tune(bundle_dir: str, source: Optional[str] = None, data: Optional[str] = None, frames: int = 8,
             engines: Optional[List[str]] = None, device: str = "auto", sms: Optional[int] = None,
             precision: str = "fp16", log: Callable[[str], None] = print,
             timer: Optional[Callable[[Callable[[], Any]], float]] = None) -> Dict[str, Any]:
    """Tune the bundle's gated engines on ``device`` (a CUDA GPU) and keep the tiles; returns what
    was kept: ``{"table", "file", "engines": {name: {"layers": [...], "per_frame_ms": {"default",
    "tuned"}}}}`` (the sums of the convolutions' GPU times a frame, not a frame's latency)."""
    from dynprune.serve.bench import load_frames

    bundle = load_bundle(bundle_dir)
    dev = pick_device(device)
    if dev.type != "cuda":
        raise TuneError(f"dynprune tune times the Triton kernels on a CUDA GPU, and the device is {dev}: on the CPU "
                        "the compiled blocks choose their forms as they run (nothing to tune)")
    which = [n for n in (engines or GATED_ENGINES) if n in bundle["engines"] and n in GATED_ENGINES]
    if not which:
        raise TuneError(f"{bundle_dir}: no gated engine to tune (it has {sorted(bundle['engines'])}); export one "
                        "with --dynamic or --hybrid")
    limit, _ = checked_limit(sms, dev.index or 0, log)
    images = load_frames(source, data, frames)[0]
    result: Dict[str, Any] = {"engines": {}}
    with limit, torch.inference_mode():
        table = conv_tiles.gpu_table_key(dev, conv_tiles.sms_in_use(dev))
        log(f"tuning the gather convolutions of {', '.join(which)} for {table} on the kept lists of the median-keep "
            f"frame of {len(images)}")
        for name in which:
            engine = DynamicEngine(str(Path(bundle["root"]) / bundle["engines"][name]["file"]), dev, bundle["conf"],
                                   bundle["iou"], backend="triton", precision=precision, cuda_graph=False,
                                   name=name, device_frames=False)
            x = median_frame(engine, images)
            log(f"{name}:")
            tuned = conv_tiles.tune_network(lambda: engine.net(x), dev,  # noqa: B023 (called at once)
                                            progress=lambda line: log("  " + line),
                                            timer=timer or graph_ms)
            default = sum(t.launches * t.default_ms for t in tuned)
            best = sum(t.launches * t.ms for t in tuned)
            log(f"{name}: its convolutions take {default:.3f} ms of GPU time a frame with the default tiles, "
                f"{best:.3f} ms tuned ({default / best:.2f}x)")
            result["engines"][name] = {"layers": [t.as_json() for t in tuned],
                                       "per_frame_ms": {"default": default, "tuned": best}}
    path = conv_tiles.tiles_file()
    log(f"kept in {path} for {table}: serve and bench use them on this GPU" + (f" with --sms {sms}" if sms else ""))
    return {"table": table, "file": str(path), **result}
