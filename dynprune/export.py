"""ONNX export of a dense or statically pruned detector (static input shape, opset 17+)."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch
from torch import nn

from dynprune.fusion import fuse_conv_bn
from dynprune.model import Detector

OPSET = 17


class ExportWrapper(nn.Module):
    """``images (1,3,S,S) float [0,1]`` -> ``boxes (1,A,4)`` xyxy model pixels, ``scores (1,A,C)``."""

    def __init__(self, model: Detector) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        boxes, logits = self.model(images)
        return boxes, logits.sigmoid()


def export_onnx(model: Detector, path: str, imgsz: int, batch: int = 1, opset: int = OPSET) -> str:
    """Write ``model`` (BN folded) to ``path`` as ONNX and check it with ``onnx.checker``."""
    import copy

    import onnx

    if model.gated:
        raise ValueError("gated models run in dynprune's dynamic engine; export the dense or static model")
    net = ExportWrapper(fuse_conv_bn(copy.deepcopy(model).cpu().eval().float()))
    x = torch.rand(batch, 3, imgsz, imgsz)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, (x,), path, opset_version=opset, input_names=["images"],
                      output_names=["boxes", "scores"], dynamo=False)
    onnx.checker.check_model(onnx.load(path))
    return path
