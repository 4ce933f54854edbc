"""Checkpoints: round trip of weights and metadata, atomic writes, one-line errors for bad files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from segkd.checkpoint import (
    CheckpointMeta,
    atomic_write_bytes,
    read_checkpoint,
    read_meta,
    save_checkpoint,
)
from segkd.errors import SegkdError
from segkd.models import create_model
from segkd.models.loading import load_model


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "segkd", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = create_model("segformer-b0", num_classes=3)
    meta = CheckpointMeta(model="segformer-b0", num_classes=3, class_names=["sky", "road", "car"],
                          args={"command": "test", "lr": 0.1}, metrics={"miou": 42.5})
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    return path, model, meta


def test_round_trip_weights_and_metadata(ckpt):
    path, model, meta = ckpt
    state, got = read_checkpoint(path)
    assert got == meta
    assert read_meta(path).class_names == ["sky", "road", "car"]
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    loaded = load_model(path)
    assert not loaded.training and loaded.segkd_meta.metrics == {"miou": 42.5}
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"good")

    from segkd.checkpoint import atomic_write

    def boom(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temp file left behind


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_respects_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        target = atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert target.stat().st_mode & 0o777 == mode
        assert os.umask(mask) == mask  # the helper put the umask back
    finally:
        os.umask(old)


def test_shape_mismatch_names_key_and_shapes(ckpt, tmp_path):
    path, _, meta = ckpt
    state, _ = read_checkpoint(path)
    state["decode_head.classifier.weight"] = torch.zeros(5, 256, 1, 1)
    save_checkpoint(tmp_path / "bad.safetensors", state, meta)
    with pytest.raises(SegkdError, match=r"decode_head.classifier.weight.*\(5, 256, 1, 1\).*\(3, 256, 1, 1\)"):
        load_model(tmp_path / "bad.safetensors")


def test_truncated_and_foreign_files(ckpt, tmp_path):
    path, _, _ = ckpt
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SegkdError, match="not a readable safetensors file"):
        load_model(tmp_path / "trunc.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(SegkdError, match="not a readable safetensors file"):
        read_meta(tmp_path / "text.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(SegkdError, match="without segkd metadata"):
        load_model(tmp_path / "plain.safetensors")


def test_cli_version_help_models():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("segkd ")
    r = _cli("--help")
    assert r.returncode == 0 and "models" in r.stdout and "convert" in r.stdout
    r = _cli("models", "segformer-b0", "--num-classes", "150", "--size", "512x512", "--json")
    assert r.returncode == 0, r.stderr
    import json

    row = json.loads(r.stdout)[0]
    assert row["name"] == "segformer-b0" and abs(row["gmacs"] - 8.4) / 8.4 < 0.05
    assert [t["name"] for t in row["taps"]][:4] == ["stage1", "stage2", "stage3", "stage4"]


def test_cli_errors_are_one_line(tmp_path):
    r = _cli("models", "segformer-bo")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "did you mean" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "t.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    r = _cli("convert", str(tmp_path / "t.safetensors"), "-m", "segformer-b0", "-o", str(tmp_path / "o.safetensors"))
    assert r.returncode == 1 and "not a readable safetensors file" in r.stderr
    assert r.stderr.strip().count("\n") == 0
    r = _cli("models", "--size", "12xab")
    assert r.returncode == 1 and "HxW" in r.stderr
