"""`segkd predict` (issue 20 item 3): label PNGs and overlays at the trained size, never overwriting, one-line
errors, checkpoint and ONNX alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import segkd
from segkd.checkpoint import CheckpointMeta, save_checkpoint
from segkd.models import create_model, upsample_logits
from tests.conftest import one_error_line, run_cli

torch.set_num_threads(1)
PALETTE = [[10, 20, 30], [200, 0, 0], [0, 200, 0]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SegFormer-B0 of 3 classes that was trained (so says its metadata) on images resized to 32x32."""
    torch.manual_seed(0)
    model = create_model("segformer-b0", num_classes=3)
    meta = CheckpointMeta(model="segformer-b0", num_classes=3, palette=PALETTE,
                          input_size={"crop": None, "resize": [32, 32], "val_labels": "native"})
    return save_checkpoint(tmp_path_factory.mktemp("predict") / "b0.safetensors", model, meta)


def _image(path: Path, h: int, w: int, seed: int) -> np.ndarray:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def test_predict_a_folder(ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    src = tmp_path / "images"
    src.mkdir()
    rgb = _image(src / "a.png", 32, 32, 0)
    _image(src / "b.jpg", 45, 61, 1)
    (src / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "out"
    code, stdout, err = run_cli(monkeypatch, capsys, "predict", str(ckpt), str(src), "--out", str(out),
                                "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert "note: input 32x32 (the size b0.safetensors was validated at, from its metadata)" in err
    assert "wrote 4 files for 2 of 2 images" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_overlay.png", "b.png", "b_overlay.png"]
    label = Image.open(out / "a.png")
    assert label.mode == "P" and label.getpalette()[:9] == [c for col in PALETTE for c in col]
    # by hand: the image is already 32x32, so no resize; normalise, forward, upsample, argmax
    model = segkd.load_model(ckpt)
    x = (torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255 - torch.tensor(model.segkd_meta.mean).view(
        1, 3, 1, 1)) / torch.tensor(model.segkd_meta.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = upsample_logits(model(x), (32, 32)).argmax(1)[0].numpy()
    np.testing.assert_array_equal(np.array(label), ref)
    assert Image.open(out / "b.png").size == (61, 45)  # at the image's own size
    assert Image.open(out / "b_overlay.png").size == (61, 45)

    before = (out / "a.png").read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "predict", str(ckpt), str(src / "a.png"), "--out", str(out))
    one_error_line(err, "a.png exists (and 1 more)", "never overwrites", "--overwrite")
    assert code == 1 and (out / "a.png").read_bytes() == before
    code, _, err = run_cli(monkeypatch, capsys, "predict", str(ckpt), str(src / "a.png"), "--out", str(out),
                           "--overwrite", "--flip", "--no-overlay", "--resize", "native", "--no-progress")
    assert code == 0, err
    assert "note: input" not in err  # a size the user typed needs no note


def test_predict_with_the_exported_onnx_gives_the_same_labels(ckpt: Path, tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    from segkd.export.onnx_export import ExportConfig, export_checkpoint

    _image(tmp_path / "c.png", 40, 56, 2)
    onnx_path = tmp_path / "b0.onnx"
    export_checkpoint(ckpt, onnx_path, ExportConfig(progress=False))
    for source, out in ((ckpt, tmp_path / "pt"), (onnx_path, tmp_path / "ort")):
        code, stdout, err = run_cli(monkeypatch, capsys, "predict", str(source), str(tmp_path / "c.png"), "--out",
                                    str(out), "--device", "cpu", "--no-progress", "--json")
        assert code == 0, err
        report = json.loads(stdout)
        assert report["written"] == [str(out / "c.png")] and report["resize"] == [32, 32] and not report["failed"]
    a, b = np.array(Image.open(tmp_path / "pt" / "c.png")), np.array(Image.open(tmp_path / "ort" / "c.png"))
    assert (a == b).mean() > 0.999


def test_bad_inputs_are_one_line(ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "x.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "sub" / "ok.png", 32, 32, 3)
    (tmp_path / "sub" / "broken.png").write_bytes(b"not a png")
    cases = [((str(tmp_path / "missing.png"),), "missing.png: no such file or folder"),
             ((str(empty),), "no images"), ((str(tmp_path / "x.txt"),), "x.txt: not an image file"),
             ((str(tmp_path / "sub"), "--alpha", "2"), "--alpha must be in [0, 1]")]
    for args, needle in cases:
        code, _, err = run_cli(monkeypatch, capsys, "predict", str(ckpt), *args, "--out", str(tmp_path / "o"))
        assert code == 1
        one_error_line(err, needle)
    code, _, err = run_cli(monkeypatch, capsys, "predict", str(ckpt), str(tmp_path / "sub"), "--out",
                           str(tmp_path / "o"), "--no-progress", "--device", "cpu")
    assert code == 1 and (tmp_path / "o" / "ok.png").is_file()  # the readable image is still written
    one_error_line(err, "1 of 2 images could not be read (skipped), first:", "broken.png: unreadable image")
    assert "note: skipped" in err
