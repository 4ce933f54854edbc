"""``segkd distill --teacher-weights MODEL.onnx``: an ONNX Runtime teacher for the logit methods (issue 20 item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_teacher
from torch import nn

from segkd.checkpoint import file_sha256
from segkd.data.synth import synthesize
from segkd.errors import SegkdError
from segkd.export.onnx_export import ExportConfig, export_checkpoint
from segkd.models.onnx_teacher import load_onnx_teacher
from segkd.runs.distill import DistillBuilder, DistillConfig, prepare_distill_data

K = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 6-image synthetic set (3 classes, 32x48), a DeepLabV3-R18 teacher checkpoint and its segkd export."""
    root = tmp_path_factory.mktemp("onnxt")
    data = synthesize(root / "data", n_train=6, n_val=2, size=(32, 48), num_classes=K, seed=3)
    ckpt = random_teacher(root / "t.safetensors", K, seed=1)
    onnx = root / "t.onnx"
    export_checkpoint(ckpt, onnx, ExportConfig(size="32x48", progress=False))
    return {"data": data, "ckpt": ckpt, "onnx": onnx, "root": root}


def _cfg(tiny: dict[str, Path], tmp: Path, **kw) -> DistillConfig:
    base = dict(model="segformer-b0", method="kd", teacher_weights=str(tiny["onnx"]), data=str(tiny["data"]),
                crop="32x32", iters=2, batch=2, val_every=2, workers=0, device="cpu", progress=False,
                out=str(tmp / "run"))
    return DistillConfig(**{**base, **kw})


def _cache_logits(cfg: DistillConfig) -> dict[str, torch.Tensor]:
    cfg.check()
    builder = DistillBuilder()
    builder.check(cfg)
    cache = prepare_distill_data(cfg, None, builder).train.cache
    return {sha: cache.tensors(sha)["logits"].float() for sha in cache.manifest["images"]}


def test_segkd_export_and_pytorch_build_agreeing_caches(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The same checkpoint as a PyTorch teacher and as its segkd export: caches of every image agree (fp16 storage)."""
    onnx = _cache_logits(_cfg(tiny, tmp_path, method="dkd", teacher_cache=str(tmp_path / "c_onnx")))
    ref = _cache_logits(_cfg(tiny, tmp_path, method="dkd", teacher="deeplabv3-resnet18",
                             teacher_weights=str(tiny["ckpt"]), teacher_cache=str(tmp_path / "c_pt")))
    assert sorted(onnx) == sorted(ref) and len(ref) == 6
    delta = max(float((onnx[k] - ref[k]).abs().max()) for k in ref)
    assert delta <= 1e-3 and tuple(ref[next(iter(ref))].shape) == (K, 4, 6)  # stride 8 of a 32x48 image


def test_fp32_caches_show_the_agreement_fp16_storage_rounds_away(tiny: dict[str, Path], tmp_path: Path) -> None:
    """--cache-dtype float32 stores the teachers' own values: the ONNX and PyTorch caches then agree to fp32 noise,
    where fp16 storage would differ by a whole fp16 step wherever two nearly equal values straddle a rounding
    boundary. The shards hold float32 tensors and the cache is keyed apart from an fp16 one."""
    from safetensors import safe_open

    caches = {name: tmp_path / name for name in ("onnx", "pt")}
    onnx = _cache_logits(_cfg(tiny, tmp_path, teacher_cache=str(caches["onnx"]), cache_dtype="float32"))
    ref = _cache_logits(_cfg(tiny, tmp_path, teacher="deeplabv3-resnet18", teacher_weights=str(tiny["ckpt"]),
                             teacher_cache=str(caches["pt"]), cache_dtype="float32"))
    assert sorted(onnx) == sorted(ref) and max(float((onnx[k] - ref[k]).abs().max()) for k in ref) <= 1e-4
    for root in caches.values():
        shard = next(root.glob("shard-*.safetensors"))
        with safe_open(str(shard), framework="pt") as f:
            assert {f.get_tensor(n).dtype for n in f.keys()} == {torch.float32}
    with pytest.raises(SegkdError, match="stored as float32, this run asks for --cache-dtype float16"):
        _cache_logits(_cfg(tiny, tmp_path, teacher_cache=str(caches["onnx"])))
    with pytest.raises(SegkdError, match="--cache-dtype float64: one of float16, float32, with --teacher-cache"):
        _cfg(tiny, tmp_path, teacher_cache=str(caches["onnx"]), cache_dtype="float64").check()


def test_normalisation_is_converted_to_the_teachers(tiny: dict[str, Path]) -> None:
    """A run normalising with 0.5/0.25 feeds the teacher exactly what a run with its own ImageNet mean/std would."""
    from segkd.checkpoint import IMAGENET_MEAN, IMAGENET_STD
    from segkd.models.loading import load_teacher

    ref = load_teacher("deeplabv3-resnet18", tiny["ckpt"], K)
    teacher = load_onnx_teacher(tiny["onnx"], K, [0.5] * 3, [0.25] * 3)
    assert teacher.output_stride == 8 and teacher.feature_info == [] and teacher.zoo_name == "onnx:deeplabv3-resnet18"
    rgb = torch.rand(2, 3, 32, 48)
    run_x = (rgb - 0.5) / 0.25
    own_x = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert float((teacher(run_x) - ref(own_x)).abs().max()) < 1e-4


class _HFLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _segformer_onnx(path: Path, classes: int = K) -> Path:
    """A tiny random HF SegFormer exported by torch.onnx with dynamic batch/H/W: an ONNX file segkd did not write."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    config = SegformerConfig(num_labels=classes, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                             num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=16)
    model = _HFLogits(SegformerForSemanticSegmentation(config)).eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "logits": {0: "b", 2: "oh", 3: "ow"}},
                      opset_version=17, dynamo=False)
    return path


