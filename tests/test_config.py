"""Experiment config files (--config) and options defined once on the config dataclasses."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from segkd.checkpoint import CheckpointMeta, read_checkpoint, save_checkpoint
from segkd.engine.config import MACHINE_OPTIONS, TrainConfig, config_values, read_config_file
from segkd.errors import SegkdError
from segkd.models import create_model
from segkd.runs.distill import DistillConfig
from tests.conftest import run_cli

SMALL = {"model": "segformer-b0", "data": "synth", "crop": 32, "batch": 2, "iters": 2, "val_every": 2,
         "workers": 0, "device": "cpu", "progress": False, "scale": "1", "lr": "6e-4"}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_config_field_is_an_option_of_its_command_once() -> None:
    from segkd.cli import _distill_parameters, _train_parameters

    train = {p.name for p in _train_parameters()}
    distill = {p.name for p in _distill_parameters()}
    assert {f.name for f in fields(TrainConfig)} <= train  # every field has its flag, generated from the field
    assert {f.name for f in fields(DistillConfig)} - {"method_opts", "aux_weight"} <= distill
    assert {"c2vkd_add_ce", "no_vlfd_global", "variant", "pdd_mode", "method_opt", "config"} <= distill
    assert set(MACHINE_OPTIONS) == {"device", "workers", "progress", "log_every", "threads", "keep"}


def test_config_file_values_are_typed_like_the_flags(tmp_path: Path) -> None:
    data = yaml.safe_load("iters: 10\nlr: 6e-4\ncrop: 64\nflip: false\nclip_grad: null\nval-every: 5\n")
    assert isinstance(data["lr"], str)  # YAML 1.1 reads 6e-4 as a string: the field type decides
    vals = config_values(TrainConfig, data, "run.yaml")
    assert vals == {"iters": 10, "lr": 6e-4, "crop": "64", "flip": False, "clip_grad": None, "val_every": 5}
    toml = _write(tmp_path / "run.toml", 'model = "segformer-b0"\niters = 3\n[method_opts]\ntemperature = 2\n')
    assert config_values(DistillConfig, read_config_file(toml), str(toml)) == {
        "model": "segformer-b0", "iters": 3, "method_opts": {"temperature": "2"}}
    js = _write(tmp_path / "run.json", json.dumps({"batch": 4.0, "keep": "best"}))
    assert config_values(TrainConfig, read_config_file(js), str(js)) == {"batch": 4, "keep": "best"}
    # a field may be named by its flag too: distill's --student is the field model
    assert config_values(DistillConfig, {"student": "segformer-b1"}, "d.yaml") == {"model": "segformer-b1"}
    with pytest.raises(SegkdError, match="d.yaml: option 'model' is given twice"):
        config_values(DistillConfig, {"model": "segformer-b0", "student": "segformer-b1"}, "d.yaml")


@pytest.mark.parametrize(("text", "message"), [
    ("iters: ten\n", "bad.yaml: iters must be an integer, got 'ten'"),
    ("iters: 2.5\n", "bad.yaml: iters must be an integer, got 2.5"),
    ("lr: .nan\n", "bad.yaml: lr must be a finite number"),
    ("flip: 1\n", "bad.yaml: flip must be true or false, got 1"),
    ("crop: [64, 64]\n", "bad.yaml: crop must be a string"),
    ("lrr: 0.1\n", "bad.yaml: unknown option 'lrr' for segkd train; did you mean lr?"),
    ("method: kd\n", "unknown option 'method' for segkd train (a distill option: run this file with segkd distill"),
    ("- iters\n", "bad.yaml: expected a mapping of option names to values, got a list"),
    ("iters: [1\n", "bad.yaml: not valid YAML"),
    ("method_opts: {temperature: {a: 1}}\n", "method_opts.temperature must be a number, string, boolean"),
])
def test_bad_config_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    from segkd.cliopts import resolve_config

    path = _write(tmp_path / "bad.yaml", text)
    cls = DistillConfig if "method_opts" in text else TrainConfig
    with pytest.raises(SegkdError) as e:
        resolve_config(cls, {}, str(path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_file_errors_through_the_cli(tmp_path: Path, monkeypatch, capsys) -> None:
    cases = [(["--config", str(tmp_path / "none.yaml")], "--config"),
             (["--config", str(_write(tmp_path / "c.txt", "iters: 1"))], "expected a .yaml, .yml, .toml or .json"),
             (["--config", str(_write(tmp_path / "c.yaml", "iters: 1\n")), "--resume", str(tmp_path)],
              "--config cannot be combined with --resume"),
             (["--config", str(tmp_path / "c.yaml")], "--model is required (in --config or as flags")]
    for args, message in cases:
        code, out, err = run_cli(monkeypatch, capsys, "train", *args)
        assert code == 1 and message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_config_then_flags_and_the_written_config_repeats_the_run(tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = _write(tmp_path / "exp.yaml", yaml.safe_dump({**SMALL, "iters": 50, "seed": 3}))
    first = tmp_path / "first"
    code, out, err = run_cli(monkeypatch, capsys, "train", "--config", str(cfg), "--iters", "2", "--out", str(first))
    assert code == 0, err
    written = yaml.safe_load((first / "config.yaml").read_text())
    assert written["iters"] == 2 and written["seed"] == 3 and written["crop"] == "32"  # flag > file > default
    assert written == json.loads((first / "run.json").read_text())["config"]
    assert f"segkd train --config {first / 'config.yaml'} --out NEW_RUN_DIR" in (first / "config.yaml").read_text()
    again = tmp_path / "again"
    code, out, err = run_cli(monkeypatch, capsys, "train", "--config", str(first / "config.yaml"), "--out",
                             str(again))
    assert code == 0, err
    a, _ = read_checkpoint(first / "last.safetensors")
    b, _ = read_checkpoint(again / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same run, bit for bit
    code, out, err = run_cli(monkeypatch, capsys, "train", "--config", str(first / "config.yaml"))
    # its own --out is never overwritten, nor the config file it was given (issue 23 item 2)
    assert code == 1 and f"--config {first / 'config.yaml'} is the config.yaml this run would write" in err


def test_distill_config_merges_method_opts_file_flags(tmp_path: Path, monkeypatch, capsys) -> None:
    teacher = tmp_path / "t.safetensors"
    torch.manual_seed(0)
    save_checkpoint(teacher, create_model("deeplabv3-resnet18", num_classes=6),
                    CheckpointMeta(model="deeplabv3-resnet18", num_classes=6))
    doc = {**SMALL, "iters": 1, "val_every": 1, "method": "kd", "teacher_weights": str(teacher),
           "method_opts": {"temperature": 4, "weight": 0.5, "mask_ignore": True}}
    cfg = _write(tmp_path / "kd.yaml", yaml.safe_dump(doc))
    out_dir = tmp_path / "kd"
    code, out, err = run_cli(monkeypatch, capsys, "distill", "--config", str(cfg), "--method-opt", "temperature=2",
                             "--out", str(out_dir))
    assert code == 0, err
    opts = json.loads((out_dir / "distill.json").read_text())["options"]
    assert opts["temperature"] == 2.0 and opts["weight"] == 0.5 and opts["mask_ignore"] is True
    written = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert written["method"] == "kd" and written["teacher"] == "deeplabv3-resnet18"  # resolved from the checkpoint
    assert written["method_opts"]["temperature"] == "2"
    code, out, err = run_cli(monkeypatch, capsys, "distill", "--config", str(cfg), "--c2vkd-add-ce", "--out",
                             str(tmp_path / "x"))
    assert code == 1 and "--c2vkd-add-ce is a c2vkd option; --method is kd" in err
