"""Engines behind one interface: dense (PyTorch), static (TensorRT; without it PyTorch on a CUDA GPU,
ONNX Runtime elsewhere), and
dynamic and hybrid (gates on the dense or on the statically pruned model: Triton gather kernels on
CUDA; elsewhere the CPU runtime, compiled C blocks).

``engine(frame_bgr)`` returns a :class:`Result`: boxes in image pixels, scores, labels, the
latency split into pre-process / gates / network / post-process, and for the dynamic engine
the frame's keep ratio and FLOPs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from dynprune.boxes import postprocess
from dynprune.checkpoint import model_from_checkpoint
from dynprune.letterbox import LetterboxInput
from dynprune.serve.bundle import BundleError
from dynprune.serve.frame_path import DeviceFramePath

log = logging.getLogger("dynprune.serve")


@dataclass
class Result:
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    timings: Dict[str, float] = field(default_factory=dict)  # milliseconds
    keep_ratio: Optional[float] = None
    gflops: Optional[float] = None
    engine: str = ""

    @property
    def total_ms(self) -> float:
        return sum(self.timings.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    """Common pipeline: letterbox -> network -> NMS -> boxes back in image pixels."""

    name = "engine"

    def __init__(self, imgsz: int, conf: float, iou: float, device: torch.device) -> None:
        self.imgsz, self.conf, self.iou, self.device = imgsz, conf, iou, device
        self.input = LetterboxInput(imgsz)  # buffers kept from frame to frame
        self.description = ""

    @property
    def torch_cpu_threads(self) -> bool:
        """Whether the network runs on PyTorch's CPU threads (so the thread governor applies)."""
        return self.device.type == "cpu" and not isinstance(self, (OnnxEngine, TensorRTEngine))

    #: The whole frame on the device (serve/frame_path.py), set by the PyTorch engines on a CUDA GPU.
    frame_path = None

    def network(self, x: torch.Tensor):
        raise NotImplementedError

    def _frames_on_device(self, cuda_graph: bool) -> None:
        """Run the whole frame on the GPU (serve/frame_path.py) through ``self.device_network``."""
        self.frame_path = DeviceFramePath(self.device_network, self.imgsz, self.device, self.conf, self.iou,
                                          cuda_graph=cuda_graph)
        self.description += "; the whole frame on the GPU"

    def frame_extras(self, extras: Optional[np.ndarray]) -> Dict[str, Any]:
        """The Result fields the device frame path's extras give (a gated engine's keep and FLOPs)."""
        return {"gflops": getattr(self, "flops", None)}

    def _device_frame(self, image: np.ndarray, ahead: Optional[np.ndarray]) -> Result:
        self.frame_path.set_conf(self.conf)
        dets, extras, timings = self.frame_path(image, ahead)
        return Result(dets[:, :4], dets[:, 4], dets[:, 5].astype(np.int64), {**timings, "gates_ms": 0.0},
                      engine=self.name, **self.frame_extras(extras))

    def __call__(self, image: np.ndarray, ahead: Optional[np.ndarray] = None) -> Result:
        """Detections for ``image``. ``ahead``: the next frame where the caller has it already; the whole-
        frame GPU path uploads it while this one runs (the other paths ignore it)."""
        if self.frame_path is not None:
            return self._device_frame(image, ahead)
        t0 = time.perf_counter()
        x, lb = self.input(image)
        x = x.to(self.device)
        _sync(self.device)
        t1 = time.perf_counter()
        boxes, scores, extra = self.network(x)
        _sync(self.device)
        t2 = time.perf_counter()
        det = postprocess(boxes, scores, self.conf, self.iou)[0]
        out_boxes = lb.to_image(det["boxes"].float().cpu().numpy())
        t3 = time.perf_counter()
        gates_ms = extra.pop("gates_ms", 0.0)
        timings = {"preprocess_ms": (t1 - t0) * 1e3, "gates_ms": gates_ms,
                   "network_ms": (t2 - t1) * 1e3 - gates_ms, "postprocess_ms": (t3 - t2) * 1e3}
        return Result(out_boxes, det["scores"].float().cpu().numpy(), det["labels"].cpu().numpy(), timings,
                      engine=self.name, **extra)


