"""Readers for the three dataset layouts a user brings, plus the built-in synthetic set.

* Ultralytics: ``data.yaml`` with ``path``/``train``/``val``/``names``, YOLO txt labels
  (``class cx cy w h``, normalised), images under ``images/`` and labels under ``labels/``.
* Pascal VOC: a folder with ``annotations/`` (or ``Annotations/``) XML files, images in
  ``images/`` (or ``JPEGImages/``) and ``train.txt``/``val.txt`` (or
  ``ImageSets/Main/{train,val}.txt``) listing image stems.
* COCO: a yaml with ``format: coco``, ``train``/``val`` annotation JSON files and ``images``.

Every reader returns :class:`ImageRecord` s and counts what was wrong in
:class:`DatasetIssues`; only problems that leave nothing to train on are fatal.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from dynprune.data.records import ISSUE_TEXT, DatasetIssues, ImageRecord, clean_boxes

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A problem that leaves nothing sensible to train or evaluate on."""


@dataclass
class DatasetSpec:
    """A loaded dataset: train and val records, class names, what was wrong."""

    train: List[ImageRecord]
    val: List[ImageRecord]
    names: List[str]
    source: str
    issues: DatasetIssues = field(default_factory=DatasetIssues)


# A raw object before class selection: (xyxy box, class name).
RawObject = Tuple[Tuple[float, float, float, float], str]


def _image_size(path: str, issues: DatasetIssues) -> Optional[Tuple[int, int]]:
    """(width, height) of a readable image, else ``None`` with the problem counted."""
    if not os.path.isfile(path):
        issues.add("missing_image", path)
        return None
    try:
        from PIL import Image

        with Image.open(path) as im:
            size, fmt = im.size, im.format
            im.verify()  # checks the file's structure without decoding all pixels
    except Exception:
        issues.add("corrupt_image", path)
        return None
    if fmt == "JPEG" and not _jpeg_complete(path):
        # libjpeg would decode it with a grey lower part and print "Premature end of JPEG file"
        # without naming it: a damaged image, counted here with its name.
        issues.add("truncated_image", path)
        return None
    return int(size[0]), int(size[1])


