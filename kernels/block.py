"""The execution contract of a gated block on its kept channels, shared by every backend.

A :class:`CompactBlock` replaces a gated :class:`~dynprune.layers.Bottleneck` at inference. Its
``forward(x)`` takes the block input ``(B, C, H, W)`` and returns the block output of the same
shape, equal (up to float rounding) to the masked dense block

    mask = saliency * [keep]          keep: Gate.group_keep (dynprune/gates.py)
    y = x + cv3(silu(cv2(silu(cv1(x)) * mask1)) * mask2)          BatchNorm folded

computed on the kept channels only: cv1 writes gate 1's kept channels, cv2 reads them and writes
gate 2's, cv3 reads those and adds the full-width shortcut (docs/DESIGN.md, "Compact
activations"). After each call :attr:`last_kept` holds the ``(B, 2)`` kept channels of both gates
(a NumPy array or a tensor; ``torch.as_tensor`` takes either) and, with :attr:`profile` on,
:attr:`gate_ms` has grown by the time the gates took.

Backends (``kernels/dispatch.py`` chooses one per model and says why):

- ``reference`` (:class:`~dynprune.kernels.reference.ReferenceBlock`): PyTorch, any device and
  batch; the specification the others are tested against.
- ``cpu`` (:class:`~dynprune.kernels.cpu_blocks.CompiledCpuBlock`): the compiled C runtime, the
  whole block in one call per image.
- ``triton`` (:class:`~dynprune.kernels.triton_block.TritonBlock`): Triton kernels on a CUDA GPU,
  no host synchronisation, one CUDA graph per input shape.
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
from torch import nn

from dynprune.gates import Gate
from dynprune.layers import Bottleneck


class CompactBlock(nn.Module):
    """A gated block's state for every backend: its gates and BatchNorm-folded weights ``w1, b1``
    (1x1, ``(h1, C, 1, 1)``), ``w2, b2`` (3x3, ``(h2, h1, 3, 3)``), ``w3, b3`` (1x1, ``(C, h2, 1,
    1)``). Subclasses implement :meth:`forward`."""

    #: the backend's name, as :func:`~dynprune.kernels.dispatch.select_backend` gives it
    backend = ""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        if not block.gated:
            raise ValueError(f"{type(self).__name__} needs a gated block (dynprune gate)")
        self.c, self.h1, self.h2 = block.c, block.h1, block.h2
        self.gate1: Gate = copy.deepcopy(block.gate1)
        self.gate2: Gate = copy.deepcopy(block.gate2)
        for name, conv in (("1", block.cv1), ("2", block.cv2), ("3", block.cv3)):
            w, b = conv.fold()
            self.register_buffer(f"w{name}", w)
            self.register_buffer(f"b{name}", b)
        # Per-frame state lives in one-slot lists that forward writes into, not in attributes it
        # sets: nn.Module.__setattr__ costs a microsecond on a quiet core and several inside the
        # running network (docs/DESIGN.md, "The CPU path").
        self._kept: list = [None]
        self._gate_ms = [0.0]
        self.profile = False  # time the gates (serving reports them apart from the network)

    @property
    def last_kept(self) -> Optional[np.ndarray | torch.Tensor]:
        """``(B, 2)`` kept channels of both gates in the last call. The CPU backend returns the
        same array for every frame with the same counts: read it, do not write to it."""
        return self._kept[0]

    @last_kept.setter
    def last_kept(self, value: Optional[np.ndarray | torch.Tensor]) -> None:
        self._kept[0] = value

    @property
    def gate_ms(self) -> float:
        """Milliseconds spent in the gates since last reset (with ``profile`` on)."""
        return self._gate_ms[0]

    @gate_ms.setter
    def gate_ms(self, value: float) -> None:
        self._gate_ms[0] = float(value)

    def prepare(self) -> CompactBlock:
        """Lay the weights out for this backend's kernels; called once the block is on its device
        and in its memory format (:class:`~dynprune.compact.CompactDetector` does). Returns self."""
        return self

    def extra_repr(self) -> str:
        return f"c={self.c}, h1={self.h1}, h2={self.h2}, backend={self.backend}"