def network_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The PyTorch engines' arithmetic: fp16 on a GPU unless fp32 is asked for (int8 is a
    TensorRT precision; PyTorch runs it as fp16), fp32 on the CPU."""
    if precision not in ("fp16", "int8", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; choose fp16, int8 or fp32")
    return torch.float16 if device.type == "cuda" and precision != "fp32" else torch.float32


class DenseEngine(Engine):
    """A dense or statically pruned PyTorch model, BatchNorm folded; on a GPU in fp16 and
    replayed from a CUDA graph."""

    name = "dense"

    def __init__(self, checkpoint: str, device: torch.device, conf: float = 0.25, iou: float = 0.6,
                 name: str = "dense", precision: str = "fp16", cuda_graph: bool = True,
                 device_frames: bool = True) -> None:
        from dynprune.compact import dense_inference_model
        from dynprune.flops import count_flops
        from dynprune.serve.cuda_graph import GraphedForward

        model, ckpt = model_from_checkpoint(checkpoint)
        super().__init__(ckpt["imgsz"], conf, iou, device)
        self.name = name
        self.dtype = network_dtype(device, precision)
        self.model = dense_inference_model(model).to(device=device, dtype=self.dtype)
        self.flops = count_flops(model, self.imgsz) / 1e9
        self.graphed = GraphedForward(self.model, enabled=cuda_graph)
        self.description = f"PyTorch on {device} ({str(self.dtype).replace('torch.', '')})"
        if device_frames and device.type == "cuda":
            self._frames_on_device(cuda_graph)

    def device_network(self, x: torch.Tensor):
        """The network for the device frame path: ``(boxes, scores, None)``, all on the device."""
        boxes, logits = self.model(x.to(self.dtype))
        return boxes.float(), logits.float().sigmoid(), None

    @torch.inference_mode()
    def network(self, x: torch.Tensor):
        boxes, logits = self.graphed(x.to(self.dtype))
        return boxes.float(), logits.float().sigmoid(), {"gflops": self.flops}


class OnnxEngine(Engine):
    """The static model through ONNX Runtime (CUDA provider where available, else CPU)."""

    name = "static"

    def __init__(self, onnx_path: str, imgsz: int, conf: float = 0.25, iou: float = 0.6,
                 gflops: Optional[float] = None, threads: Optional[int] = None) -> None:
        import onnxruntime as ort

        super().__init__(imgsz, conf, iou, torch.device("cpu"))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # ORT's worker threads busy-wait after each run by default; in a serving loop that
        # steals the cores from capture, letterboxing and NMS (measured on 2 cores: the
        # pre-process of the static engine took 7.5 ms instead of 0.6 ms).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        if not Path(onnx_path).is_file():
            raise BundleError(f"{onnx_path}: missing from the bundle; export the bundle again (dynprune export)")
        try:
            self.onnx_runtime = ort.InferenceSession(onnx_path, opts, providers=providers)
        except Exception as e:  # ONNX Runtime's InvalidProtobuf, Fail, ... carry no common base class
            raise BundleError(f"{onnx_path}: not a loadable ONNX model ({type(e).__name__}); the file is damaged or "
                              "truncated: copy it again or export the bundle again (dynprune export)") from e
        self.flops = gflops
        self.description = f"ONNX Runtime ({self.onnx_runtime.get_providers()[0]})"

    def network(self, x: torch.Tensor):
        boxes, scores = self.onnx_runtime.run(None, {"images": x.numpy()})
        return torch.from_numpy(boxes), torch.from_numpy(scores), {"gflops": self.flops}


class TensorRTEngine(Engine):
    name = "static"

    def __init__(self, plan: str, imgsz: int, conf: float = 0.25, iou: float = 0.6,
                 gflops: Optional[float] = None) -> None:
        from dynprune.serve.tensorrt_engine import TensorRTRunner

        super().__init__(imgsz, conf, iou, torch.device("cuda"))
        self.runner = TensorRTRunner(plan)
        self.flops = gflops
        self.description = f"TensorRT ({Path(plan).name})"

    @torch.inference_mode()
    def network(self, x: torch.Tensor):
        boxes, scores = self.runner(x)
        return boxes, scores, {"gflops": self.flops}


class DynamicEngine(Engine):
    """The gated model on compact activations; reports each frame's keep ratio and FLOPs.

    ``name`` is ``dynamic`` for gates on the dense model and ``hybrid`` for gates on a statically
    pruned one: the same execution, on the narrower widths the pruned checkpoint records."""

    name = "dynamic"

    def __init__(self, checkpoint: str, device: torch.device, conf: float = 0.25, iou: float = 0.6,
                 backend: str = "auto", profile_gates: bool = True, precision: str = "fp16",
                 cuda_graph: bool = True, name: str = "dynamic", device_frames: bool = True) -> None:
        from dynprune.compact import CompactDetector
        from dynprune.flops import CostModel
        from dynprune.serve.cuda_graph import GraphedForward

        model, ckpt = model_from_checkpoint(checkpoint)
        self.net = CompactDetector(model, backend=backend, device=device)
        if self.net.device != device:
            log.warning("%s engine runs on the CPU: %s", name, self.net.backend_reason)
            device = self.net.device
        super().__init__(ckpt["imgsz"], conf, iou, device)
        self.name = name
        self.cost = CostModel(model, self.imgsz)
        self.widths = torch.tensor([[b.h1, b.h2] for b in model.blocks], dtype=torch.float64)
        # The CPU backends run float32; the Triton path runs fp16 (or fp32) and, having no
        # host sync, replays from one CUDA graph whatever each frame keeps.
        self.dtype = network_dtype(device, precision) if self.net.backend == "triton" else torch.float32
        self.net.to(self.dtype)
        self.graphed = GraphedForward(self._forward_with_counts, enabled=cuda_graph and self.net.backend == "triton")
        # Timing the gates alone needs a host clock around them: cheap on the CPU, a sync on CUDA.
        self.profile_gates = profile_gates and device.type == "cpu"
        for b in self.net.blocks:
            b.profile = self.profile_gates
        self.description = f"{self.net.backend_reason} ({str(self.dtype).replace('torch.', '')})"
        if self.net.backend == "triton" and any(b.kept_run(g, w) == 1 for b in self.net.blocks
                                                for g, w in ((b.gate1, b.h1), (b.gate2, b.h2))):
            hint = ("gates of single channels: the GPU kernels gather them 2 bytes at a time; gates trained with "
                    "--group 8 are read as 16-byte vectors (the network about 1.2x faster on an H100)")
            log.warning("%s engine: %s", name, hint)
            self.description += f"; {hint}"
        if self.net.backend == "triton" and device.type == "cuda":
            from dynprune.kernels.conv_tiles import tuning_state

            self.description += f"; kernel tiles: {tuning_state(device)}"
            if device_frames:
                self._frames_on_device(cuda_graph)

    def device_network(self, x: torch.Tensor):
        """The network for the device frame path: ``(boxes, scores, kept (blocks, 2))``, all on the device."""
        boxes, logits, kept = self._forward_with_counts(x.to(self.dtype))
        return boxes.float(), logits.float().sigmoid(), kept[0]

    def _frames_on_device(self, cuda_graph: bool) -> None:
        """Run the whole frame on the GPU (serve/frame_path.py) through ``self.device_network``."""
        self.frame_path = DeviceFramePath(self.device_network, self.imgsz, self.device, self.conf, self.iou,
                                          cuda_graph=cuda_graph)
        self.description += "; the whole frame on the GPU"

    def frame_extras(self, extras: Optional[np.ndarray]) -> Dict[str, Any]:
        kept = torch.from_numpy(extras.astype(np.float64)).reshape(-1, 2)
        return {"keep_ratio": float((kept / self.widths).mean()),
                "gflops": self.cost.frame_flops(kept.long().tolist()) / 1e9}

    def _forward_with_counts(self, x: torch.Tensor):
        # The kept counts are stacked inside the CUDA graph, not by nine small ops after it.
        boxes, logits = self.net(x)
        return boxes, logits, self.net.kept_counts()

    @torch.inference_mode()
    def network(self, x: torch.Tensor):
        for b in self.net.blocks:
            b.gate_ms = 0.0
        boxes, logits, kept = self.graphed(x.to(self.dtype))
        # Every GPU launch of the frame before the one read-back of the counts, so the host's
        # accounting runs after the GPU is done, not between its kernels. Measured on the H100
        # (raccoon gates, 320, host clock around network()): 514 us with the counts stacked and
        # read between the graph and the score sigmoid, 427 us this way; dense 385-399 us.
        boxes, scores = boxes.float(), logits.float().sigmoid()
        kept = kept[0].cpu()
        keep_ratio = float((kept / self.widths).mean())
        gflops = self.cost.frame_flops(kept.tolist()) / 1e9
        gates_ms = sum(b.gate_ms for b in self.net.blocks) if self.profile_gates else 0.0
        return boxes, scores, {"keep_ratio": keep_ratio, "gflops": gflops, "gates_ms": gates_ms}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_engines(bundle: Dict[str, Any], which: List[str], device: torch.device, backend: str = "auto",
                 precision: str = "fp16", cuda_graph: bool = True) -> Dict[str, Engine]:
    """Build the requested engines of a loaded bundle (see :func:`dynprune.serve.bundle.load_bundle`).

    ``precision``: the TensorRT plan's, and on a GPU the PyTorch engines' (fp16 for fp16 and
    int8); ``cuda_graph``: replay the PyTorch engines from CUDA graphs on a GPU."""
    root = Path(bundle["root"])
    engines: Dict[str, Engine] = {}
    for name in which:
        entry = bundle["engines"].get(name)
        if entry is None:
            raise BundleError(f"{root}: the bundle has no {name} engine (it has {sorted(bundle['engines'])})")
        engines[name] = load_engine(bundle, name, device, backend, precision, cuda_graph)
        log.info("engine %s: %s", name, engines[name].description)
    return engines


def load_available_engines(bundle: Dict[str, Any], which: List[str], device: torch.device, backend: str = "auto",
                           precision: str = "fp16", cuda_graph: bool = True) -> Tuple[Dict[str, Engine],
                                                                                      Dict[str, str]]:
    """Like :func:`load_engines`, for ``--engine auto``: an engine whose files are missing or damaged
    is left out with its reason (second value) instead of stopping the others. Raises
    :class:`BundleError` only when none loads."""
    engines: Dict[str, Engine] = {}
    skipped: Dict[str, str] = {}
    for name in which:
        try:
            engines.update(load_engines(bundle, [name], device, backend, precision, cuda_graph))
        except (ValueError, OSError) as e:  # CheckpointError, BundleError, FileNotFoundError
            skipped[name] = str(e).splitlines()[0]
    if not engines:
        raise BundleError(f"{bundle['root']}: no engine of the bundle loads: " +
                          "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return engines, skipped


def load_engine(bundle: Dict[str, Any], name: str, device: torch.device, backend: str = "auto",
                precision: str = "fp16", cuda_graph: bool = True) -> Engine:
    """Build one engine of a loaded bundle; a missing or damaged file raises :class:`BundleError`
    (or :class:`~dynprune.checkpoint.CheckpointError`) naming it."""
    root = Path(bundle["root"])
    conf, iou = bundle["conf"], bundle["iou"]
    entry = bundle["engines"][name]
    if name != "static":
        path = root / entry["file"]
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle; copy the whole bundle folder, or export it again")
        if name == "dense":
            return DenseEngine(str(path), device, conf, iou, precision=precision, cuda_graph=cuda_graph)
        return DynamicEngine(str(path), device, conf, iou, backend, precision=precision, cuda_graph=cuda_graph,
                             name=name)
    from dynprune.serve.tensorrt_engine import ensure_plan, tensorrt_status

    ok, reason = tensorrt_status()
    plan = ensure_plan(str(root), entry["onnx"], precision, imgsz=bundle["imgsz"]) if ok else None
    checkpoint = root / entry.get("file", "static.pt")
    runtime = static_runtime(device, plan is not None, checkpoint.is_file())
    if runtime == "tensorrt":
        return TensorRTEngine(plan, bundle["imgsz"], conf, iou, entry.get("gflops"))
    if runtime == "pytorch":
        engine: Engine = DenseEngine(str(checkpoint), device, conf, iou, name="static", precision=precision,
                                     cuda_graph=cuda_graph)
    else:
        engine = OnnxEngine(str(root / entry["onnx"]), bundle["imgsz"], conf, iou, entry.get("gflops"),
                            threads=torch.get_num_threads())
    engine.description += f"; TensorRT not used: {reason or 'no plan could be built'}"
    return engine


def static_runtime(device: torch.device, tensorrt_plan: bool, checkpoint: bool) -> str:
    """What runs the static engine: ``tensorrt`` where a plan is there for this TensorRT and GPU; on
    a CUDA GPU without one, ``pytorch`` (the pruned checkpoint as the dense engine runs: BatchNorm
    folded, fp16, one CUDA graph), so that the GPU race is fair; elsewhere ``onnxruntime``."""
    if tensorrt_plan:
        return "tensorrt"
    if device.type == "cuda" and checkpoint:
        return "pytorch"
    return "onnxruntime"