def _jpeg_complete(path: str) -> bool:
    """Whether a JPEG ends with its end-of-image marker (FFD9), allowing trailing padding."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64))
        tail = f.read()
    return b"\xff\xd9" in tail


def _finish(
    raw: Sequence[Tuple[str, int, int, List[RawObject]]],
    names: List[str],
    issues: DatasetIssues,
) -> List[ImageRecord]:
    index = {n: i for i, n in enumerate(names)}
    records = []
    for path, w, h, objects in raw:
        boxes, labels = [], []
        for box, name in objects:
            if name in index:
                boxes.append(box)
                labels.append(index[name])
            else:
                issues.add("other_class", f"{path}: {name}")
        b, lab = clean_boxes(
            np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels), w, h, issues, path
        )
        records.append(ImageRecord(path, b, lab, w, h))
    return records


def _select(
    train_raw, val_raw, known: List[str], classes: Optional[Sequence[str]], single_class: bool, source: str
) -> Tuple[List, List, List[str]]:
    """Map class names to output ids: a chosen subset, all of them, or all merged into one."""
    if classes:
        missing = [c for c in classes if c not in known]
        if missing:
            raise DatasetError(f"{source}: class(es) {missing} not in the dataset; it has {known}")
        names = list(classes)
    else:
        names = list(known)
    if single_class:
        merged = names[0] if len(names) == 1 else "object"

        def merge(raw):
            return [(p, w, h, [(b, merged) for b, n in objs if n in names]) for p, w, h, objs in raw]

        return merge(train_raw), merge(val_raw), [merged]
    return train_raw, val_raw, names


# ----------------------------------------------------------------------------- Ultralytics
def _yolo_images(root: Path, entry, yaml_path: Path) -> List[str]:
    entries = entry if isinstance(entry, list) else [entry]
    files: List[str] = []
    for e in entries:
        p = Path(e) if os.path.isabs(str(e)) else root / str(e)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text().splitlines():
                line = line.strip()
                if line:
                    f = Path(line)
                    files.append(str(f if f.is_absolute() else (p.parent / f)))
        else:
            raise DatasetError(f"{yaml_path}: split path {p} does not exist (neither a folder nor a .txt list)")
    return files


def _yolo_label_path(image: str) -> str:
    parts = Path(image).parts
    if "images" in parts:
        i = len(parts) - 1 - parts[::-1].index("images")
        parts = parts[:i] + ("labels",) + parts[i + 1 :]
    return str(Path(*parts).with_suffix(".txt"))


def _read_yolo_split(files: List[str], names: List[str], issues: DatasetIssues):
    raw = []
    for img in files:
        size = _image_size(img, issues)
        if size is None:
            continue
        w, h = size
        objects: List[RawObject] = []
        label = _yolo_label_path(img)
        if not os.path.isfile(label):
            issues.add("missing_label", label)
        else:
            for ln, line in enumerate(Path(label).read_text().splitlines(), 1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    cls = int(float(fields[0]))
                    cx, cy, bw, bh = (float(v) for v in fields[1:5])
                    if len(fields) != 5 or not all(np.isfinite([cx, cy, bw, bh])):
                        raise ValueError
                except (ValueError, IndexError):
                    issues.add("malformed_line", f"{label}:{ln}")
                    continue
                if not 0 <= cls < len(names):
                    issues.add("unknown_class", f"{label}:{ln} class {cls}")
                    continue
                box = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
                objects.append((box, names[cls]))
        raw.append((img, w, h, objects))
    return raw


def load_yolo(yaml_path: str, classes=None, single_class: bool = False) -> DatasetSpec:
    yp = Path(yaml_path)
    try:
        cfg = yaml.safe_load(yp.read_text())
    except yaml.YAMLError as e:
        raise DatasetError(f"{yp}: not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise DatasetError(f"{yp}: expected a mapping with path/train/val/names")
    for key in ("train", "val", "names"):
        if key not in cfg or cfg[key] in (None, ""):
            raise DatasetError(f"{yp}: no '{key}' entry; a data.yaml needs train, val and names")
    root = Path(cfg.get("path") or ".")
    if not root.is_absolute():
        root = (yp.parent / root).resolve()
    names = cfg["names"]
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{yp}: 'names' is {cfg['names']!r}; it must be a list (names: [ring]) or a mapping "
                           "(names: {0: ring})")
    names = [str(n) for n in names]
    issues = DatasetIssues()
    train_raw = _read_yolo_split(_yolo_images(root, cfg["train"], yp), names, issues)
    val_raw = _read_yolo_split(_yolo_images(root, cfg["val"], yp), names, issues)
    train_raw, val_raw, out_names = _select(train_raw, val_raw, names, classes, single_class, str(yp))
    return _spec(train_raw, val_raw, out_names, str(yp), issues)


# ----------------------------------------------------------------------------- Pascal VOC
def _first_dir(root: Path, *names: str) -> Optional[Path]:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def _read_voc_xml(xml_path: Path, issues: DatasetIssues) -> Tuple[List[RawObject], Optional[str]]:
    try:
        tree = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError):
        issues.add("bad_annotation", str(xml_path))
        return [], None
    objects = []
    for obj in tree.iter("object"):
        try:
            name = obj.findtext("name").strip()
            bb = obj.find("bndbox")
            box = tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            issues.add("bad_annotation", f"{xml_path}: object without a valid name/bndbox")
            continue
        objects.append((box, name))
    return objects, tree.findtext("filename")


def load_voc(root_dir: str, classes=None, single_class: bool = False) -> DatasetSpec:
    root = Path(root_dir)
    ann_dir = _first_dir(root, "annotations", "Annotations")
    img_dir = _first_dir(root, "images", "JPEGImages")
    if ann_dir is None or img_dir is None:
        raise DatasetError(f"{root}: a VOC folder needs annotations/ (or Annotations/) and images/ (or JPEGImages/)")
    issues = DatasetIssues()
    splits = {}
    for split in ("train", "val"):
        candidates = [root / f"{split}.txt", root / "ImageSets" / "Main" / f"{split}.txt"]
        listing = next((c for c in candidates if c.is_file()), None)
        if listing is None:
            raise DatasetError(f"{root}: no {split} split; expected one of {[str(c) for c in candidates]}")
        splits[split] = (listing, [s.strip() for s in listing.read_text().splitlines() if s.strip()])
    known: List[str] = []
    raw_splits = {}
    for split, (listing, stems) in splits.items():
        raw = []
        for stem in stems:
            xml_path = ann_dir / f"{stem}.xml"
            if not xml_path.is_file():
                issues.add("bad_annotation", f"{listing}: {stem} has no {xml_path.name}")
                continue
            objects, filename = _read_voc_xml(xml_path, issues)
            img = img_dir / (filename or f"{stem}.jpg")
            if not img.is_file():
                img = next((img_dir / f"{stem}{e}" for e in IMAGE_EXTS if (img_dir / f"{stem}{e}").is_file()), img)
            size = _image_size(str(img), issues)
            if size is None:
                continue
            for _, n in objects:
                if n not in known:
                    known.append(n)
            raw.append((str(img), size[0], size[1], objects))
        raw_splits[split] = raw
    known.sort()
    if not classes and len(known) > 1:
        _warn_rare_classes(raw_splits, known, issues)
    train_raw, val_raw, names = _select(raw_splits["train"], raw_splits["val"], known, classes, single_class, str(root))
    return _spec(train_raw, val_raw, names, str(root), issues)


def _warn_rare_classes(raw_splits, known: List[str], issues: DatasetIssues, share: float = 0.05) -> None:
    """Warn about class names found in few annotation files: in a one-class dataset these are
    nearly always typing mistakes ('racoon' beside 'raccoon') that would train a second class."""
    files: Dict[str, List[str]] = {n: [] for n in known}
    total = 0
    for raw in raw_splits.values():
        for path, _, _, objects in raw:
            total += 1
            for n in {n for _, n in objects}:
                files[n].append(path)
    common = max(known, key=lambda n: len(files[n]))
    for n in known:
        if n != common and len(files[n]) <= max(2, share * total):
            where = ", ".join(os.path.basename(p) for p in files[n][:3])
            issues.warnings.append(
                f"class {n!r} appears in only {len(files[n])} of {total} files ({where}), beside {common!r} in "
                f"{len(files[common])}: a misspelling? It is trained as a class of its own; pass --classes {common} "
                "to keep one class (the others are counted and dropped), or fix the annotation")


# ----------------------------------------------------------------------------- COCO
def _read_coco_split(json_path: Path, image_root: Path, issues: DatasetIssues):
    try:
        data = json.loads(json_path.read_text())
        cats = {c["id"]: c["name"] for c in data["categories"]}
        images = {im["id"]: im for im in data["images"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{json_path}: not a COCO annotation file ({e})") from e
    per_image: Dict[int, List[RawObject]] = {i: [] for i in images}
    for k, ann in enumerate(data.get("annotations", [])):
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            img_id = ann["image_id"]
            if img_id not in per_image:
                raise KeyError(img_id)
        except (KeyError, TypeError, ValueError):
            issues.add("bad_annotation", f"{json_path}: annotations[{k}]")
            continue
        if ann.get("category_id") not in cats:
            issues.add("unknown_class", f"{json_path}: annotations[{k}] category_id {ann.get('category_id')}")
            continue
        per_image[img_id].append(((x, y, x + w, y + h), cats[ann["category_id"]]))
    raw = []
    for img_id, im in images.items():
        path = image_root / im["file_name"]
        size = _image_size(str(path), issues)
        if size is not None:
            raw.append((str(path), size[0], size[1], per_image[img_id]))
    return raw, list(cats.values())


def load_coco(yaml_path: str, classes=None, single_class: bool = False) -> DatasetSpec:
    yp = Path(yaml_path)
    cfg = yaml.safe_load(yp.read_text())
    for key in ("train", "val"):
        if not cfg.get(key):
            raise DatasetError(f"{yp}: no '{key}' entry; a COCO data yaml needs train and val annotation files")
    root = Path(cfg.get("path") or ".")
    if not root.is_absolute():
        root = (yp.parent / root).resolve()
    image_root = root / cfg.get("images", "images")
    issues = DatasetIssues()
    train_raw, names_t = _read_coco_split(root / cfg["train"], image_root, issues)
    val_raw, names_v = _read_coco_split(root / cfg["val"], image_root, issues)
    known = list(dict.fromkeys(names_t + names_v))
    train_raw, val_raw, names = _select(train_raw, val_raw, known, classes, single_class, str(yp))
    return _spec(train_raw, val_raw, names, str(yp), issues)


def _spec(train_raw, val_raw, names, source, issues) -> DatasetSpec:
    if not names:
        raise DatasetError(f"{source}: no class names found")
    train, val = _finish(train_raw, names, issues), _finish(val_raw, names, issues)
    if not train:
        raise DatasetError(f"{source}: no readable training images")
    if not any(len(r.boxes) for r in train):
        found = "; ".join(f"{n} x {ISSUE_TEXT[k]}" for k, n in issues.counts.most_common(3))
        raise DatasetError(f"{source}: none of the {len(train)} training images has a usable label"
                           + (f" ({found})" if found else "") + "; a detector cannot learn from that")
    if not val:
        raise DatasetError(f"{source}: no readable validation images")
    return DatasetSpec(train, val, names, source, issues)


def load_dataset(
    data: str, classes: Optional[Sequence[str]] = None, single_class: bool = False, cache_dir: str = "runs/datasets"
) -> DatasetSpec:
    """Load ``data``: ``synthetic[:N]``, a data.yaml (YOLO or ``format: coco``), or a VOC folder."""
    if data == "synthetic" or data.startswith("synthetic:"):
        from dynprune.data.synthetic import ensure_synthetic

        n = int(data.split(":", 1)[1]) if ":" in data else 800
        return load_yolo(ensure_synthetic(cache_dir, n_train=n, n_val=max(n // 4, 50)), classes, single_class)
    p = Path(data)
    if not p.exists():
        raise DatasetError(
            f"{data}: no such file or folder. Give a data.yaml (Ultralytics or 'format: coco'), "
            "a Pascal VOC folder, or 'synthetic'"
        )
    if p.is_dir():
        if (p / "data.yaml").is_file():
            return load_dataset(str(p / "data.yaml"), classes, single_class)
        return load_voc(str(p), classes, single_class)
    if p.suffix in (".yaml", ".yml"):
        try:
            fmt = (yaml.safe_load(p.read_text()) or {}).get("format", "yolo")
        except (yaml.YAMLError, AttributeError) as e:
            raise DatasetError(f"{p}: not a YAML mapping ({e})") from e
        if fmt == "coco":
            return load_coco(str(p), classes, single_class)
        if fmt == "voc":
            cfg = yaml.safe_load(p.read_text())
            return load_voc(str((p.parent / cfg.get("path", ".")).resolve()), classes, single_class)
        return load_yolo(str(p), classes, single_class)
    raise DatasetError(f"{p}: unrecognised dataset; give a data.yaml, a VOC folder or 'synthetic'")
