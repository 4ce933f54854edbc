"""examples/bench_label_scarce_onnx.py end to end on tiny checkpoints: two exports, one bench run, JSON and page."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import load_example

from segkd.checkpoint import CheckpointMeta, file_sha256, save_checkpoint
from segkd.models import create_model


def _ckpt(path: Path, model: str, **meta) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(path, create_model(model, num_classes=11), CheckpointMeta(model=model, num_classes=11,
                                                                                     **meta))


def test_exports_both_and_benches_them_in_one_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))  # the child `segkd` is this tree's
    bench = load_example("bench_label_scarce_onnx.py")
    base = _ckpt(tmp_path / "b0.safetensors", "segformer-b0")  # records no training: marked untrained
    student = _ckpt(tmp_path / "mnv3.safetensors", "lraspp-mobilenetv3_large_100", source="segkd distill --method kd",
                    metrics={"iteration": 1600, "miou": 0.4321})
    stem = tmp_path / "docs" / "page"
    assert bench.main(["--student", str(student), "--baseline", str(base), "--out", str(stem), "--size", "64x96",
                       "--warmup", "1", "--iters", "2", "--work", str(tmp_path / "w")]) == 0
    doc = json.loads(stem.with_suffix(".json").read_text())
    assert [m["architecture"] for m in doc["bench"]["models"]] == ["segformer-b0", "lraspp-mobilenetv3_large_100"]
    assert all(m["complexity"][0]["input"] == [1, 3, 64, 96] for m in doc["bench"]["models"])
    runs = [r for m in doc["bench"]["models"] for r in m["runs"]]
    assert {(r["backend"], r["batch"]) for r in runs} == {("onnxruntime", 1)} and len(runs) == 2  # one ORT run each
    assert doc["models"]["student"]["onnx_sha256"] == file_sha256(tmp_path / "w" / "student.onnx")
    assert doc["models"]["baseline"]["sha256"] == file_sha256(base) and not doc["models"]["baseline"]["trained"]
    page = stem.with_suffix(".md").read_text()
    assert "| baseline | segformer-b0 | **untrained weights** (no training recorded: latency only) |" in page
    assert "| student | lraspp-mobilenetv3_large_100 | `segkd distill --method kd`, iteration 1600, val mIoU 43.21 |" \
        in page
    p50 = [next(r for r in m["runs"])["latency_ms"]["p50"] for m in doc["bench"]["models"]]
    assert f"| {p50[0] / p50[1]:.2f}x |" in page  # the student's speed-up over the baseline, from the one run
