"""Dataset layouts users have (issue 20 item 5): MMSeg's img_dir/ann_dir, label names like NAME_mask.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segkd.data import build_dataset, detect_format, inspect_dataset
from segkd.data.datasets import label_suffix
from segkd.errors import SegkdError
from tests.conftest import run_cli


def _write(root: Path, img_dir: str, ann_dir: str, split: str, names: list[str], lab_suffix: str = "") -> None:
    (root / img_dir / split).mkdir(parents=True, exist_ok=True)
    (root / ann_dir / split).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((8, 12, 3), 40 * i, np.uint8)).save(root / img_dir / split / f"{name}.jpg")
        lab = np.zeros((8, 12), np.uint8)
        lab[:, 6:] = 1 + i % 2
        Image.fromarray(lab).save(root / ann_dir / split / f"{name}{lab_suffix}.png")


def test_label_suffix_by_hand() -> None:
    assert label_suffix({"a", "b_1"}, ["a_mask", "b_1_mask"]) == "_mask"
    assert label_suffix({"a", "b"}, ["a", "b"]) == ""  # named like the images: nothing to strip
    assert label_suffix({"a", "b"}, ["a_mask", "b-gt"]) == ""  # mixed conventions: left to the pairing report
    assert label_suffix({"x-1"}, ["x-1.label"]) == ".label"


def test_mmseg_layout_with_mask_suffix_is_detected_paired_and_inspected(tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    _write(tmp_path, "img_dir", "ann_dir", "train", ["a", "b", "c"], "_mask")
    _write(tmp_path, "img_dir", "ann_dir", "val", ["d"], "_mask")
    assert detect_format(tmp_path) == "mmseg"
    ds = build_dataset(tmp_path, "train", num_classes=3)
    assert [(i.name, lab.name) for i, lab in ds.pairs] == [("a.jpg", "a_mask.png"), ("b.jpg", "b_mask.png"),
                                                          ("c.jpg", "c_mask.png")]
    report = inspect_dataset(tmp_path, num_classes=3)
    assert report["format"] == "mmseg" and report["problems"] == []
    assert report["splits"]["train"]["pairs"] == 3 and report["splits"]["train"]["label_suffix"] == "_mask"
    # by hand: a and c have class 1 on the right half, b class 2; class 0 on every left half
    assert report["splits"]["train"]["class_pixels"] == {"class0": 144, "class1": 96, "class2": 48}
    code, out, err = run_cli(monkeypatch, capsys, "data", "inspect", str(tmp_path), "--num-classes", "3")
    assert code == 0, err
    assert "mmseg dataset" in out and "train: 3 pairs (labels named NAME_mask.png)" in out


def test_folder_layout_with_suffix_and_an_unpaired_label(tmp_path: Path) -> None:
    _write(tmp_path, "images", "labels", "train", ["a", "b"], "_mask")
    assert detect_format(tmp_path) == "folder"
    assert len(build_dataset(tmp_path, "train", num_classes=3)) == 2
    Image.fromarray(np.zeros((8, 12), np.uint8)).save(tmp_path / "labels" / "train" / "z_mask.png")
    with pytest.raises(SegkdError, match="z_mask.png: label without an image"):
        build_dataset(tmp_path, "train", num_classes=3)
