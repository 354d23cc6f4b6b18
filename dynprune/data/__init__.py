"""Datasets: Ultralytics YOLO, Pascal VOC and COCO readers, the built-in synthetic set."""

from dynprune.data.formats import DatasetError, DatasetSpec, load_dataset
from dynprune.data.records import DatasetIssues, ImageRecord

__all__ = ["DatasetError", "DatasetIssues", "DatasetSpec", "ImageRecord", "load_dataset"]
