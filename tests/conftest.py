"""Shared test helpers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(filename: str) -> ModuleType:
    """Import ``examples/<filename>`` as a module (the examples are scripts, not a package)."""
    name = "example_" + Path(filename).stem
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / filename)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``segkd ARGS`` in-process through the console entry point; (exit code, stdout, stderr)."""
    from segkd.cli import main

    monkeypatch.setattr(sys, "argv", ["segkd", *args])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


def build_distill_task(cfg: Any, data: Any) -> Any:
    """The task ``segkd distill`` builds for ``cfg`` on ``data`` (checks, then build), on the CPU."""
    import torch

    from segkd.engine.distributed import DistInfo
    from segkd.runs.distill import DistillBuilder

    cfg.check()
    builder = DistillBuilder()
    builder.check(cfg)
    return builder.build(cfg, data, DistInfo(device=torch.device("cpu")))


def one_error_line(err: str, *needles: str) -> str:
    """The one ``error:`` line of a failed command's stderr (no traceback), checked to contain every needle."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def small_ckpt(tmp_path: Path) -> Path:
    """A segformer-b0 checkpoint for the 6 classes of the synthetic set."""
    import torch

    from segkd.checkpoint import CheckpointMeta, save_checkpoint
    from segkd.data.synth import SHAPE_NAMES
    from segkd.models import create_model

    torch.manual_seed(0)
    model = create_model("segformer-b0", num_classes=6)
    return save_checkpoint(tmp_path / "b0.safetensors", model,
                           CheckpointMeta(model="segformer-b0", num_classes=6, class_names=SHAPE_NAMES[:6]))


def random_teacher(path: Path, num_classes: int, seed: int, model: str = "deeplabv3-resnet18") -> Path:
    """A segkd checkpoint of a randomly initialised zoo model (drawn after ``torch.manual_seed(seed)``): the teacher
    the distillation tests need when its weights do not matter, only that they are fixed."""
    import torch

    from segkd.checkpoint import CheckpointMeta, save_checkpoint
    from segkd.models import create_model

    torch.manual_seed(seed)
    return save_checkpoint(path, create_model(model, num_classes=num_classes),
                           CheckpointMeta(model=model, num_classes=num_classes))
