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


# ------------------------------------------------------------------------------------------- further behaviour
def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


def _folder(root: Path, n: int = 2, h: int = 8, w: int = 10, k: int = 3) -> Path:
    for i in range(n):
        _png(root / f"images/train/im{i}.png", _img(h, w, 20 * i))
        _png(root / f"labels/train/im{i}.png", np.arange(h * w).reshape(h, w) % k, "L")
    return root


def test_validate_cheap_reads_headers_full_reads_values(tmp_path):
    _folder(tmp_path)
    _png(tmp_path / "labels/train/im1.png", np.full((8, 10), 9), "L")  # 9 is no class of 3
    ds = build_dataset(tmp_path, "train", num_classes=3)
    validate_dataset(ds, full=False)  # headers are fine: the cheap check passes
    with pytest.raises(SegkdError, match=r"im1\.png: label value 9 is neither a class \(0\.\.2\) nor the ignore") as e:
        validate_dataset(ds, full=True)
    _one_line(e)
    _png(tmp_path / "labels/train/im0.png", np.zeros((8, 10, 3)))  # a colour-coded (RGB) label
    with pytest.raises(SegkdError, match=r"im0\.png: label image has mode RGB") as e:
        validate_dataset(ds, full=False)
    _one_line(e)
    (tmp_path / "images/train/im0.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(SegkdError, match=r"images/train/im0\.png: unreadable image") as e:
        validate_dataset(ds, full=False)
    _one_line(e)


def test_every_bad_input_is_one_line(tmp_path):
    _folder(tmp_path)
    _png(tmp_path / "images/train/extra.png", _img(8, 10))
    with pytest.raises(SegkdError, match=r"extra\.png: missing label .*labels/train/extra\.png") as e:
        build_dataset(tmp_path, "train", num_classes=3)
    _one_line(e)
    (tmp_path / "images/train/extra.png").unlink()
    (tmp_path / "classes.json").write_text('{"classes": ["a", "b", "c"], "palette": [[1, 2]]}')
    with pytest.raises(SegkdError, match=r"classes\.json: 'palette' must hold one \[r, g, b\]") as e:
        build_dataset(tmp_path, "train")
    _one_line(e)
    (tmp_path / "classes.json").write_text('{"classes": ["a", "b", "c"]}')
    with pytest.raises(SegkdError, match=r"classes\.json: names 3 classes but --num-classes is 5") as e:
        build_dataset(tmp_path, "train", num_classes=5)
    _one_line(e)
    (tmp_path / "classes.json").write_text("{not json")
    with pytest.raises(SegkdError, match=r"classes\.json: not a valid JSON class file") as e:
        build_dataset(tmp_path, "train")
    _one_line(e)
    with pytest.raises(SegkdError, match="no known dataset layout") as e:
        detect_format(tmp_path / "images")
    _one_line(e)
    with pytest.raises(SegkdError, match=r"--resize 0x4"):
        build_eval_transform(resize=(0, 4))


def test_inspect_lists_all_problems_and_cli_exits_nonzero(tmp_path):
    _folder(tmp_path, n=3)
    (tmp_path / "classes.json").write_text('{"classes": ["a", "b", "c"]}')
    _png(tmp_path / "labels/train/im0.png", np.full((8, 10), 7), "L")  # bad value
    _png(tmp_path / "labels/train/im1.png", np.zeros((9, 10)), "L")  # size mismatch
    (tmp_path / "images/train/im2.png").write_bytes(b"broken")  # unreadable image
    _png(tmp_path / "images/train/lonely.jpg", _img(8, 10))  # missing label
    _png(tmp_path / "labels/train/orphan.png", np.zeros((8, 10)), "L")  # label without image
    _png(tmp_path / "labels/train/lossy.jpg", _img(8, 10))  # a JPEG label
    _png(tmp_path / "images/test/t.png", _img(8, 10))  # a third split, found on disk
    _png(tmp_path / "labels/test/t.png", np.ones((8, 10)), "L")
    rep = inspect_dataset(tmp_path)
    joined = "\n".join(rep["problems"])
    for needle in ("im0.png: label value 7", "im1.png: label is 10x9 but its image im1.png is 10x8",
                   "im2.png: unreadable image", "lonely.jpg: missing label", "orphan.png: label without an image",
                   "lossy.jpg: labels must be PNG"):
        assert needle in joined, needle
    assert len(rep["problems"]) == 6 and rep["splits"]["train"]["bad_pairs"] == 3
    assert rep["splits"]["test"]["class_pixels"] == {"a": 0, "b": 80, "c": 0}
    r = CliRunner().invoke(app, ["data", "inspect", str(tmp_path)])
    assert r.exit_code == 1 and isinstance(r.exception, SegkdError) and "6 problem(s) found" in str(r.exception)
    assert "lonely.jpg: missing label" in r.output


def test_inspect_class_frequencies_by_hand(tmp_path):
    _png(tmp_path / "images/val/a.png", _img(2, 3))
    _png(tmp_path / "labels/val/a.png", np.array([[0, 1, 1], [255, 1, 0]]), "L")
    rep = inspect_dataset(tmp_path, num_classes=2)
    s = rep["splits"]["val"]
    assert s["class_pixels"] == {"class0": 2, "class1": 3} and s["ignore_pixels"] == 1
    assert s["class_share_pct"]["class1"] == 50.0 and s["sizes_hxw"] == {"2x3": 1} and rep["problems"] == []


def test_standard_palettes_and_cityscapes_unlabelled_ids(tmp_path):
    from segkd.data.classes import ADE20K_PALETTE, VOC_PALETTE, class_table

    assert ADE20K_PALETTE[0] == [120, 120, 120] and len(ADE20K_PALETTE) == 150
    assert VOC_PALETTE[15] == [192, 128, 128] and VOC_PALETTE[1] == [128, 0, 0]  # person, aeroplane
    assert class_table("cityscapes")[1][0] == [128, 64, 128]
    _png(tmp_path / "leftImg8bit/train/aachen/a_1_leftImg8bit.png", _img(1, 4))
    _png(tmp_path / "gtFine/train/aachen/a_1_gtFine_labelIds.png", np.array([[1, 255, 34, 24]]), "L")
    ds = build_dataset(tmp_path, "train", transform=RAW)
    assert ds[0][1].tolist() == [[255, 255, 255, 11]]  # ego vehicle, -1 (255) and id 34 ignored; 24 = person
    assert ds.names == ["a_1_leftImg8bit"] and ds.info.palette[11] == [220, 20, 60]


def test_dataset_pickles_and_workers_reproduce(tmp_path):
    import pickle

    root = synthesize(tmp_path / "s", n_train=4, n_val=1, size=(24, 32), num_classes=3)
    ds = build_dataset(root, "train", transform=build_train_transform(crop=(16, 16)), seed=-5)
    ds.set_epoch(3)
    again = pickle.loads(pickle.dumps(ds))
    assert torch.equal(again[2][0], ds[2][0])
    from torch.utils.data import DataLoader

    one = [b for b in DataLoader(ds, batch_size=2, num_workers=0)]
    two = [b for b in DataLoader(ds, batch_size=2, num_workers=2)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, two))


