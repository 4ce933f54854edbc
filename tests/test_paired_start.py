"""Paired starts: at one seed, the student of every command and method starts from bit-identical weights.

``--teacher-cache`` loads the teacher before the student is built; before segkd.engine.seeding the cached rows of
the CamVid protocol started from other weights than B0 alone at the same seed. Each run here stops at its first
step (a callback), and the test compares the initial state dicts the trainer was handed and the sha256 run.json
records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_teacher

from segkd.data import synthesize
from segkd.engine import trainer as trainer_mod
from segkd.engine.config import TrainConfig
from segkd.engine.seeding import build_seeded, build_student, role_seed, weights_sha256
from segkd.models import create_model
from segkd.runs.distill import DistillConfig, run_distill
from segkd.runs.train import run_train

K = 3


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paired")
    data = synthesize(root / "data", n_train=6, n_val=2, size=(32, 48), num_classes=K, seed=1)
    unl = root / "unl"
    unl.mkdir()
    for p in sorted((data / "images" / "val").iterdir()):
        (unl / p.name).write_bytes(p.read_bytes())
    teacher = random_teacher(root / "teacher.safetensors", K, seed=123)
    return {"data": data, "unl": unl, "teacher": teacher, "root": root}


def _initial_student(monkeypatch: pytest.MonkeyPatch, run, cfg) -> tuple[dict[str, torch.Tensor], str]:
    """The student's state dict as the trainer receives it, and the sha256 that run.json records."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    orig = trainer_mod.Trainer.fit

    def fit(self):  # noqa: ANN001 - the patched method
        seen["student"] = {k: v.clone() for k, v in self.task.deploy_models()["student"].state_dict().items()}
        self._begin()  # writes run.json (with the initial hash), then stop before any step
        raise _Stop

    monkeypatch.setattr(trainer_mod.Trainer, "fit", fit)
    with pytest.raises(_Stop):
        run(cfg)
    monkeypatch.setattr(trainer_mod.Trainer, "fit", orig)
    doc = json.loads((Path(cfg.out) / "run.json").read_text())
    return seen["student"], doc["initial_weights_sha256"]["student"]


