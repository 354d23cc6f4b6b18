"""What a dataset reader produces: image records and an account of what was wrong."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np


@dataclass
class ImageRecord:
    """One image and its boxes (``xyxy`` in image pixels) with 0-based class ids."""

    path: str
    boxes: np.ndarray  # (n, 4) float32
    labels: np.ndarray  # (n,) int64
    width: int = 0
    height: int = 0


#: Human wording of every non-fatal problem a reader can meet.
ISSUE_TEXT = {
    "missing_image": "image file missing",
    "corrupt_image": "image unreadable (corrupt or not an image)",
    "truncated_image": "image cut short, JPEG without its end marker (skipped)",
    "missing_label": "label file missing (image kept as background)",
    "malformed_line": "malformed label line (skipped)",
    "clipped_box": "box outside the image (clipped)",
    "zero_area_box": "zero-area box (dropped)",
    "unknown_class": "unknown class (object dropped)",
    "other_class": "object of an unselected class (dropped)",
    "bad_annotation": "malformed annotation (skipped)",
}


@dataclass
class DatasetIssues:
    """Counts of non-fatal problems, with a few examples each (file and line)."""

    counts: Counter = field(default_factory=Counter)
    examples: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    warnings: List[str] = field(default_factory=list)  # things that load but are probably mistakes

    def add(self, kind: str, where: str) -> None:
        if kind not in ISSUE_TEXT:
            raise KeyError(kind)
        self.counts[kind] += 1
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(where)

    def __bool__(self) -> bool:
        return bool(self.counts) or bool(self.warnings)

    def summary(self, name: str = "dataset") -> str:
        if not self:
            return f"{name}: no problems found"
        lines = []
        if self.counts:
            lines.append(f"{name}: {sum(self.counts.values())} problem(s) found and handled:")
        for kind, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            ex = "; ".join(self.examples[kind])
            lines.append(f"  {n:6d} x {ISSUE_TEXT[kind]}  (e.g. {ex})")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def clean_boxes(
    boxes: np.ndarray, labels: np.ndarray, width: int, height: int, issues: DatasetIssues, where: str
):
    """Clip boxes to the image and drop zero-area ones, counting each case."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4).astype(np.float32), labels.reshape(0).astype(np.int64)
    boxes = boxes.astype(np.float32)
    if width > 0 and height > 0:
        clipped = boxes.copy()
        clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
        clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
        changed = np.any(np.abs(clipped - boxes) > 0.5, axis=1)  # half-pixel slack: VOC is 1-based
        for _ in range(int(changed.sum())):
            issues.add("clipped_box", where)
        boxes = clipped
    area_ok = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
    for _ in range(int((~area_ok).sum())):
        issues.add("zero_area_box", where)
    return boxes[area_ok], labels[area_ok].astype(np.int64)