def test_jitter_keeps_padding_black_and_hue_rotation():
    from segkd.data.transforms import hue_matrix

    m = hue_matrix(120.0)
    assert np.allclose(m @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-6)  # red -> green
    assert np.allclose(hue_matrix(13.0) @ [0.3, 0.3, 0.3], [0.3, 0.3, 0.3], atol=1e-6)  # greys unchanged
    img = np.full((10, 12, 3), 200, np.uint8)
    lab = np.ones((10, 12), np.int64)
    tf = build_train_transform(crop=(20, 20), scale=(1.0, 1.0), jitter=True, mean=(0.0, 0.0, 0.0),
                               std=(1 / 255, 1 / 255, 1 / 255))
    for seed in range(4):
        x, y = tf(img, lab, np.random.default_rng(seed))
        assert x.shape == (3, 20, 20) and (y == 1).sum() == 120 and (y == 255).sum() == 280
        assert torch.all(x[:, y == 255] == 0) and torch.all(x[:, y == 1] > 0)


def test_eval_resize_is_nearest_for_labels(tmp_path):
    lab = np.kron(np.array([[0, 1], [2, 255]]), np.ones((4, 4), np.int64))
    _png(tmp_path / "images/val/a.png", _img(8, 8))
    _png(tmp_path / "labels/val/a.png", lab, "L")
    ds = build_dataset(tmp_path, "val", num_classes=3, transform=build_eval_transform(resize=(6, 10)))
    x, y = ds[0]
    assert x.shape == (3, 6, 10) and y.shape == (6, 10) and set(y.unique().tolist()) == {0, 1, 2, 255}
    assert y[0, 0] == 0 and y[0, -1] == 1 and y[-1, 0] == 2 and y[-1, -1] == 255


def test_synth_seed_layout_and_cache(tmp_path, monkeypatch):
    from segkd.data import resolve_data_root
    from segkd.data.synth import default_synth_root

    a = synthesize(tmp_path / "a", n_train=2, n_val=1, size=(24, 32), num_classes=3, seed=0)
    b = synthesize(tmp_path / "b", n_train=2, n_val=1, size=(24, 32), num_classes=3, seed=1)
    assert (a / "images/train/train_00000.png").read_bytes() != (b / "images/train/train_00000.png").read_bytes()
    c = synthesize(tmp_path / "c", n_train=3, n_val=1, size=(24, 32), num_classes=3, seed=0)  # more images
    assert (a / "labels/val/val_00000.png").read_bytes() == (c / "labels/val/val_00000.png").read_bytes()
    meta = json.loads((a / "classes.json").read_text())
    assert meta["classes"] == ["background", "alpha", "beta"] and len(meta["palette"]) == 3
    synthesize(a, n_train=1, n_val=1, size=(24, 32), num_classes=3)  # an earlier synthetic set is replaced
    assert len(list((a / "images/train").iterdir())) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("x")
    with pytest.raises(SegkdError, match="not empty"):
        synthesize(tmp_path / "mine", n_train=1, n_val=1)
    monkeypatch.setenv("SEGKD_CACHE", str(tmp_path / "cache"))
    kw = {"n_train": 2, "n_val": 1, "size": (16, 16), "num_classes": 3}
    first = default_synth_root(**kw)
    stamp = (first / "classes.json").stat().st_mtime_ns
    assert default_synth_root(**kw) == first and (first / "classes.json").stat().st_mtime_ns == stamp
    assert first.parent == tmp_path / "cache" and build_dataset(first, "val").info.num_classes == 3
    assert resolve_data_root(str(first)) == first
    with pytest.raises(SegkdError, match="dataset folder not found"):
        resolve_data_root(str(tmp_path / "absent"))


@pytest.mark.skipif(not CAMVID.is_dir(), reason="shared CamVid not present")
def test_real_camvid_train_classes():
    ds = build_dataset(CAMVID, "train", transform=RAW)
    assert len(ds) == 367 and ds.info.class_names == json.loads((CAMVID / "stats.json").read_text())["classes"]
    for i in (0, 100, 366):
        x, y = ds[i]
        assert x.shape == (3, 180, 240) and int(y[y != 255].max()) <= 10  # void (11) became the ignore index
    validate_dataset(ds, full=False)
