"""Which gather-convolution backend a device gets, and why."""

from __future__ import annotations

import os
from typing import Tuple

import torch

#: Triton compiles for NVIDIA GPUs of compute capability 7.0 (Volta) and newer: Xavier (7.2) and
#: Orin (8.7) qualify, a TX2 (6.2) or a Nano (5.3) gets the CPU runtime.
TRITON_MIN_CAPABILITY = (7, 0)


def select_backend(device: torch.device | str, requested: str = "auto") -> Tuple[str, str]:
    """Return ``(backend, reason)`` with backend ``"triton"`` or ``"torch"``."""
    device = torch.device(device)
    if requested not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown backend {requested!r}; choose auto, torch or triton")
    if requested == "torch":
        return "torch", "CPU runtime (requested)"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        if requested == "triton":
            raise RuntimeError("backend 'triton' requested but Triton is not installed (pip install triton)") from None
        return "torch", "CPU runtime: Triton is not installed"
    if device.type != "cuda":
        if requested == "triton" and interpret:
            return "triton", "Triton kernels through the interpreter (TRITON_INTERPRET=1; slow, for tests)"
        if requested == "triton":
            raise RuntimeError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for tests)")
        return "torch", "CPU runtime (Triton kernels need a CUDA GPU)"
    cap = torch.cuda.get_device_capability(device)
    if cap < TRITON_MIN_CAPABILITY:
        if requested == "triton":
            raise RuntimeError(f"compute capability {cap[0]}.{cap[1]} is below Triton's {TRITON_MIN_CAPABILITY}")
        return "torch", (f"CPU runtime: compute capability {cap[0]}.{cap[1]} is below Triton's "
                         f"{TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]}")
    return "triton", f"Triton gather kernels on {torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]})"
