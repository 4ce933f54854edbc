"""Dataset layouts users have (issue 20 item 5): MMSeg's img_dir/ann_dir, label names like NAME_mask.png."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segkd.data import build_dataset, detect_format, inspect_dataset
from segkd.data.datasets import label_suffix
from segkd.errors import SegkdError
from tests.conftest import one_error_line, run_cli


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


# ------------------------------------------------------------------------- --img-suffix / --seg-suffix (explicit)
def _named_set(tmp: Path) -> Path:
    """A synthetic folder set renamed to ``NAME_rgb.png`` images and ``NAME_gt.png`` labels, with an RGB colour
    preview ``NAME_color.png`` beside every label: auto-detection cannot pair it (two conventions in labels/), the
    suffix options can (they also leave the previews out)."""
    from segkd.data import synthesize

    root = synthesize(tmp / "named", n_train=4, n_val=2, size=(32, 48), num_classes=3, seed=5)
    for split in ("train", "val"):
        for img in sorted((root / "images" / split).iterdir()):
            img.rename(img.with_name(f"{img.stem}_rgb.png"))
        for lab in sorted((root / "labels" / split).iterdir()):
            Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(lab.with_name(f"{lab.stem}_color.png"))
            lab.rename(lab.with_name(f"{lab.stem}_gt.png"))
    return root


def test_explicit_suffixes_pair_files_and_ignore_the_others(tmp_path: Path) -> None:
    root = _named_set(tmp_path)
    with pytest.raises(SegkdError, match="missing label"):  # detection sees two conventions: nothing pairs
        build_dataset(root, "train")
    ds = build_dataset(root, "train", img_suffix="_rgb.png", seg_suffix="_gt.png")
    assert [(i.name, lab.name) for i, lab in ds.pairs] == [(f"train_{k:05d}_rgb.png", f"train_{k:05d}_gt.png")
                                                          for k in range(4)]
    assert ds[0][1].shape == (32, 48)  # the label read is the one-channel _gt.png, never the RGB preview
    # only --seg-suffix: every image file counts and its stem is the name (train_00000_rgb needs train_00000_rgb_gt)
    with pytest.raises(SegkdError, match=r"no label pairs with an image of .*images/train under --seg-suffix "
                                         r"'_gt.png' \(train_00000_rgb.png would need train_00000_rgb_gt.png\)"):
        build_dataset(root, "train", seg_suffix="_gt.png")
    report = inspect_dataset(root, img_suffix="_rgb.png", seg_suffix="_gt.png")
    assert report["problems"] == [] and report["splits"]["val"]["pairs"] == 2
    assert (report["img_suffix"], report["seg_suffix"], report["splits"]["train"]["label_suffix"]) == (
        "_rgb.png", "_gt.png", "_gt")


def test_a_wrong_suffix_is_one_line_naming_the_folder_and_the_suffix(tmp_path: Path, monkeypatch, capsys) -> None:
    root = _named_set(tmp_path)
    labels, images = root / "labels" / "train", root / "images" / "train"
    with pytest.raises(SegkdError, match=rf"^{labels}: no file name ends with --seg-suffix '_mask.png'$"):
        build_dataset(root, "train", img_suffix="_rgb.png", seg_suffix="_mask.png")
    with pytest.raises(SegkdError, match=rf"^{images}: no file name ends with --img-suffix '.jpg'$"):
        build_dataset(root, "train", img_suffix=".jpg", seg_suffix="_gt.png")
    code, _, err = run_cli(monkeypatch, capsys, "data", "inspect", str(root), "--seg-suffix", "_mask.png")
    assert code == 1
    one_error_line(err, str(labels), "--seg-suffix '_mask.png'")
    code, _, err = run_cli(monkeypatch, capsys, "train", "-m", "segformer-b0", "--data", str(root), "--out",
                           str(tmp_path / "run"), "--img-suffix", "_rgb.png", "--seg-suffix", "_mask.png",
                           "--iters", "1", "--workers", "0", "--device", "cpu", "--no-progress")
    assert code == 1 and not (tmp_path / "run" / "run.json").exists()
    one_error_line(err, str(labels), "--seg-suffix '_mask.png'")


@pytest.mark.parametrize("args,needle", [
    (("--seg-suffix", "_mask"), "--seg-suffix '_mask': the end of the file names, extension included, ending in "
                                "'.png' (labels are PNG); e.g. _mask.png"),
    (("--seg-suffix", "_mask.jpg"), "--seg-suffix '_mask.jpg'"),
    (("--img-suffix", "_rgb"), "--img-suffix '_rgb': the end of the file names, extension included, ending in an "
                               "image extension (.png, .jpg"),
    (("--img-suffix", "sub/x.png"), "--img-suffix 'sub/x.png'"),
])
def test_bad_suffix_values_are_usage_errors(tmp_path: Path, monkeypatch, capsys, args: tuple[str, str],
                                            needle: str) -> None:
    for cmd in (["data", "inspect", str(tmp_path)], ["train", "-m", "segformer-b0", "--out", str(tmp_path / "r")],
                ["eval", str(tmp_path / "none.safetensors")]):
        code, _, err = run_cli(monkeypatch, capsys, *cmd, *args)
        assert code == 2, (cmd, err)
        one_error_line(err, needle)
    assert not (tmp_path / "r").exists()


def test_suffixes_refused_on_a_format_that_names_its_files(tmp_path: Path) -> None:
    for split in ("train", "trainannot"):
        (tmp_path / split).mkdir()
    with pytest.raises(SegkdError, match=r"--seg-suffix: .* is a camvid dataset, whose file names its format fixes; "
                                         r"the option applies to the folder and mmseg formats"):
        build_dataset(tmp_path, "train", seg_suffix="_gt.png")


def test_suffixes_are_kept_by_the_run_its_resume_and_its_eval(tmp_path: Path, monkeypatch, capsys) -> None:
    import yaml

    root = _named_set(tmp_path)
    run = tmp_path / "run"
    base = ["-m", "segformer-b0", "--data", str(root), "--out", str(run), "--crop", "32x32", "--batch", "2",
            "--val-every", "1", "--workers", "0", "--device", "cpu", "--no-progress"]
    code, _, err = run_cli(monkeypatch, capsys, "train", *base, "--iters", "1", "--img-suffix", "_rgb.png",
                           "--seg-suffix", "_gt.png")
    assert code == 0, err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["img_suffix"], saved["seg_suffix"]) == ("_rgb.png", "_gt.png")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", str(run), "--iters", "2", "--no-progress")
    assert code == 0, err  # read with the run's own suffixes (the folder cannot be paired without them)
    assert json.loads((run / "run.json").read_text())["summary"]["iterations"] == 2
    ckpt = str(run / "last.safetensors")
    code, out, err = run_cli(monkeypatch, capsys, "eval", ckpt, "--data", str(root), "--json", "--no-progress")
    assert code == 0, err
    assert "note: file names: --img-suffix _rgb.png --seg-suffix _gt.png (how the run of last.safetensors read " \
           "this dataset)" in " ".join(err.split())
    result = json.loads(out)
    assert result["n_images"] == 2 and (result["img_suffix"], result["seg_suffix"]) == (
        "_rgb.png", "_gt.png")
    code, _, err = run_cli(monkeypatch, capsys, "eval", ckpt, "--data", str(root), "--seg-suffix", "_x.png",
                           "--no-progress")  # typed: the run's are not used
    assert code == 1
    one_error_line(err, str(root / "labels" / "val"), "--seg-suffix '_x.png'")
