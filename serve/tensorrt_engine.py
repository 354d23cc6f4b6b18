"""TensorRT static engine: build a plan from the bundle's ONNX, cache it, run it on torch CUDA buffers.

Written to two APIs, chosen at run time by what the installed module has:

* TensorRT 10 (JetPack 6.1+): ``build_serialized_network``, ``set_memory_pool_limit``,
  name-based I/O (``num_io_tensors``, ``get_tensor_name``, ``set_tensor_address``) and
  ``execute_async_v3``; the binding API and ``build_engine`` are gone.
* TensorRT 8.5 (JetPack 5.1, the newest a Xavier NX gets): ``build_serialized_network`` and
  ``set_memory_pool_limit`` exist, but execution goes through the binding API
  (``num_bindings``, ``binding_is_input``, ``execute_async_v2``); the EXPLICIT_BATCH flag is
  required when creating the network.

tensorrt is imported lazily; where it (or CUDA) is missing, :func:`tensorrt_status` says why
and the caller uses ONNX Runtime.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable, Optional, Tuple

import numpy as np
import torch

log = logging.getLogger("dynprune.serve")


def tensorrt_status() -> Tuple[bool, str]:
    """``(usable, reason)``."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "tensorrt is not installed (it ships with JetPack on a Jetson)"
    if not torch.cuda.is_available():
        return False, f"tensorrt {trt.__version__} is installed but no CUDA device is visible"
    return True, f"TensorRT {trt.__version__}"


def plan_name(precision: str) -> str:
    """A plan file name that carries TensorRT's version, the precision and the GPU: never a stale plan."""
    import tensorrt as trt

    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    return f"static-trt{trt.__version__}-{precision}-{gpu}.plan"


class ImageCalibrator:
    """INT8 entropy calibration fed from dataset images (letterboxed like serving input)."""

    def __new__(cls, images: Iterable[np.ndarray], imgsz: int, cache: str):
        import tensorrt as trt

        from dynprune.letterbox import letterbox, to_tensor

        class _Calibrator(trt.IInt8EntropyCalibrator2):
            def __init__(self) -> None:
                trt.IInt8EntropyCalibrator2.__init__(self)
                self.batches = iter(list(images))
                self.cache = Path(cache)
                self.buf = torch.empty(1, 3, imgsz, imgsz, device="cuda")

            def get_batch_size(self) -> int:
                return 1

            def get_batch(self, names):
                try:
                    img = next(self.batches)
                except StopIteration:
                    return None
                self.buf.copy_(to_tensor(letterbox(img, imgsz)[0]))
                return [int(self.buf.data_ptr())]

            def read_calibration_cache(self):
                return self.cache.read_bytes() if self.cache.is_file() else None

            def write_calibration_cache(self, data) -> None:
                self.cache.write_bytes(bytes(data))

        return _Calibrator()


def build_plan(onnx_path: str, plan_path: str, precision: str = "fp16", calibrator=None,
               workspace: int = 1 << 30) -> str:
    """Build and save a serialized engine from ONNX (TensorRT 8.5 or 10 APIs)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major < 10:  # implicit batch is gone in 10, where the flag is deprecated
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    else:  # before 8.4
        config.max_workspace_size = workspace
    if precision in ("fp16", "int8") and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        if calibrator is None:
            raise ValueError("INT8 needs a calibrator fed from the dataset")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
    if hasattr(builder, "build_serialized_network"):
        plan = builder.build_serialized_network(network, config)
    else:  # TensorRT < 8.0
        plan = builder.build_engine(network, config).serialize()
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    Path(plan_path).write_bytes(bytes(plan))
    return plan_path


class TensorRTRunner:
    """Runs a plan on torch CUDA buffers; returns ``(boxes, scores)`` as torch tensors.

    ``device`` is where the I/O buffers live: CUDA for a real engine (the tests pass "cpu" to
    check the API selection against stand-ins of both TensorRT versions)."""

    def __init__(self, plan_path: str, device: str = "cuda") -> None:
        import tensorrt as trt

        self.trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan_path}: TensorRT cannot load this plan (built by another version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.named_api = hasattr(self.engine, "num_io_tensors") and hasattr(self.context, "execute_async_v3")
        self.buffers = {}
        self.inputs, self.outputs = [], []
        dtype_map = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
        if self.named_api:  # TensorRT 10 (and 8.6+)
            for i in range(self.engine.num_io_tensors):
                name = self.engine.get_tensor_name(i)
                shape = tuple(self.engine.get_tensor_shape(name))
                dtype = dtype_map[self.engine.get_tensor_dtype(name)]
                self.buffers[name] = torch.empty(shape, dtype=dtype, device=device)
                self.context.set_tensor_address(name, self.buffers[name].data_ptr())
                is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                (self.inputs if is_input else self.outputs).append(name)
        else:  # TensorRT 8.5: the binding API
            self.bindings = []
            for i in range(self.engine.num_bindings):
                name = self.engine.get_binding_name(i)
                shape = tuple(self.engine.get_binding_shape(i))
                dtype = dtype_map[self.engine.get_binding_dtype(i)]
                self.buffers[name] = torch.empty(shape, dtype=dtype, device=device)
                self.bindings.append(self.buffers[name].data_ptr())
                (self.inputs if self.engine.binding_is_input(i) else self.outputs).append(name)

    def __call__(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.buffers[self.inputs[0]].copy_(images)
        stream = torch.cuda.current_stream().cuda_stream if self.buffers[self.inputs[0]].is_cuda else 0
        if self.named_api:
            ok = self.context.execute_async_v3(stream)
        else:
            ok = self.context.execute_async_v2(self.bindings, stream)
        if not ok:
            raise RuntimeError("TensorRT execution failed")
        return self.buffers["boxes"].float(), self.buffers["scores"].float()


def ensure_plan(bundle_dir: str, onnx_file: str, precision: str = "fp16", calibration_images=None,
                imgsz: int = 320) -> Optional[str]:
    """The bundle's cached plan for this TensorRT/GPU/precision, built on first use."""
    ok, reason = tensorrt_status()
    if not ok:
        log.info("static engine: %s; using ONNX Runtime", reason)
        return None
    path = Path(bundle_dir) / plan_name(precision)
    if not path.is_file():
        log.warning("building TensorRT %s plan %s (first run on this device; minutes on a Jetson)", precision, path)
        calib = None
        if precision == "int8":
            calib = ImageCalibrator(calibration_images or [], imgsz, str(path.with_suffix(".calib")))
        build_plan(str(Path(bundle_dir) / onnx_file), str(path), precision, calib)
    return str(path)
