"""Model configurations: every default of the detector lives here, in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Tuple

#: Output strides of the three detection levels (P3, P4, P5).
STRIDES: Tuple[int, int, int] = (8, 16, 32)

#: Default input size: a multiple of 32 that runs in real time on a Jetson.
DEFAULT_IMGSZ = 320


@dataclass
class DetectorConfig:
    """Architecture of the one-class detector.

    The backbone is a stride-2 stem and four stages (strides 4, 8, 16, 32); each stage
    is a dense stride-2 convolution followed by ``depths[i]`` bottleneck blocks. A block
    keeps its residual stream at ``widths[i]`` channels and computes on
    ``round(widths[i] * expansion)`` hidden channels: 1x1 in, 3x3, 1x1 out. The hidden
    channels are the only ones the gates and the static pruners touch; they carry most of
    the FLOPs (docs/DESIGN.md, "Compact activations").
    ``hidden`` lists ``[h1, h2]`` per block (in :attr:`Detector.blocks` order) to override
    the hidden widths of its 1x1-in and 3x3 outputs; statically pruned models use it.
    """

    num_classes: int = 1
    stem: int = 16
    widths: Tuple[int, int, int, int] = (32, 64, 128, 256)
    depths: Tuple[int, int, int, int] = (1, 2, 2, 1)
    expansion: float = 1.0
    neck: int = 64
    gate_reduction: int = 2  # ManiDP official code: --squeeze_rate 2
    gate_group: int = 1
    hidden: List[List[int]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> DetectorConfig:
        d = dict(d)
        for key in ("widths", "depths"):
            if key in d:
                d[key] = tuple(d[key])
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown detector config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


#: Named sizes. nano ~1.6 M parameters, small ~5.9 M (see BENCHMARKS.md for the measured counts).
SIZES: Dict[str, DetectorConfig] = {
    "nano": DetectorConfig(),
    "small": DetectorConfig(stem=24, widths=(48, 96, 192, 384), depths=(1, 2, 3, 2), neck=128),
}


def config_for(size: str, num_classes: int = 1, **overrides: Any) -> DetectorConfig:
    """Return a fresh config for a named size (``nano`` or ``small``)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    d = SIZES[size].to_dict()
    d.update(num_classes=num_classes, **overrides)
    return DetectorConfig.from_dict(d)
