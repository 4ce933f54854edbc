"""Dataset formats from tiny fixtures, real CamVid, augmentation alignment, synth, inspect and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from segkd.checkpoint import default_palette
from segkd.cli import app
from segkd.data import (
    build_dataset,
    build_eval_transform,
    build_train_transform,
    detect_format,
    inspect_dataset,
    synthesize,
    validate_dataset,
)
from segkd.errors import SegkdError

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
RAW = build_eval_transform(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # identity on pixel values


def _png(path: Path, arr: np.ndarray, mode: str | None = None, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode=mode)
    if palette:
        im = im.convert("P")
        im.putpalette([c for rgb in default_palette(256) for c in rgb])
        im = Image.fromarray(arr.astype(np.uint8), mode="P")
        im.putpalette([c for rgb in default_palette(256) for c in rgb])
    im.save(path)


def _img(h=4, w=6, v=10) -> np.ndarray:
    return np.full((h, w, 3), v, np.uint8)


def test_folder_format_with_classes_file(tmp_path):
    lab = np.array([[0, 1, 255], [2, 1, 0]])
    _png(tmp_path / "images/train/a.png", _img(2, 3))
    _png(tmp_path / "labels/train/a.png", lab, "L")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["x", "y", "z"]}))
    ds = build_dataset(tmp_path, "train", transform=RAW)
    assert detect_format(tmp_path) == "folder" and ds.info.class_names == ["x", "y", "z"]
    x, y = ds[0]
    assert y.tolist() == lab.tolist() and x.shape == (3, 2, 3) and torch.allclose(x, torch.full_like(x, 10.0))


def test_folder_needs_num_classes_without_class_file(tmp_path):
    _png(tmp_path / "images/val/a.png", _img())
    _png(tmp_path / "labels/val/a.png", np.zeros((4, 6)), "L")
    with pytest.raises(SegkdError, match="pass --num-classes"):
        build_dataset(tmp_path, "val")
    assert build_dataset(tmp_path, "val", num_classes=4).info.class_names == ["class0", "class1", "class2", "class3"]


def test_camvid_segnet_layout_maps_void(tmp_path):
    _png(tmp_path / "train/0001.png", _img(2, 2))
    _png(tmp_path / "trainannot/0001.png", np.array([[0, 11], [10, 3]]), "L")
    ds = build_dataset(tmp_path, "train", transform=RAW)
    assert ds.info.format == "camvid" and ds.info.num_classes == 11 and ds.info.class_names[0] == "Sky"
    assert ds[0][1].tolist() == [[0, 255], [10, 3]]


def test_cityscapes_train_ids_and_label_ids(tmp_path):
    _png(tmp_path / "leftImg8bit/val/bonn/b_000001_leftImg8bit.png", _img(2, 2))
    _png(tmp_path / "gtFine/val/bonn/b_000001_gtFine_labelIds.png", np.array([[7, 26], [0, 33]]), "L")
    _png(tmp_path / "leftImg8bit/val/bonn/b_000002_leftImg8bit.png", _img(2, 2))
    _png(tmp_path / "gtFine/val/bonn/b_000002_gtFine_labelTrainIds.png", np.array([[0, 13], [255, 18]]), "L")
    ds = build_dataset(tmp_path, "val", transform=RAW)
    assert ds.info.format == "cityscapes" and ds.info.num_classes == 19
    assert ds[0][1].tolist() == [[0, 13], [255, 18]]  # labelIds mapped to train ids, id 0 (unlabeled) ignored
    assert ds[1][1].tolist() == [[0, 13], [255, 18]]


def test_ade20k_reduce_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _png(base / "images/validation/ADE_val_1.jpg", _img(2, 2))
    _png(base / "annotations/validation/ADE_val_1.png", np.array([[0, 1], [150, 2]]), "L")
    ds = build_dataset(tmp_path, "val", transform=RAW)
    assert ds.info.format == "ade20k" and ds.info.num_classes == 150
    assert ds[0][1].tolist() == [[255, 0], [149, 1]]


def test_voc_palettised_labels(tmp_path):
    base = tmp_path / "VOCdevkit/VOC2012"
    _png(base / "JPEGImages/2007_000032.jpg", _img(2, 2))
    _png(base / "SegmentationClass/2007_000032.png", np.array([[0, 15], [255, 1]]), palette=True)
    (base / "ImageSets/Segmentation").mkdir(parents=True)
    (base / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n")
    ds = build_dataset(tmp_path, "train", transform=RAW)
    assert ds.info.format == "voc" and ds.info.class_names[15] == "person"
    assert ds[0][1].tolist() == [[0, 15], [255, 1]]


@pytest.mark.skipif(not CAMVID.is_dir(), reason="shared CamVid not present")
def test_real_camvid_images():
    ds = build_dataset(CAMVID, "val", transform=build_eval_transform())
    assert len(ds) == 101 and ds.info.num_classes == 11 and ds.info.class_names[3] == "Road"
    x, y = ds[0]
    assert x.shape == (3, 180, 240) and y.shape == (180, 240)
    vals = set(y.unique().tolist())
    assert vals <= set(range(11)) | {255} and len(vals - {255}) >= 5
    stats = json.loads((CAMVID / "stats.json").read_text())
    assert ds.info.palette[0] == stats["palette"][0]


def test_augmentation_keeps_image_and_label_aligned(tmp_path):
    # the label is a function of the image (class = red channel // 50), so any misalignment breaks the relation
    rng = np.random.default_rng(0)
    lab = np.kron(rng.integers(0, 5, size=(4, 6)), np.ones((10, 10), np.int64))  # 10-px blocks
    img = np.stack([lab * 50 + 10, np.zeros_like(lab), np.zeros_like(lab)], -1).astype(np.uint8)
    _png(tmp_path / "images/train/a.png", img)
    _png(tmp_path / "labels/train/a.png", lab, "L")
    tf = build_train_transform(crop=(48, 48), scale=(0.5, 2.0), flip=True, jitter=False,
                               mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    ds = build_dataset(tmp_path, "train", transform=tf, num_classes=5, seed=3)
    for epoch in range(6):
        ds.set_epoch(epoch)
        x, y = ds[0]
        assert x.shape == (3, 48, 48) and y.shape == (48, 48)
        valid = y != 255
        assert valid.any()
        red = x[0][valid]
        # nearest-resized labels match the bilinear image except on class borders: demand 90 % agreement
        assert ((red - 10) / 50).round().long().eq(y[valid]).float().mean() > 0.85
        padded = ~valid  # padding: label ignore and image zero
        assert torch.all(x[:, padded] == 0)


def test_augmentation_reproducible_per_seed_epoch_index(tmp_path):
    root = synthesize(tmp_path / "s", n_train=2, n_val=1, size=(32, 40), num_classes=3)
    tf = build_train_transform(crop=(24, 24))
    a = build_dataset(root, "train", transform=tf, seed=7)
    b = build_dataset(root, "train", transform=tf, seed=7)
    a.set_epoch(1), b.set_epoch(1)
    assert torch.equal(a[1][0], b[1][0]) and torch.equal(a[1][1], b[1][1])
    b.set_epoch(2)
    assert not torch.equal(a[1][0], b[1][0])


def test_synth_is_deterministic_and_readable(tmp_path):
    r1 = synthesize(tmp_path / "a", n_train=3, n_val=2, size=(32, 48), num_classes=4, seed=1)
    r2 = synthesize(tmp_path / "b", n_train=3, n_val=2, size=(32, 48), num_classes=4, seed=1)
    for f in sorted((r1 / "images/train").iterdir()):
        assert f.read_bytes() == (r2 / "images/train" / f.name).read_bytes()
    ds = build_dataset(r1, "train")
    assert ds.info.num_classes == 4 and len(ds) == 3
    assert set(torch.cat([ds[i][1].flatten() for i in range(3)]).unique().tolist()) <= {0, 1, 2, 3}


def test_bad_inputs_name_the_file(tmp_path):
    _png(tmp_path / "images/train/a.png", _img())
    _png(tmp_path / "labels/train/a.png", np.array([[0, 7, 0, 0, 0, 0]] * 4), "L")  # 7 with 3 classes
    _png(tmp_path / "images/train/b.png", _img(4, 6))
    _png(tmp_path / "labels/train/b.png", np.zeros((5, 6)), "L")  # size mismatch
    _png(tmp_path / "images/train/c.png", _img())  # missing label
    (tmp_path / "images/train/d.png").write_bytes(b"not a png")
    _png(tmp_path / "labels/train/d.png", np.zeros((4, 6)), "L")
    with pytest.raises(SegkdError, match=r"c\.png: missing label"):
        build_dataset(tmp_path, "train", num_classes=3)
    (tmp_path / "images/train/c.png").unlink()
    ds = build_dataset(tmp_path, "train", num_classes=3)
    with pytest.raises(SegkdError, match=r"a\.png: label value 7 is neither a class"):
        ds[0]
    with pytest.raises(SegkdError, match=r"b\.png: label is 6x5 but its image b\.png is 6x4"):
        ds[1]
    with pytest.raises(SegkdError, match=r"d\.png: unreadable image"):
        ds[2]
    with pytest.raises(SegkdError, match=r"b\.png: label is 6x5"):
        validate_dataset(ds, full=False)
    _png(tmp_path / "images/train/c.png", _img())
    report = inspect_dataset(tmp_path, num_classes=3)
    joined = "\n".join(report["problems"])
    for needle in ("c.png: missing label", "label value 7", "label is 6x5", "d.png: unreadable image"):
        assert needle in joined, needle
    with pytest.raises(SegkdError, match="dataset folder not found"):
        build_dataset(tmp_path / "nope", "train")


def test_cli_synth_and_inspect(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "d"), "--train", "3", "--val", "2",
                            "--size", "32x32"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["data", "inspect", str(tmp_path / "d"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["splits"]["train"]["pairs"] == 3 and rep["problems"] == []
