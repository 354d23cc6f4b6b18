"""A reference point users know: Ultralytics YOLOv8n from scratch on a one-class Pascal VOC folder.

    PYTHONPATH=ULTRALYTICS_DIR python benchmarks/yolov8n_reference.py --voc RACCOON \\
        [--train-list train_half.txt] [--epochs 60] [--imgsz 320] [--seed 0] [--json OUT]

Ultralytics is *not* a dependency of dynprune (its license is AGPL-3.0): install it apart, e.g.
``pip install --no-deps -t ULTRALYTICS_DIR ultralytics==8.4.190`` plus its light requirements,
and put that folder on ``PYTHONPATH`` for this script only. The VOC folder (``annotations/``,
``images/``, the train list and ``val.txt``) is written out in YOLO's layout under ``--work``,
then ``yolov8n.yaml`` (no pretrained weights) trains with Ultralytics' own defaults but for the
epochs, image size and device given, and its val split is scored by Ultralytics' validator
(mAP50 and mAP50-95, the same COCO-style measures ``dynprune val`` reports).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path


def voc_to_yolo(voc: Path, train_list: str, work: Path) -> Path:
    """YOLO's layout of a one-class VOC folder; returns the data.yaml."""
    names = set()
    for split, listing in (("train", train_list), ("val", "val.txt")):
        (work / "images" / split).mkdir(parents=True, exist_ok=True)
        (work / "labels" / split).mkdir(parents=True, exist_ok=True)
        for stem in (voc / listing).read_text().split():
            root = ET.parse(voc / "annotations" / f"{stem}.xml").getroot()
            w = float(root.find("size/width").text)
            h = float(root.find("size/height").text)
            lines = []
            for obj in root.findall("object"):
                names.add(obj.find("name").text)
                box = obj.find("bndbox")
                x1, y1, x2, y2 = (float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
                cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
                lines.append(f"0 {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
            image = next((voc / "images").glob(f"{stem}.*"))
            target = work / "images" / split / image.name
            if not target.exists():
                os.symlink(image.resolve(), target)
            (work / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    if len(names) != 1:
        raise SystemExit(f"{voc}: {len(names)} classes ({sorted(names)}); this reference is for one-class data")
    data = work / "data.yaml"
    data.write_text(f"path: {work}\ntrain: images/train\nval: images/val\nnames:\n  0: {names.pop()}\n")
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voc", required=True)
    ap.add_argument("--train-list", default="train.txt")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/yolov8n_reference")
    ap.add_argument("--json")
    args = ap.parse_args()
    try:
        import ultralytics
        from ultralytics import YOLO
    except ImportError:
        raise SystemExit("Ultralytics is not importable: install it apart and put it on PYTHONPATH (see the top of "
                         "this file); it is not a dependency of dynprune") from None
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    data = voc_to_yolo(Path(args.voc), args.train_list, work / "data")
    t0 = time.time()
    model = YOLO("yolov8n.yaml")
    model.train(data=str(data), epochs=args.epochs, imgsz=args.imgsz, device="cpu", pretrained=False,
                seed=args.seed, project=str(work), name="train", plots=False, verbose=False)
    minutes = (time.time() - t0) / 60
    metrics = model.val(data=str(data), imgsz=args.imgsz, device="cpu", plots=False, verbose=False)
    row = {"ap50": float(metrics.box.map50), "ap50_95": float(metrics.box.map), "train_minutes": minutes}
    print(f"YOLOv8n from scratch, {args.epochs} epochs, {args.imgsz} px: mAP50 {row['ap50']:.3f}, "
          f"mAP50-95 {row['ap50_95']:.3f} ({minutes:.1f} min)")
    if args.json:
        out = {"command": "python benchmarks/yolov8n_reference.py --voc VOC --train-list "
                          f"{args.train_list} --epochs {args.epochs} --imgsz {args.imgsz} --seed {args.seed}",
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "ultralytics": ultralytics.__version__,
               "date": time.strftime("%Y-%m-%d"), "train_list": args.train_list, **row}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