def test_foreign_segformer_onnx_distils_a_student(tiny: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    """`segkd distill --method kd --teacher-weights segformer.onnx --teacher-mean/--teacher-std`, 2 iterations,
    online and through the teacher cache (dkd), writing a student checkpoint; the stride comes from a probe."""
    import json

    from conftest import run_cli

    onnx = _segformer_onnx(tmp_path / "hf_segformer.onnx")
    teacher = load_onnx_teacher(onnx, K, [0.5] * 3, [0.5] * 3, mean=[0.5] * 3, std=[0.5] * 3)
    assert teacher.output_stride == 4 and teacher.cache_name.startswith("onnx mean=")
    common = ["distill", "--student", "segformer-b0", "--teacher-weights", str(onnx), "--teacher-mean",
              "0.5,0.5,0.5", "--teacher-std", "0.5,0.5,0.5", "--data", str(tiny["data"]), "--crop", "32x32",
              "--iters", "2", "--batch", "2", "--val-every", "2", "--workers", "0", "--no-progress", "--device", "cpu"]
    code, _, err = run_cli(monkeypatch, capsys, *common, "--method", "kd", "--out", str(tmp_path / "r1"))
    assert code == 0, err
    assert any((tmp_path / "r1").glob("*.safetensors"))  # the student checkpoint
    report = json.loads((tmp_path / "r1" / "distill.json").read_text())
    assert report["teacher"]["name"] == "onnx:hf_segformer.onnx"
    code, _, err = run_cli(monkeypatch, capsys, *common, "--method", "dkd", "--teacher-cache", str(tmp_path / "c"),
                           "--out", str(tmp_path / "r2"))
    assert code == 0, err
    manifest = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert manifest["logit_stride"] == 4 and manifest["taps"] == {} and len(manifest["images"]) == 6


def _graph(path: Path, outputs: int, dtype: int) -> Path:
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Conv", ["x", "w"], ["y0"])]
    outs = [helper.make_tensor_value_info("y0", TensorProto.FLOAT, ["b", K, "h", "w"])]
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["y0"], ["y"], to=dtype))
        outs = [helper.make_tensor_value_info("y", dtype, ["b", K, "h", "w"])]
    if outputs == 2:
        nodes.append(helper.make_node("Relu", ["y0"], ["z"]))
        outs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", K, "h", "w"]))
    w = helper.make_tensor("w", TensorProto.FLOAT, [K, 3, 1, 1], [0.1] * (3 * K))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"])],
                              outs, initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_bad_onnx_teachers_are_one_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    from onnx import TensorProto

    args = dict(num_classes=K, run_mean=[0.5] * 3, run_std=[0.5] * 3, mean=[0.5] * 3, std=[0.5] * 3)
    two = _graph(tmp_path / "two.onnx", 2, TensorProto.FLOAT)
    with pytest.raises(SegkdError, match=r"two\.onnx: an ONNX teacher must have one output .* has 2 \(y0, z\)"):
        load_onnx_teacher(two, **args)
    ints = _graph(tmp_path / "ints.onnx", 1, TensorProto.INT64)
    with pytest.raises(SegkdError, match=r"ints\.onnx: output 'y' is tensor\(int64\), not float logits"):
        load_onnx_teacher(ints, **args)
    good = _graph(tmp_path / "good.onnx", 1, TensorProto.FLOAT)
    assert load_onnx_teacher(good, **args).output_stride == 1
    with pytest.raises(SegkdError, match=r"good\.onnx: the teacher predicts 3 classes, the dataset has 5"):
        load_onnx_teacher(good, **{**args, "num_classes": 5})
    with pytest.raises(SegkdError, match=r"good\.onnx: an ONNX file segkd did not write; give its input normal"):
        load_onnx_teacher(good, K, [0.5] * 3, [0.5] * 3)
    with pytest.raises(SegkdError, match=r"t\.onnx: a segkd export records its normalisation"):
        load_onnx_teacher(tiny["onnx"], **args)


