"""Adding a method is one file: a toy method registered here, with nothing else in segkd edited, runs end to end
(``segkd distill``, its distill.json and self-report, the generated help, the teacher cache, ``bench --train-step``)
and is refused by the cache when its spec says so (issue 22, item 4)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import one_error_line
from test_faults import _main
from torch import Tensor, nn

from segkd.engine.losses import seg_cross_entropy
from segkd.methods import METHODS
from segkd.methods.base import Method, align_logits, register_method
from segkd.models import SegModel, SegOutput

torch.set_num_threads(1)


@dataclass
class ToyOptions:
    """``weight`` of the squared logit difference (the toy's only term besides CE)."""

    weight: float = 0.5

    def check(self) -> None:
        if self.weight <= 0:
            raise ValueError("weight must be > 0")


class Toy(Method):
    def __init__(self, opts: ToyOptions, ignore_index: int = 255) -> None:
        super().__init__(opts, ignore_index)
        self.scale = nn.Parameter(torch.ones(()))  # one trainable adapter parameter

    def forward(self, images: Tensor, labels: Tensor, outs: dict[str, SegOutput],
                kd_labels: Tensor | None = None) -> dict[str, Tensor]:
        zs, zt, _ = align_logits(outs["student"].logits, outs["teacher"].logits, labels, "label")
        return self.record({"ce": (1.0, seg_cross_entropy(outs["student"].logits, labels, self.ignore_index)),
                            "l2": (self.opts.weight, ((self.scale * zs - zt) ** 2).mean())})

    def report(self) -> dict[str, object]:
        return {"toy_scale": float(self.scale.detach())}


@pytest.fixture
def toy():
    """Register ``toy`` (and ``toynocache``, whose spec refuses the cache) for one test, then remove them."""
    def build(opts: ToyOptions, student: SegModel, teacher: SegModel, ignore_index: int = 255) -> Toy:
        return Toy(opts, ignore_index)

    register_method("toy", "toy: squared logit difference", ToyOptions)(build)
    register_method("toynocache", "toy without cache", ToyOptions, cache_refusal="it is a test")(build)
    yield
    for name in ("toy", "toynocache"):
        METHODS._items.pop(name, None)


def _distill(out: Path, teacher: Path, *extra: object) -> list[object]:
    return ["distill", "--method", "toy", "--student", "segformer-b0", "--teacher-weights", teacher, "--data",
            "synth", "--batch", "2", "--crop", "64x64", "--workers", "0", "--device", "cpu", "--no-progress",
            "--iters", "2", "--val-every", "2", "--threads", "1", "--out", out, *extra]


def test_a_method_in_one_file_runs_end_to_end(toy: None, small_ckpt: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _main(_distill(tmp_path / "run", small_ckpt, "--method-opt", "weight=0.25"), capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "distill.json").read_text())
    assert report["method"] == "toy" and report["options"] == {"weight": 0.25}
    assert report["adapter_params"]["student"] == 1 and "toy_scale" in report  # its own report
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_l2", "raw_l2", "loss_ce"} <= set(log[0])
    # the same method through the teacher cache, and resumed
    code, err = _main(_distill(tmp_path / "cached", small_ckpt, "--teacher-cache", tmp_path / "cache"), capsys)
    assert code == 0, err
    assert (tmp_path / "cache" / "cache.json").is_file()


def test_generated_help_and_cache_refusal_name_a_new_method(toy: None, small_ckpt: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from typer.testing import CliRunner

    from segkd.cli import app

    help_text = " ".join(CliRunner().invoke(app, ["distill", "--help"], terminal_width=200).output.split())
    assert "toy" in help_text and "toynocache" in help_text, help_text[:500]  # docstring and --method, generated
    args = _distill(tmp_path / "r", small_ckpt, "--teacher-cache", tmp_path / "c")
    args[2] = "toynocache"
    code, err = _main(args, capsys)
    one_error_line(err, "--teacher-cache cannot serve toynocache: it is a test")


def test_bench_train_step_times_a_new_method(toy: None) -> None:
    from segkd.bench.trainstep import bench_train_step

    rep = bench_train_step("toy", "segformer-b0", "segformer-b0", (2, 3, 64, 64), torch.device("cpu"), 3, 1, 2,
                           0.0, 1, cached=True)
    assert rep["method"] == "toy" and rep["adapter_params"] == 1 and rep["teacher_cache"] is True
    assert rep["overhead_ratio"] > 0
