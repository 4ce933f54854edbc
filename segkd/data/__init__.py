"""Datasets: standard formats behind a registry, segmentation augmentation, the synthetic default, checks."""

from segkd.data.datasets import (
    DATASETS,
    DatasetInfo,
    SegDataset,
    build_dataset,
    dataset_info,
    detect_format,
    list_split,
)
from segkd.data.inspect import inspect_dataset, validate_dataset
from segkd.data.synth import resolve_data_root, synthesize
from segkd.data.transforms import build_eval_transform, build_train_transform

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "SegDataset",
    "build_dataset",
    "build_eval_transform",
    "build_train_transform",
    "dataset_info",
    "detect_format",
    "inspect_dataset",
    "list_split",
    "resolve_data_root",
    "synthesize",
    "validate_dataset",
]
