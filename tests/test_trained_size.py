"""The trained size remembered: checkpoints record it, eval/export/bench default to it and say so (issue 20)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from segkd.checkpoint import CheckpointMeta, read_meta, save_checkpoint
from segkd.shapes import TrainedSize, size_from_options, trained_size
from tests.conftest import run_cli

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-iteration DeepLabV3-R18 run on 48x64 synthetic images resized to 24x32, scored like the CamVid protocol
    (logits upsampled to the native 48x64 labels)."""
    from segkd.data import synthesize
    from segkd.engine.config import TrainConfig
    from segkd.runs.train import run_train

    root = tmp_path_factory.mktemp("trained")
    data = synthesize(root / "data", n_train=4, n_val=3, size=(48, 64), num_classes=3, seed=1)
    cfg = TrainConfig(model="deeplabv3-resnet18", data=str(data), out=str(root / "run"), iters=2, batch=2,
                      val_every=2, resize="24x32", crop="24x32", scale="1", val_labels="native", aux_weight=0.0,
                      workers=0, progress=False, device="cpu", seed=0)
    run_train(cfg)
    return root


def test_the_checkpoint_records_crop_resize_and_how_it_was_scored(trained_run: Path) -> None:
    meta = read_meta(trained_run / "run" / "last.safetensors")
    assert meta.input_size == {"crop": [24, 32], "resize": [24, 32], "val_labels": "native"}
    size = trained_size(meta)
    assert size == TrainedSize((24, 32), (24, 32), "native", "metadata") and size.deploy == (24, 32)


def test_older_checkpoints_fall_back_to_their_run_arguments() -> None:
    old = CheckpointMeta.from_json(json.dumps({"model": "segformer-b0", "num_classes": 2,
                                               "args": {"crop": "60x80", "resize": None, "val_labels": "resized"}}))
    assert old.input_size == {}  # a checkpoint written before the field loads with the default
    assert trained_size(old) == TrainedSize((60, 80), None, "resized", "run arguments")
    assert trained_size(old).deploy == (60, 80)  # crop-only: export/bench use the crop; eval stays native
    assert trained_size(CheckpointMeta(model="segformer-b0", num_classes=2)) == TrainedSize()
    assert size_from_options({"crop": "nonsense"}) == TrainedSize()  # unparseable: unknown, never an error


def test_eval_rescores_the_run_with_no_options(trained_run: Path, monkeypatch, capsys) -> None:
    """`segkd eval CKPT --data ROOT` reproduces the run's own final validation (same size, native labels); the
    stored size alone (--resize native) is another score, and the note says which size was used."""
    ckpt = trained_run / "run" / "last.safetensors"
    data = str(trained_run / "data")
    code, out, err = run_cli(monkeypatch, capsys, "eval", str(ckpt), "--data", data, "--json", "--no-progress",
                             "--device", "cpu")
    assert code == 0, err
    res = json.loads(out)
    assert res["resize"] == [24, 32] and res["val_labels"] == "native"
    assert 3 * 24 * 32 < res["n_pixels"] <= 3 * 48 * 64  # scored at the labels' stored 48x64
    assert res["miou"] == pytest.approx(read_meta(ckpt).metrics["miou"], abs=1e-9)
    assert "note: input 24x32 (the size last.safetensors was validated at, from its metadata); labels at their " \
           "stored size" in err
    code, out, err = run_cli(monkeypatch, capsys, "eval", str(ckpt), "--data", data, "--json", "--no-progress",
                             "--device", "cpu", "--resize", "native")
    assert code == 0, err
    res = json.loads(out)
    assert res["resize"] is None and res["input_size"] == "input at the stored size (--resize native)"
    assert "note: input" not in err  # a size the user typed needs no note
    code, out, err = run_cli(monkeypatch, capsys, "eval", str(ckpt), "--data", data, "--json", "--no-progress",
                             "--device", "cpu", "--val-labels", "resized")
    assert code == 0 and json.loads(out)["n_pixels"] <= 3 * 24 * 32  # labels resized with the input
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(ckpt), "--data", data, "--val-labels", "big")
    assert code == 2 and "--val-labels must be resized or native, got 'big'" in err  # a usage error


def test_export_and_bench_default_to_the_trained_size(trained_run: Path, monkeypatch, capsys) -> None:
    from segkd.bench.run import BenchConfig, bench_models

    ckpt = trained_run / "run" / "last.safetensors"
    onnx_path = trained_run / "m.onnx"
    code, out, err = run_cli(monkeypatch, capsys, "export", str(ckpt), "--out", str(onnx_path), "--no-progress")
    assert code == 0, err
    assert "size 24x32: the size last.safetensors was validated at, from its metadata" in out
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    assert json.loads(props["segkd.export"])["export_size"] == [24, 32]
    assert trained_size(json.loads(props["segkd"])).resize == (24, 32)  # the export keeps the record
    rep = bench_models(BenchConfig(models=[str(ckpt), str(onnx_path), "deeplabv3-resnet18"],
                                   latency=False))
    assert rep["settings"]["inputs"] == [[1, 3, 24, 32]]
    assert rep["settings"]["inputs_source"] == "the size(s) the models were trained at: 24x32 from last.safetensors, " \
                                               "m.onnx"
    rep = bench_models(BenchConfig(models=["segformer-b0"], latency=False, flops=False))
    assert rep["settings"]["inputs"] == [[1, 3, 512, 1024]] and "no MODEL records" in rep["settings"]["inputs_source"]
    rep = bench_models(BenchConfig(models=[str(ckpt)], inputs=["32x32"], latency=False, flops=False))
    assert rep["settings"]["inputs"] == [[1, 3, 32, 32]] and rep["settings"]["inputs_source"] == "--input"


def test_export_of_a_checkpoint_without_a_size_keeps_512x1024(tmp_path: Path) -> None:
    from segkd.export.onnx_export import ExportConfig, trained_defaults

    meta = CheckpointMeta(model="segformer-b0", num_classes=2)
    cfg, note = trained_defaults(ExportConfig(), meta, tmp_path / "a.safetensors")
    assert cfg.size == "512x1024" and note == "default 512x1024 (a.safetensors records no training size)"
    meta.input_size = {"crop": [64, 64], "resize": None, "val_labels": "resized"}
    cfg, note = trained_defaults(ExportConfig(int8=True), meta, tmp_path / "a.safetensors")
    assert cfg.size == "64x64" and cfg.resize is None and "trained (crop) at" in note
    cfg, note = trained_defaults(ExportConfig(size="96x96"), meta, tmp_path / "a.safetensors")
    assert cfg.size == "96x96" and note == "--size"
    save_checkpoint(tmp_path / "b.safetensors", {"w": torch.zeros(1)}, meta)
    assert read_meta(tmp_path / "b.safetensors").input_size["crop"] == [64, 64]