def test_every_row_starts_from_the_same_student(setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    root = setup["root"]
    common = dict(model="segformer-b0", data=str(setup["data"]), seed=7, iters=2, batch=2, crop="32x32",
                  workers=0, device="cpu", progress=False)
    teacher = dict(teacher="deeplabv3-resnet18", teacher_weights=str(setup["teacher"]))
    runs = {
        "train": (run_train, TrainConfig(out=str(root / "train"), **common)),
        "kd online": (run_distill, DistillConfig(method="kd", out=str(root / "online"), **teacher, **common)),
        "kd cache": (run_distill, DistillConfig(method="kd", teacher_cache=str(root / "cache"),
                                                out=str(root / "cache-run"), **teacher, **common)),
        "dkd cache + unlabeled": (run_distill, DistillConfig(
            method="dkd", teacher_cache=str(root / "cache-unl"), unlabeled=str(setup["unl"]), out=str(root / "unl-run"),
            **teacher, **common)),
        "cwd features (adapters)": (run_distill, DistillConfig(
            method="cwd", method_opts={"feature": "true"}, teacher_cache=str(root / "cache2"),
            out=str(root / "cwd-run"), **teacher, **common)),
        "dml (peer)": (run_distill, DistillConfig(method="dml", peer="segformer-b0", out=str(root / "dml"),
                                                  **common)),
    }
    states = {name: _initial_student(monkeypatch, fn, cfg) for name, (fn, cfg) in runs.items()}
    ref_state, ref_hash = states["train"]
    torch.manual_seed(7)
    assert weights_sha256(create_model("segformer-b0", num_classes=K)) == ref_hash  # the first draw after seeding
    for name, (state, digest) in states.items():
        assert digest == ref_hash, name
        assert state.keys() == ref_state.keys()
        assert all(torch.equal(state[k], ref_state[k]) for k in ref_state), name
    other_seed = TrainConfig(out=str(root / "train8"), **{**common, "seed": 8})
    assert _initial_student(monkeypatch, run_train, other_seed)[1] != ref_hash  # the hash does see the seed


def test_adapters_start_the_same_online_and_cached(setup: dict[str, Path]) -> None:
    """The method's adapters come from their own stream: building a teacher first does not move them."""
    from segkd.methods.base import METHODS, make_options

    spec = METHODS.get("cwd")
    opts = make_options(spec, {"feature": "true"})
    student = create_model("segformer-b0", num_classes=K)
    teacher = create_model("deeplabv3-resnet18", num_classes=K)
    a = build_seeded(5, "method", lambda: spec.build(opts, student, teacher))
    torch.randn(1000)  # anything else drawn in between
    b = build_seeded(5, "method", lambda: spec.build(opts, student, teacher))
    assert weights_sha256(a) == weights_sha256(b)
    assert weights_sha256(build_seeded(6, "method", lambda: spec.build(opts, student, teacher))) != weights_sha256(a)


def test_role_streams() -> None:
    assert role_seed(3, "student") == 3
    assert len({role_seed(s, r) for s in range(4) for r in ("student", "peer", "method")}) == 12
    torch.manual_seed(0)
    before = torch.get_rng_state()
    build_seeded(1, "peer", lambda: torch.randn(3))
    assert torch.equal(torch.get_rng_state(), before)  # forked streams leave the global one untouched
    x = build_student(4, lambda: torch.randn(3))
    torch.manual_seed(4)
    assert torch.equal(x, torch.randn(3))  # the student is the first draw after seeding, as segkd train did


@pytest.mark.parametrize("seed,prefix", [(0, "8dbce4b9e640"), (1, "c6451d0a05e3"), (2, "7684408cc72e")])
def test_the_b0_draw_of_the_first_table_is_unchanged(seed: int, prefix: str) -> None:
    """The CamVid protocol pairs new runs with runs of its first table (B0 alone, 11 classes) whose run.json had no
    initial-weights hash. Those runs' student was the first draw after seeding; these are the sha256 of that draw as
    the first table's code (commit 4328eb7) builds it, recomputed by an audit: the draw must not move."""
    assert weights_sha256(build_student(seed, lambda: create_model("segformer-b0", num_classes=11))).startswith(prefix)


def test_the_timm_student_starts_the_same_alone_and_from_an_onnx_teacher(setup: dict[str, Path],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The CamVid protocol's quarter-mnv3 / quarter-mnv3-kd+unl pair: the LR-ASPP MobileNetV3 student trained alone
    and distilled (kd) from an ONNX teacher through the cache with unlabeled images start from one draw."""
    from segkd.export.onnx_export import ExportConfig, export_checkpoint

    root, model = setup["root"], "lraspp-mobilenetv3_large_100"
    onnx = root / "teacher.onnx"
    export_checkpoint(setup["teacher"], onnx, ExportConfig(size="32x48", progress=False))
    common = dict(model=model, data=str(setup["data"]), seed=3, iters=2, batch=2, crop="32x32", workers=0,
                  device="cpu", progress=False)
    alone = _initial_student(monkeypatch, run_train, TrainConfig(out=str(root / "mnv3-train"), **common))
    kd = _initial_student(monkeypatch, run_distill, DistillConfig(
        method="kd", teacher_weights=str(onnx), teacher_cache=str(root / "cache-onnx"), unlabeled=str(setup["unl"]),
        out=str(root / "mnv3-kd"), **common))
    assert alone[1] == kd[1] == weights_sha256(build_student(3, lambda: create_model(model, num_classes=K)))
    assert alone[0].keys() == kd[0].keys() and all(torch.equal(alone[0][k], kd[0][k]) for k in alone[0])