@pytest.mark.parametrize(("method", "opts", "why"), [
    ("cwd", {"feature": "true"}, "cwd: it reads the teacher's feature taps (deep), and an ONNX teacher gives logits "
                                 "only (methods that can use one: "),
    ("c2vkd", {}, "c2vkd: it reads the teacher's feature taps (layer4)"),
])
def test_feature_methods_refuse_an_onnx_teacher_before_data(tiny: dict[str, Path], tmp_path: Path, method: str,
                                                            opts: dict, why: str) -> None:
    cfg = _cfg(tiny, tmp_path, method=method, method_opts=opts, data=str(tmp_path / "no-data"))  # no data read
    with pytest.raises(SegkdError) as err:
        DistillBuilder().check(cfg)
    assert why in str(err.value) and str(tiny["onnx"]) in str(err.value) and "\n" not in str(err.value)
    assert sorted(str(err.value).split("can use one: ")[1].rstrip(")").split(", ")) == ["cwd", "dkd", "kd"]
    DistillBuilder().check(_cfg(tiny, tmp_path, method="cwd"))  # cwd on logits is served


def test_onnx_teacher_flags_are_checked(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SegkdError, match="--teacher deeplabv3-resnet18: --teacher-weights .*t.onnx is an ONNX model"):
        _cfg(tiny, tmp_path, teacher="deeplabv3-resnet18").check()
    with pytest.raises(SegkdError, match="--teacher-mean and --teacher-std go together"):
        _cfg(tiny, tmp_path, teacher_mean="0.5,0.5,0.5").check()
    with pytest.raises(SegkdError, match=r"--teacher-std '0,1,1': expected three positive numbers"):
        _cfg(tiny, tmp_path, teacher_mean="0.5,0.5,0.5", teacher_std="0,1,1").check()
    with pytest.raises(SegkdError, match="describe an ONNX teacher; --teacher-weights .* is a checkpoint"):
        _cfg(tiny, tmp_path, teacher="deeplabv3-resnet18", teacher_weights=str(tiny["ckpt"]),
             teacher_mean="0.5,0.5,0.5", teacher_std="1,1,1").check()


def test_the_cache_agreement_benchmark_end_to_end(tiny: dict[str, Path], tmp_path: Path) -> None:
    """benchmarks/onnx_cache_agreement.py on the tiny set: export, four cache builds, per-image figures, the docs
    section (written twice: replaced, not appended)."""
    from benchmarks.onnx_cache_agreement import BEGIN, main

    docs, out = tmp_path / "bench.md", tmp_path / "agree.json"
    docs.write_text("# page\n\nkept\n")
    args = ["--data", str(tiny["data"]), "--teacher", str(tiny["ckpt"]), "--work", str(tmp_path / "w"),
            "--json", str(out), "--docs", str(docs)]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["image_size"] == [32, 48] and doc["teacher"]["checkpoint_sha256"] == file_sha256(tiny["ckpt"])
    for dtype in ("float16", "float32"):
        res = doc["storage"][dtype]
        assert len(res["per_image"]) == 6 and {r["tensors"][0] for r in res["per_image"]} == {"logits"}
        assert all(r["values"] == K * 4 * 6 and 0 <= r["argmax_agreement"] <= 1 for r in res["per_image"])
    f32 = doc["storage"]["float32"]["summary"]
    assert f32["passes"] and f32["max_abs"] <= 1e-4 and doc["passes"]
    assert main(args) == 0  # the second run finds the export and the caches and only compares
    text = docs.read_text()
    assert text.startswith("# page\n\nkept\n") and text.count(BEGIN) == 1 and "| float32 |" in text
