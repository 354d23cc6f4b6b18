import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dynprune.data.records import ImageRecord
from dynprune.metrics import coco_detections, coco_ground_truth, evaluate_detections


def test_matches_cocoeval_called_directly():
    rng = np.random.default_rng(0)
    records, preds = [], []
    for i in range(6):
        n = int(rng.integers(0, 4))
        xy = rng.uniform(0, 60, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (n, 2))], 1).astype(np.float32)
        records.append(ImageRecord(f"{i}.jpg", boxes, np.zeros(n, np.int64), 100, 100))
        jitter = boxes + rng.normal(0, 3, boxes.shape).astype(np.float32)
        extra = np.array([[50, 50, 70, 80]], np.float32)
        pb = np.concatenate([jitter, extra]) if n else extra
        preds.append({"boxes": pb, "scores": rng.uniform(0.1, 1, len(pb)), "labels": np.zeros(len(pb), np.int64)})
    ours = evaluate_detections(preds, records, ["thing"])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_ground_truth(records, ["thing"])
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(coco_detections(preds)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert abs(ours["ap50"] - ev.stats[1]) < 1e-12 and abs(ours["ap50_95"] - ev.stats[0]) < 1e-12
    assert 0 < ours["ap50"] < 1


def test_perfect_predictions_score_one():
    boxes = np.array([[10, 10, 40, 50], [60, 20, 90, 30]], np.float32)
    rec = [ImageRecord("a.jpg", boxes, np.zeros(2, np.int64), 100, 100)]
    pred = [{"boxes": boxes, "scores": np.array([0.9, 0.8]), "labels": np.zeros(2, np.int64)}]
    m = evaluate_detections(pred, rec, ["x"])
    assert m["ap50"] == 1.0 and m["ap50_95"] == 1.0 and m["precision"] == 1.0 and m["recall"] == 1.0
