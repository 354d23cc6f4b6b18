"""``dynprune serve``: frames in, boxes out, as fast as the board allows."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from dynprune.runtime import ThreadGovernor
from dynprune.serve.bundle import load_bundle
from dynprune.serve.engines import load_available_engines, load_engines, pick_device
from dynprune.serve.http import is_loopback
from dynprune.serve.outputs import JsonLines, VideoOutput, Window, annotate, check_outputs, detection_record
from dynprune.serve.policy import FallbackPolicy
from dynprune.serve.sources import open_source

log = logging.getLogger("dynprune.serve")


@dataclass
class ServeOptions:
    engine: str = "auto"  # auto | dense | static | dynamic | hybrid
    device: str = "auto"
    backend: str = "auto"  # dynamic and hybrid engines: auto | triton | cpu | reference
    precision: str = "fp16"  # TensorRT: fp16 | int8 | fp32; PyTorch engines on a GPU: fp16 | fp32
    cuda_graph: bool = True  # PyTorch engines on a GPU replay one CUDA graph per frame
    max_frames: Optional[int] = None
    loop: bool = False
    json: Optional[str] = None  # a path, or "-" for stdout
    save: Optional[str] = None
    show: bool = False
    http: Optional[int] = None  # port
    host: str = "127.0.0.1"
    ap_margin: float = 0.02
    route_by_keep: bool = False
    probe_every: int = 100
    adapt_threads: bool = True  # CPU engines: choose the thread count by trial (dynprune/runtime.py)


def serve(bundle_dir: str, source_uri: str, opts: ServeOptions, stop: Optional[threading.Event] = None,
          source=None) -> Dict[str, Any]:
    """Run the loop until the source ends, ``max_frames``, SIGINT/SIGTERM or ``stop`` is set."""
    bundle = load_bundle(bundle_dir)
    names = bundle["names"]
    device = pick_device(opts.device)
    available = list(bundle["engines"])
    if opts.engine != "auto" and opts.engine not in available:
        raise ValueError(f"--engine {opts.engine}: the bundle has {available}")
    check_outputs(opts)
    if opts.engine == "auto":
        engines, skipped = load_available_engines(bundle, available, device, opts.backend, opts.precision,
                                                  opts.cuda_graph)
        for name, why in skipped.items():
            log.warning("engine %s left out: %s; serving with %s", name, why, sorted(engines))
    else:
        engines = load_engines(bundle, [opts.engine], device, opts.backend, opts.precision, opts.cuda_graph)
    wanted = list(engines)
    ap = {e: bundle["engines"][e].get("ap50_95") for e in wanted}
    policy = FallbackPolicy(wanted, {k: v for k, v in ap.items() if v is not None}, opts.ap_margin,
                            route_by_keep=opts.route_by_keep, probe_every=opts.probe_every)
    src = source or open_source(source_uri, loop=opts.loop)
    stop = stop or threading.Event()
    outputs: List[Any] = []
    jsonl = JsonLines(opts.json) if opts.json else None
    video = VideoOutput(opts.save) if opts.save else None
    window = Window() if opts.show else None
    http_state = server = None
    if opts.http is not None:
        from dynprune.serve.http import LiveState, make_server

        http_state = LiveState()
        server = make_server(http_state, opts.host, opts.http)
        log.warning("preview on http://%s:%d/ (stats /stats, metrics /metrics)", opts.host, server.server_port)
        if not is_loopback(opts.host):
            log.warning("--host %s: the preview has no authentication, so anyone who can reach this machine on port "
                        "%d sees the camera; bind to 127.0.0.1 and use an SSH tunnel unless the network is yours",
                        opts.host, server.server_port)
    outputs = [o for o in (jsonl, video, window) if o is not None]

    previous = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame):
            log.warning("signal %d: finishing the current frame and closing outputs", signum)
            stop.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)

    governor = ThreadGovernor(torch.get_num_threads()) if opts.adapt_threads else None
    frame_times: deque = deque(maxlen=60)
    stage_ema: Dict = {}
    counts: Dict[str, int] = {}
    keep_values: List[float] = []
    n = 0
    # A file or folder read ahead by one frame lets the whole-frame GPU path upload it while the current
    # frame runs; a live camera has no next frame yet (its grab thread already overlaps capture).
    lookahead = any(e.frame_path is not None for e in engines.values()) and not getattr(src, "live", False)
    pending = None
    t_start = time.perf_counter()
    try:
        with torch.inference_mode():
            while not stop.is_set() and (opts.max_frames is None or n < opts.max_frames):
                frame = pending if pending is not None else src.read()
                if frame is None:
                    break
                last = opts.max_frames is not None and n + 1 >= opts.max_frames
                pending = src.read() if lookahead and not last else None
                name = policy.choose()
                governed = governor is not None and engines[name].torch_cpu_threads
                threads = governor.before_frame(name) if governed else 0
                result = engines[name](frame.image, pending.image if pending is not None else None)
                if governed:
                    governor.after_frame(name, threads, result.total_ms)
                policy.record(name, result.total_ms, result.keep_ratio)
                n += 1
                counts[name] = counts.get(name, 0) + 1
                if result.keep_ratio is not None:
                    keep_values.append(result.keep_ratio)
                now = time.perf_counter()
                frame_times.append(now)
                fps = (len(frame_times) - 1) / (frame_times[-1] - frame_times[0]) if len(frame_times) > 1 else 0.0
                for stage, ms in result.timings.items():
                    key = (name, stage.replace("_ms", ""))
                    stage_ema[key] = ms if key not in stage_ema else 0.9 * stage_ema[key] + 0.1 * ms
                if jsonl and not jsonl.write(detection_record(frame, result, names)):
                    log.warning("--json %s: the reader went away; stopping", opts.json)
                    stop.set()
                if video or window or http_state:
                    shown = annotate(frame.image, result, names, fps)
                    if video:
                        video.write(shown)
                    if window and not window.show(shown):
                        stop.set()
                    if http_state:
                        import cv2

                        ok, jpg = cv2.imencode(".jpg", shown, [cv2.IMWRITE_JPEG_QUALITY, 80])
                        http_state.counters.update(frames_by_engine=dict(counts), switches=len(policy.switches),
                                                   reconnects=getattr(src, "reconnects", 0), stage_ms=dict(stage_ema))
                        http_state.publish(jpg.tobytes() if ok else None,
                                           {"fps": fps, "engine": name, "keep_ratio": result.keep_ratio,
                                            "frames": n, "latency_ms": result.total_ms})
    finally:
        for o in outputs:
            o.close()
        src.close()
        if server is not None:
            http_state.close()
            server.shutdown()
            server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    wall = time.perf_counter() - t_start
    return {"frames": n, "wall_s": wall, "fps": n / wall if wall > 0 else 0.0, "frames_by_engine": counts,
            "switches": policy.switches, "active": policy.active, "reconnects": getattr(src, "reconnects", 0),
            "keep_mean": float(sum(keep_values) / len(keep_values)) if keep_values else None,
            "cpu_threads": governor.current if governor else torch.get_num_threads(),
            "thread_switches": governor.switches if governor else [],
            "engines": {k: e.description for k, e in engines.items()}}
