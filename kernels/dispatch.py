"""The one place that chooses a gated model's backend (kernels/block.py), and says why.

``auto`` picks, in order: ``triton`` on a CUDA GPU where Triton's kernels run (its documented
floor, then a trial: kernels/triton_trial.py); ``cpu`` (the compiled C
blocks) where a C compiler works and every gated block is one they run; else ``reference``
(PyTorch). A backend asked for by name is given or refused with the reason.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple, Type

import torch

from dynprune.kernels.block import CompactBlock

#: the backends, in the order ``auto`` prefers them
BACKENDS = ("triton", "cpu", "reference")

def _triton_refusal(device: torch.device, requested: bool) -> Optional[str]:
    """Why the Triton backend cannot run on ``device``, or ``None`` where it can. Its interpreter
    (``TRITON_INTERPRET=1``, CPU tensors; slow) only serves a backend asked for by name."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    if device.type != "cuda":
        if requested and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "the Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 for tests)"
    from dynprune.kernels.triton_trial import triton_refusal_by_trial

    return triton_refusal_by_trial(device)


def _compiled_refusal(blocks: Iterable) -> Optional[str]:
    """Why the compiled CPU backend cannot run these gated blocks, or ``None`` where it can."""
    from dynprune.kernels.cpu_blocks import compiled_library, unsupported

    for block in blocks:
        why = unsupported(block)
        if why is not None:
            return f"a gated block is not one the compiled CPU blocks run: {why}"
    if compiled_library() is None:
        return "no C compiler works here, or DYNPRUNE_COMPILED=0 (the log says which)"
    return None


def _compiled_description() -> str:
    from dynprune.kernels.cpu_blocks import compiled_library

    lib = compiled_library()
    built = "built for this CPU" if lib.for_this_cpu else "built for the architecture's baseline"
    return f"compiled CPU blocks (C, {int(lib.dp_vector_floats())}-float vectors, {built})"


def select_backend(device: torch.device | str, requested: str = "auto",
                   blocks: Iterable = ()) -> Tuple[str, str]:
    """``(backend, reason)`` for a model whose gated blocks are ``blocks`` on ``device``.

    ``backend`` is one of :data:`BACKENDS`; ``reason`` says what runs and, where ``auto`` passed
    over a faster backend, why. ``cpu`` runs on the CPU whatever ``device`` is: the caller moves
    the model. Raises ``ValueError`` for an unknown name or a named backend that cannot run.
    """
    device = torch.device(device)
    blocks = list(blocks)
    if requested not in ("auto", *BACKENDS):
        raise ValueError(f"unknown backend {requested!r}; choose auto, {', '.join(BACKENDS)}")
    if requested == "reference":
        return "reference", "reference backend (PyTorch, requested)"
    if requested in ("auto", "triton"):
        why_not = _triton_refusal(device, requested == "triton")
        if why_not is None:
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the Triton interpreter"
            return "triton", f"Triton kernels on {where}"
        if requested == "triton":
            raise ValueError(f"--backend triton: {why_not}")
    else:
        why_not = None
    compiled_why_not = _compiled_refusal(blocks)
    if compiled_why_not is None:
        reason = _compiled_description()
        if why_not is not None and device.type == "cuda":
            reason += f" (not Triton: {why_not})"
        return "cpu", reason
    if requested == "cpu":
        raise ValueError(f"--backend cpu: {compiled_why_not}")
    return "reference", f"reference backend (PyTorch): {compiled_why_not}"


def block_class(backend: str) -> Type[CompactBlock]:
    """The :class:`~dynprune.kernels.block.CompactBlock` subclass of a backend."""
    if backend == "triton":
        from dynprune.kernels.triton_block import TritonBlock

        return TritonBlock
    if backend == "cpu":
        from dynprune.kernels.cpu_blocks import CompiledCpuBlock

        return CompiledCpuBlock
    if backend == "reference":
        from dynprune.kernels.reference import ReferenceBlock

        return ReferenceBlock
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
