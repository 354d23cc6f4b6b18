"""Detection metrics: AP50 and AP50-95 by pycocotools' COCOeval, precision and recall."""

from __future__ import annotations

import contextlib
import io
from typing import Dict, List, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from dynprune.data.records import ImageRecord


def coco_ground_truth(records: Sequence[ImageRecord], names: Sequence[str]) -> dict:
    """A COCO-format ground-truth dict (boxes in image pixels) for ``records``."""
    images, annotations = [], []
    for i, rec in enumerate(records):
        images.append({"id": i, "width": rec.width, "height": rec.height, "file_name": rec.path})
        for box, label in zip(rec.boxes, rec.labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": int(label) + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_detections(predictions: Sequence[Dict[str, np.ndarray]]) -> List[dict]:
    dets = []
    for i, p in enumerate(predictions):
        for box, score, label in zip(p["boxes"], p["scores"], p["labels"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            dets.append({"image_id": i, "category_id": int(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": float(score)})
    return dets


def precision_recall(
    predictions: Sequence[Dict[str, np.ndarray]], records: Sequence[ImageRecord], conf: float, iou: float = 0.5
) -> Dict[str, float]:
    """Precision and recall at one operating point: score >= ``conf``, greedy IoU >= ``iou`` match."""
    tp = fp = n_gt = 0
    for p, rec in zip(predictions, records):
        n_gt += len(rec.boxes)
        keep = p["scores"] >= conf
        boxes, labels = p["boxes"][keep], p["labels"][keep]
        order = np.argsort(-p["scores"][keep])
        matched = np.zeros(len(rec.boxes), bool)
        if len(rec.boxes) and len(boxes):
            ious = box_iou(torch.as_tensor(boxes[order]).float(), torch.as_tensor(rec.boxes).float()).numpy()
        for j, k in enumerate(order):
            if len(rec.boxes):
                cand = np.where((~matched) & (rec.labels == labels[k]), ious[j], 0.0)
                g = int(cand.argmax())
                if cand[g] >= iou:
                    matched[g] = True
                    tp += 1
                    continue
            fp += 1
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(n_gt, 1)}


def evaluate_detections(
    predictions: Sequence[Dict[str, np.ndarray]],
    records: Sequence[ImageRecord],
    names: Sequence[str],
    conf: float = 0.25,
) -> Dict[str, float]:
    """AP50 and AP50-95 (COCOeval, maxDets 100) plus precision/recall at ``conf``.

    ``predictions[i]`` holds numpy ``boxes`` (xyxy, image pixels), ``scores`` and ``labels``
    for ``records[i]``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = coco_ground_truth(records, names)
    dets = coco_detections(predictions)
    result = {"ap50": 0.0, "ap50_95": 0.0}
    if dets and gt["annotations"]:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(dets)
            ev = COCOeval(coco_gt, coco_dt, "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        result = {"ap50": float(max(ev.stats[1], 0.0)), "ap50_95": float(max(ev.stats[0], 0.0))}
    result.update(precision_recall(predictions, records, conf))
    return result
