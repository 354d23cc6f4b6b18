import json

import numpy as np
import pytest
import torch

from dynprune.data import DatasetError, load_dataset
from dynprune.data.dataset import DetectionDataset
from tests.conftest import write_jpg


def make_yolo(root, val=True, names=("pig",)):
    for split in ("train", "val"):
        for i in range(3):
            write_jpg(root / "images" / split / f"{i}.jpg", 64, 48, seed=i)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.25 0.5\n")
    text = f"path: .\ntrain: images/train\nnames: {list(names)}\n"
    if val:
        text += "val: images/val\n"
    (root / "data.yaml").write_text(text)
    return root / "data.yaml"


def test_yolo_reads_boxes_in_pixels(tmp_path):
    spec = load_dataset(str(make_yolo(tmp_path)))
    assert spec.names == ["pig"] and len(spec.train) == 3 and len(spec.val) == 3
    np.testing.assert_allclose(spec.train[0].boxes, [[24, 12, 40, 36]], atol=1e-4)
    assert not spec.issues


def test_yolo_bad_inputs_are_counted_not_fatal(tmp_path):
    y = make_yolo(tmp_path)
    lab = tmp_path / "labels" / "train"
    (lab / "0.txt").write_text("0 0.5 0.5 0.25\nzero 1 2 3 4\n0 0.5 0.5 0.25 0.5\n")  # 2 malformed lines
    (lab / "1.txt").write_text("0 0.9 0.5 0.5 0.5\n0 0.5 0.5 0.0 0.5\n7 0.5 0.5 0.2 0.2\n")  # clipped, zero, unknown
    (tmp_path / "images" / "train" / "2.jpg").write_bytes(b"not a jpeg")  # corrupt
    write_jpg(tmp_path / "images" / "train" / "3.jpg")  # no label file
    spec = load_dataset(str(y))
    c = spec.issues.counts
    assert c["malformed_line"] == 2 and c["clipped_box"] == 1 and c["zero_area_box"] == 1
    assert c["unknown_class"] == 1 and c["corrupt_image"] == 1 and c["missing_label"] == 1
    assert len(spec.train) == 3  # 0, 1 and 3 (background); 2 is corrupt
    summary = spec.issues.summary()
    assert "0.txt:1" in summary and "corrupt" in summary
    rec1 = next(r for r in spec.train if r.path.endswith("1.jpg"))
    np.testing.assert_allclose(rec1.boxes, [[41.6, 12, 64, 36]], atol=1e-3)


def test_yolo_without_val_is_fatal_and_names_the_file(tmp_path):
    y = make_yolo(tmp_path, val=False)
    with pytest.raises(DatasetError, match=r"data\.yaml.*'val'"):
        load_dataset(str(y))


def test_no_images_is_fatal(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a]\n")
    with pytest.raises(DatasetError, match="no readable training images"):
        load_dataset(str(tmp_path / "data.yaml"))


def test_missing_dataset_path_names_it(tmp_path):
    with pytest.raises(DatasetError, match="nope"):
        load_dataset(str(tmp_path / "nope"))


VOC_XML = """<annotation><filename>{name}.jpg</filename><size><width>64</width><height>48</height></size>
{objects}</annotation>"""
VOC_OBJ = (
    "<object><name>{cls}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
    "<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
)


def make_voc(root):
    objs = {
        "a": [("raccoon", 2, 3, 30, 40), ("dog", 1, 1, 10, 10)],
        "b": [("raccoon", 10, 10, 90, 40)],  # outside: clipped to 64
        "c": [("raccoon", 5, 5, 5, 20)],  # zero area
        "d": [("raccoon", 1, 1, 20, 20)],
    }
    (root / "annotations").mkdir(parents=True)
    for name, ob in objs.items():
        write_jpg(root / "images" / f"{name}.jpg")
        xml = VOC_XML.format(name=name, objects="".join(
            VOC_OBJ.format(cls=c, x1=x1, y1=y1, x2=x2, y2=y2) for c, x1, y1, x2, y2 in ob))
        (root / "annotations" / f"{name}.xml").write_text(xml)
    (root / "annotations" / "e.xml").write_text("<annotation><broken")
    write_jpg(root / "images" / "e.jpg")
    (root / "train.txt").write_text("a\nb\nc\ne\n")
    (root / "val.txt").write_text("d\n")


def test_voc_pick_one_class(tmp_path):
    make_voc(tmp_path)
    spec = load_dataset(str(tmp_path), classes=["raccoon"])
    assert spec.names == ["raccoon"]
    c = spec.issues.counts
    assert c["other_class"] == 1 and c["clipped_box"] == 1 and c["zero_area_box"] == 1 and c["bad_annotation"] == 1
    a = next(r for r in spec.train if r.path.endswith("a.jpg"))
    np.testing.assert_allclose(a.boxes, [[2, 3, 30, 40]])


