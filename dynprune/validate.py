"""Validation: run a model over a split, map boxes back to image pixels, score with COCOeval.

For gated models it also gathers the per-frame kept channels and FLOPs (the accounting
of the gates issue).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from dynprune.boxes import postprocess
from dynprune.data.dataset import DetectionDataset, collate
from dynprune.data.records import ImageRecord
from dynprune.flops import CostModel
from dynprune.letterbox import Letterbox
from dynprune.metrics import evaluate_detections
from dynprune.model import Detector


def kept_counts(model: Detector) -> Optional[torch.Tensor]:
    """``(B, blocks, 2)`` kept hidden channels per image from the last gated forward pass."""
    if not model.gated:
        return None
    rows = []
    for b in model.blocks:
        m1, m2 = b.last["mask"]
        rows.append(torch.stack(((m1 > 0).sum(1), (m2 > 0).sum(1)), 1))
    return torch.stack(rows, 1)


def letterbox_of(rec: ImageRecord, imgsz: int) -> Letterbox:
    scale = min(imgsz / rec.height, imgsz / rec.width)
    nh, nw = max(1, round(rec.height * scale)), max(1, round(rec.width * scale))
    return Letterbox(scale, float((imgsz - nw) // 2), float((imgsz - nh) // 2), rec.width, rec.height)


@torch.no_grad()
def run_validation(
    model: Detector,
    records: Sequence[ImageRecord],
    names: Sequence[str],
    imgsz: int,
    batch: int = 8,
    device: str | torch.device | None = None,
    conf: float = 0.001,
    iou: float = 0.6,
    workers: int = 0,
    keep_predictions: bool = False,
) -> Dict[str, Any]:
    """Metrics of ``model`` on ``records``; gated models add FLOPs statistics per frame.

    ``device``: where to run; by default the device the model is on (a model trained on a GPU
    is validated there). The model runs channels_last, as the trainer and every engine run it:
    in the other memory format oneDNN sums in another order, and a reloaded checkpoint gave AP
    different from the one recorded while training (2.344e-4 against 2.339e-4 on a tiny model)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device, memory_format=torch.channels_last).eval()
    loader = DataLoader(DetectionDataset(records, imgsz), batch_size=batch, shuffle=False,
                        num_workers=workers, collate_fn=collate)
    predictions: List[Dict[str, np.ndarray]] = []
    kept_all = []
    for images, _, indices in loader:
        images = images.to(device)
        boxes, logits = model(images)
        if model.gated:
            kept_all.append(kept_counts(model).cpu())
        for det, i in zip(postprocess(boxes, logits.sigmoid(), conf, iou), indices):
            lb = letterbox_of(records[i], imgsz)
            predictions.append({
                "boxes": lb.to_image(det["boxes"].float().cpu().numpy()),
                "scores": det["scores"].float().cpu().numpy(),
                "labels": det["labels"].cpu().numpy(),
            })
    result: Dict[str, Any] = evaluate_detections(predictions, records, names)
    if kept_all:
        kept = torch.cat(kept_all).numpy()  # (N, blocks, 2)
        cost = CostModel(model, imgsz)
        frac = np.array([cost.frame_flops(k) / cost.dense for k in kept])
        widths = np.array([[b.h1, b.h2] for b in model.blocks], dtype=np.float64)
        result.update({
            "flops_mean": float(frac.mean()),
            "flops_p5": float(np.percentile(frac, 5)),
            "flops_p50": float(np.percentile(frac, 50)),
            "flops_p95": float(np.percentile(frac, 95)),
            "keep_mean": float((kept / widths).mean()),
            "layer_keep": (kept / widths).mean(0).tolist(),
            "frame_flops": frac.tolist(),
        })
    if keep_predictions:
        result["predictions"] = predictions
    return result
