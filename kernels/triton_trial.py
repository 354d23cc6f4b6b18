"""Whether the Triton backend runs on a GPU, decided by trial (kernels/dispatch.py asks).

Triton's documentation supports NVIDIA GPUs of compute capability 8.0 and newer (its README,
"Supported Hardware"): Orin (8.7) qualifies; Xavier (7.2), a TX2 (6.2) and a Nano (5.3) are
refused without a trial. On a GPU at or above that floor, the first time it is met a tiny gated
block runs on the Triton backend and is compared with the reference backend on the same GPU:
every kernel the dynamic engine launches (pool and gates with their kept lists, the three gather
convolutions) is compiled and run. The verdict is kept per GPU, Triton version and driver in
``<cache>/triton_trials.json`` (:mod:`dynprune.cache`), so later processes skip the trial; a new
Triton or driver tries again. A failed trial (a compile error, a launch error, a wrong result)
sends the engine to the CPU backends with the reason, before the stream starts, never mid-stream.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, Optional

import torch

from dynprune.cache import cache_dir

log = logging.getLogger(__name__)

#: Triton's documented floor for NVIDIA GPUs
TRITON_MIN_CAPABILITY = (8, 0)
CACHE_FILE = "triton_trials.json"

_verdicts: Dict[str, Optional[str]] = {}  # this process's verdicts, by gpu_key


def triton_version() -> Optional[str]:
    """Triton's version, or ``None`` where it does not import."""
    try:
        import triton
    except ImportError:
        return None
    return str(triton.__version__)


def driver_version() -> str:
    """The CUDA driver's version as PyTorch reads it (e.g. ``12080`` for 12.8), else ``unknown``."""
    try:
        return str(torch._C._cuda_getDriverVersion())
    except (AttributeError, RuntimeError):
        return "unknown"


def gpu_identity(device: torch.device) -> Dict[str, object]:
    """What the verdict depends on: the GPU's name and compute capability, Triton's version and
    the driver's."""
    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}",
            "triton": triton_version(), "driver": driver_version()}


def _key(identity: Dict[str, object]) -> str:
    return " | ".join(str(identity[k]) for k in ("gpu", "capability", "triton", "driver"))


def below_floor(capability: str) -> Optional[str]:
    """Why a GPU of ``capability`` ("major.minor") is refused without a trial, or ``None``."""
    major, minor = (int(v) for v in capability.split("."))
    if (major, minor) < TRITON_MIN_CAPABILITY:
        return (f"compute capability {capability} is below {TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]}, "
                "the floor of Triton's documented support")
    return None


def tiny_gated_block():
    """A 16-channel bottleneck with group-8 threshold gates (ManiDP's), as initialised."""
    from dynprune.gates import set_gate_mode
    from dynprune.layers import Bottleneck

    block = Bottleneck(16, 16, 16).eval()
    block.add_gates(group=8)
    set_gate_mode(block, "threshold")
    return block


def run_trial(device: torch.device) -> None:
    """A tiny gated block on the Triton backend against the reference backend on ``device``;
    raises where a kernel fails to compile or launch, or the results differ."""
    from dynprune.kernels.reference import ReferenceBlock
    from dynprune.kernels.triton_block import TritonBlock

    generator = torch.Generator().manual_seed(0)
    block = tiny_gated_block()
    with torch.no_grad():
        for gate in (block.gate1, block.gate2):
            gate.fc2.bias.copy_(torch.tensor([1.0, 0.1]))  # one group kept, one skipped, whatever the input
            gate.fc2.weight.zero_()
            gate.threshold.fill_(0.5)
        x = torch.randn(2, 16, 8, 8, generator=generator).to(device).contiguous(memory_format=torch.channels_last)
        triton_block = TritonBlock(block).to(device).prepare()
        reference = ReferenceBlock(block).to(device)
        out, ref = triton_block(x), reference(x)
        kept, ref_kept = torch.as_tensor(triton_block.last_kept).cpu(), torch.as_tensor(reference.last_kept).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    error = float((out.float() - ref.float()).abs().max())
    if not (error <= 1e-2 * max(1.0, float(ref.abs().max()))) or not torch.equal(kept, ref_kept):
        raise RuntimeError(f"the Triton kernels' result differs from the reference (max error {error:.3g}, "
                           f"kept {kept.tolist()} against {ref_kept.tolist()})")


def _read_cache() -> Dict[str, dict]:
    try:
        with open(cache_dir() / CACHE_FILE) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, identity: Dict[str, object], reason: Optional[str]) -> None:
    """Adds a verdict to the cache file (written to a temporary name, then renamed)."""
    data = _read_cache()
    data[key] = {**identity, "runs": reason is None, "reason": reason, "checked": time.strftime("%Y-%m-%d %H:%M")}
    path = cache_dir() / CACHE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as err:  # a read-only home: the verdict holds for this process only
        log.info("could not keep the Triton trial's verdict in %s (%s)", path, err)


def triton_refusal_by_trial(device: torch.device, identity: Optional[Dict[str, object]] = None) -> Optional[str]:
    """Why the Triton backend cannot run on the CUDA ``device`` (the capability floor, or a failed
    trial), or ``None`` where it runs. Tries once per GPU, Triton version and driver."""
    identity = identity or gpu_identity(device)
    why = below_floor(str(identity["capability"]))
    if why is not None:
        return why
    key = _key(identity)
    if key in _verdicts:
        return _verdicts[key]
    cached = _read_cache().get(key)
    if cached is not None:
        _verdicts[key] = None if cached.get("runs") else str(cached.get("reason"))
        return _verdicts[key]
    log.info("trying the Triton kernels on %s (once per GPU, Triton version and driver)", identity["gpu"])
    try:
        run_trial(device)
        reason = None
    except Exception as err:  # noqa: BLE001 - any failure of the trial is a verdict, not a crash
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        reason = f"the Triton trial failed on {identity['gpu']} ({type(err).__name__}: {first_line})"
        log.warning("%s; the dynamic engine runs on the CPU backends. The verdict is kept in %s (delete it "
                    "to try again)", reason, cache_dir() / CACHE_FILE)
    _verdicts[key] = reason
    _write_cache(key, identity, reason)
    return reason


def forget_verdicts() -> None:
    """Forget this process's verdicts (tests; the cache file is read again)."""
    _verdicts.clear()