def test_voc_merge_all_classes_into_one(tmp_path):
    make_voc(tmp_path)
    spec = load_dataset(str(tmp_path), single_class=True)
    assert spec.names == ["object"]
    a = next(r for r in spec.train if r.path.endswith("a.jpg"))
    assert len(a.boxes) == 2 and set(a.labels) == {0}


def test_voc_unknown_class_name_is_fatal_with_the_choices(tmp_path):
    make_voc(tmp_path)
    with pytest.raises(DatasetError, match=r"\['cat'\].*dog.*raccoon"):
        load_dataset(str(tmp_path), classes=["cat"])


def test_coco(tmp_path):
    for i in range(2):
        write_jpg(tmp_path / "images" / f"{i}.jpg")
    ann = {
        "images": [{"id": 1, "file_name": "0.jpg", "width": 64, "height": 48},
                   {"id": 2, "file_name": "1.jpg", "width": 64, "height": 48}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 2, 10, 20]},
                        {"id": 2, "image_id": 2, "category_id": 9, "bbox": [1, 2, 10, 20]},
                        {"id": 3, "image_id": 2, "category_id": 5, "bbox": "bad"}],
        "categories": [{"id": 5, "name": "parcel"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "coco.yaml").write_text("format: coco\npath: .\ntrain: ann.json\nval: ann.json\nimages: images\n")
    spec = load_dataset(str(tmp_path / "coco.yaml"))
    assert spec.names == ["parcel"]
    np.testing.assert_allclose(spec.train[0].boxes, [[1, 2, 11, 22]])
    assert spec.issues.counts["unknown_class"] == 2 and spec.issues.counts["bad_annotation"] == 2


def test_synthetic_is_deterministic_and_varied(tmp_path):
    from dynprune.data.synthetic import write_synthetic

    a = load_dataset(write_synthetic(str(tmp_path / "a"), 20, 4, seed=1, size=96))
    b = load_dataset(write_synthetic(str(tmp_path / "b"), 20, 4, seed=1, size=96))
    counts = [len(r.boxes) for r in a.train]
    assert counts == [len(r.boxes) for r in b.train]
    assert min(counts) == 0 and max(counts) >= 3  # empty frames and busy frames


def test_dataset_items_and_augmentation(synthetic_yaml):
    spec = load_dataset(synthetic_yaml)
    for augment, mosaic in ((False, 0.0), (True, 0.0), (True, 1.0)):
        ds = DetectionDataset(spec.train, 64, augment=augment, mosaic=mosaic)
        for i in range(len(ds)):
            img, t, _ = ds[i]
            assert img.shape == (3, 64, 64) and img.dtype == torch.float32
            if len(t):
                assert t[:, 1:].min() >= 0 and t[:, 1:].max() <= 64
                assert torch.all(t[:, 3] > t[:, 1]) and torch.all(t[:, 4] > t[:, 2])


def test_corrupt_image_at_runtime_is_replaced(synthetic_yaml, tmp_path):
    spec = load_dataset(synthetic_yaml)
    open(spec.train[0].path, "wb").write(b"broken after loading")
    img, _, _ = DetectionDataset(spec.train, 64)[0]
    assert img.shape == (3, 64, 64)


def test_voc_rare_class_name_is_warned_about(tmp_path):
    """A class name in few files ('racoon' beside 'raccoon') is named in the summary with what to do."""
    make_voc(tmp_path)
    spec = load_dataset(str(tmp_path))
    assert spec.names == ["dog", "raccoon"]
    summary = spec.issues.summary()
    assert "warning: class 'dog' appears in only 1 of 5 files (a.jpg)" in summary
    assert "--classes raccoon" in summary
    assert not load_dataset(str(tmp_path), classes=["raccoon"]).issues.warnings


def test_yolo_names_must_be_a_list_or_mapping(tmp_path):
    y = make_yolo(tmp_path)
    y.write_text(y.read_text().replace("names: ['pig']", "names: pig"))
    with pytest.raises(DatasetError, match=r"'names' is 'pig'; it must be a list"):
        load_dataset(str(y))
    y.write_text(y.read_text().replace("names: pig", "names: {0: pig}"))
    assert load_dataset(str(y)).names == ["pig"]


def test_no_valid_label_anywhere_is_fatal_and_says_why(tmp_path):
    y = make_yolo(tmp_path)
    for label in (tmp_path / "labels" / "train").glob("*.txt"):
        label.write_text("pig 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match=r"none of the 3 training images has a usable label \(3 x malformed"):
        load_dataset(str(y))


def test_truncated_jpeg_is_counted_by_name(tmp_path):
    y = make_yolo(tmp_path)
    img = tmp_path / "images" / "train" / "1.jpg"
    img.write_bytes(img.read_bytes()[:-200])
    spec = load_dataset(str(y))
    assert spec.issues.counts["truncated_image"] == 1
    assert str(img) in spec.issues.summary()
    assert len(spec.train) == 2
