"""segkd export: ONNX parity with PyTorch, output heads, fp16, static shapes, TensorRT report, bad inputs.

Each model is exported a handful of times per module (fixtures) at 64x96 so the file stays well under 90 s.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from segkd.checkpoint import CheckpointMeta, file_sha256, save_checkpoint
from segkd.errors import GateFailure, SegkdError
from segkd.export import ExportConfig, check_graph, export_checkpoint, load_onnx_predictor, read_onnx_metadata
from segkd.export.onnx_export import assert_eval, plan_shapes
from segkd.export.runtime import create_session
from segkd.models import create_model
from segkd.models.loading import load_model

H, W = 64, 96
CLASSES = [f"c{i}" for i in range(5)]


def _ckpt(tmp, name: str):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    meta = CheckpointMeta(model=name, num_classes=5, class_names=CLASSES, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    return save_checkpoint(tmp / f"{name}.safetensors", model, meta)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    torch.set_num_threads(1)
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def sf(work):
    """segformer-b0: logits (dynamic), probs + folded normalisation, labels, fp16 + fold, static."""
    ckpt = _ckpt(work, "segformer-b0")
    reports = {
        "logits": export_checkpoint(ckpt, work / "sf_logits.onnx", ExportConfig(size=f"{H}x{W}")),
        "probs_fold": export_checkpoint(
            ckpt, work / "sf_probs.onnx", ExportConfig(size=f"{H}x{W}", output="probs", fold_normalize=True)),
        "labels": export_checkpoint(ckpt, work / "sf_labels.onnx", ExportConfig(size=f"{H}x{W}", output="labels")),
        "fp16": export_checkpoint(
            ckpt, work / "sf_fp16.onnx", ExportConfig(size=f"{H}x{W}", fp16=True, fold_normalize=True)),
        "static": export_checkpoint(ckpt, work / "sf_static.onnx", ExportConfig(static=f"2x3x{H}x{W}")),
    }
    return ckpt, reports


@pytest.fixture(scope="module")
def dl(work):
    ckpt = _ckpt(work, "deeplabv3-resnet18")
    reports = {
        "logits": export_checkpoint(ckpt, work / "dl_logits.onnx", ExportConfig(size=f"{H}x{W}")),
        "labels": export_checkpoint(ckpt, work / "dl_labels.onnx", ExportConfig(size=f"{H}x{W}", output="labels")),
    }
    return ckpt, reports


def _normalised(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(*shape, generator=g) * 255
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    return (raw / 255 - mean) / std


@pytest.mark.parametrize("which", ["sf", "dl"])
def test_logits_parity_at_two_sizes(which, request):
    ckpt, reports = request.getfixturevalue(which)
    rep = reports["logits"]
    cases = rep["verification"]["cases"]
    assert [c["case"].split()[1] for c in cases] == ["1x3x64x96", "2x3x96x64" if which == "sf" else "2x3x72x88"]
    assert all(c["max_abs_diff"] < 1e-4 and c["label_agreement"] == 1.0 for c in cases)
    assert rep["verification"]["providers_used"] == ["CPUExecutionProvider"]
    # independent check through the predictor at a third size, batch 3
    model = load_model(ckpt)
    predict, meta = load_onnx_predictor(rep["out"])
    x = _normalised((3, 3, 128, 64))
    with torch.inference_mode():
        ref = model(x)
    got = predict(x)
    assert got.shape == ref.shape == (3, 5, 128 // model.output_stride, 64 // model.output_stride)
    assert (got - ref).abs().max() < 1e-4
    assert torch.equal(got.argmax(1), ref.argmax(1))
    assert meta.class_names == CLASSES


@pytest.mark.parametrize("which", ["sf", "dl"])
def test_labels_equal_pytorch_argmax_at_input_size(which, request):
    ckpt, reports = request.getfixturevalue(which)
    model = load_model(ckpt)
    sess = create_session(reports["labels"]["out"])
    x = _normalised((2, 3, 96, 128), seed=3)
    labels = sess.run(None, {"image": x.numpy()})[0]
    with torch.inference_mode():
        ref = F.interpolate(model(x), size=(96, 128), mode="bilinear", align_corners=False).argmax(1)
    assert labels.shape == (2, 96, 128) and labels.dtype == np.int32
    assert np.array_equal(labels, ref.numpy())
    predict, _ = load_onnx_predictor(reports["labels"]["out"])
    onehot = predict(x)
    assert onehot.shape == (2, 5, 96, 128) and torch.equal(onehot.argmax(1), ref)
    assert torch.equal(onehot.sum(1), torch.ones(2, 96, 128))


def test_fold_normalize_equivalence(sf):
    ckpt, reports = sf
    model = load_model(ckpt)
    x = _normalised((1, 3, H, W), seed=5)
    raw = (x * torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1) + torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) * 255
    probs = create_session(reports["probs_fold"]["out"]).run(None, {"image": raw.numpy()})[0]
    with torch.inference_mode():
        ref = F.interpolate(model(x), size=(H, W), mode="bilinear", align_corners=False).softmax(1)
    assert np.abs(probs - ref.numpy()).max() < 1e-5
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # the predictor takes the normalised batch and undoes the normalisation itself
    predict, _ = load_onnx_predictor(reports["probs_fold"]["out"])
    assert (predict(x) - ref).abs().max() < 1e-5
    assert reports["probs_fold"]["export"]["input_range"].startswith("0..255")


def test_fp16_runs_and_reports_agreement(sf):
    _, reports = sf
    rep = reports["fp16"]
    ver = rep["verification"]
    assert ver["atol"] is None and ver["min_agreement"] == 0.99
    assert all(0.99 <= c["label_agreement"] <= 1.0 and c["max_abs_diff"] > 0 for c in ver["cases"])
    model = onnx.load(rep["out"])
    inits = {t.name: t.data_type for t in model.graph.initializer}
    conv_w = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    assert all(inits[w] == TensorProto.FLOAT16 for w in conv_w)
    for node in model.graph.node:  # LayerNorm weights stay fp32
        if node.op_type == "LayerNormalization":
            assert inits[node.input[1]] == TensorProto.FLOAT
    assert sorted(rep["graph"]["fp32_kept_nodes"]) == ["/Div", "/Sub"]
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_static_export_rejects_other_sizes(sf):
    _, reports = sf
    rep = reports["static"]
    probe = rep["verification"]["static_other_size"]
    assert probe["rejected"] and probe["shape"] == [2, 3, H + 32, W]
    dims = [d.dim_value for d in onnx.load(rep["out"]).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, H, W]
    predict, _ = load_onnx_predictor(rep["out"])
    with pytest.raises(SegkdError, match="rejected"):
        predict(torch.zeros(2, 3, H, W + 32))
    assert "Shapes" not in rep["tensorrt"]["trtexec"]


def test_metadata_describes_the_file(sf):
    ckpt, reports = sf
    meta, export = read_onnx_metadata(reports["logits"]["out"])
    assert meta.model == "segformer-b0" and meta.num_classes == 5 and meta.mean == [0.5, 0.4, 0.3]
    assert export["checkpoint_sha256"] == file_sha256(ckpt)
    assert export["output"] == "logits" and export["output_stride"] == 4 and export["opset"] == 17
    props = {p.key: p.value for p in onnx.load(reports["logits"]["out"]).metadata_props}
    assert props["segkd.input_layout"].startswith("NCHW") and "segkd.palette" in props


def test_tensorrt_report_and_trtexec(sf, dl):
    for reports in (sf[1], dl[1]):
        for rep in reports.values():
            trt = rep["tensorrt"]
            assert trt["unsupported"] == [] and trt["ready"], trt["issues"]
            assert trt["table"]["commit"] == "96e781103cfc4adf4a6bb557e94bac8e693f6f4c"
    logits = sf[1]["logits"]["tensorrt"]
    assert "LayerNormalization" in logits["op_counts"] and "ReduceMean" not in logits["op_counts"]
    assert "--minShapes=image:1x3x32x64 --optShapes=image:1x3x64x96 --maxShapes=image:4x3x64x96" in logits["trtexec"]
    assert sf[1]["fp16"]["tensorrt"]["trtexec"].endswith("--fp16")
    # the default --providers cpu asks for no TensorRT engine: no probe, no "not run" line
    assert logits["engine"] == {"built": False, "requested": False,
                                "reason": "not requested (add tensorrt to --providers to build and run the engine)"}
    assert "profile_note" not in logits  # 64x96 is a multiple of the stride: the profile is the verified size


def test_profile_rounding_is_stated(sf, work):
    from segkd.export.render import render_export_report

    rep = export_checkpoint(sf[0], work / "sf_60.onnx", ExportConfig(size="60x60", num_images=1))
    trt = rep["tensorrt"]
    assert "--optShapes=image:1x3x64x64" in trt["trtexec"]
    assert trt["profile_note"].startswith("the TensorRT profile is at multiples of the stride 32: 64x64 for --size "
                                          "60x60 (verified here at 60x60)")
    from rich.console import Console

    console = Console(record=True, width=200)
    render_export_report(rep, console)
    text = console.export_text()
    assert "note: the TensorRT profile is at multiples" in text and "TensorRT EP not run" not in text


def _graph(nodes, inits=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_trt_checker_flags_bad_patterns():
    scales = helper.make_tensor("s", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    m = _graph([helper.make_node("Resize", ["x", "", "s"], ["r"], mode="cubic"),
                helper.make_node("Unique", ["r"], ["u"]),
                helper.make_node("FusedConv", ["u"], ["y"], domain="com.microsoft")], [scales])
    rep = check_graph(m)
    assert rep["unsupported"] == ["Unique", "com.microsoft::FusedConv"] and not rep["ready"]
    assert any("cubic" in i["message"] for i in rep["issues"])
    ok = check_graph(_graph([helper.make_node("Resize", ["x", "", "s"], ["y"], mode="linear")], [scales]))
    assert ok["ready"] and ok["unsupported"] == []


def test_training_mode_is_refused():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).eval()
    assert_eval(net, "before")
    net[1].train()
    with pytest.raises(SegkdError, match="training mode"):
        assert_eval(net, "after")


def test_failed_verification_leaves_no_file(dl, work):
    ckpt, _ = dl
    out = work / "fail.onnx"
    with pytest.raises(GateFailure, match="nothing written") as info:
        export_checkpoint(ckpt, out, ExportConfig(size=f"{H}x{W}", fp16=True, atol=0.0))
    assert info.value.exit_code == 3
    assert not out.exists() and not list(work.glob(".fail.onnx.*"))


def test_bad_inputs_give_one_line_errors(dl, work):
    ckpt, _ = dl
    junk = work / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    from safetensors.torch import save_file

    plain = work / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    cases = [
        (junk, ExportConfig(size="64x96"), "not a readable safetensors"),
        (plain, ExportConfig(size="64x96"), "without segkd metadata"),
        (ckpt, ExportConfig(opset=16), "--opset 16"),
        (ckpt, ExportConfig(static="1x3x64"), "expected BxCxHxW"),
        (ckpt, ExportConfig(static="1x1x64x96"), "3-channel RGB"),
        (ckpt, ExportConfig(static="1x3x60x96"), "multiples of 8"),
        (ckpt, ExportConfig(size="64x96", providers="cuda"), "could not use CUDAExecutionProvider"),
        (ckpt, ExportConfig(size="64x96", providers="gpu"), "unknown provider"),
        (ckpt, ExportConfig(size="64x96", output="mask"), "--output"),
    ]
    for path, cfg, pattern in cases:
        with pytest.raises(SegkdError, match=pattern) as info:
            export_checkpoint(path, work / "bad.onnx", cfg)
        assert "\n" not in str(info.value)
    assert not (work / "bad.onnx").exists()


def test_static_stride_rule_per_model():
    with pytest.raises(SegkdError, match="multiples of 32 for segformer-b0.*holding it: 1x3x512x1024"):
        plan_shapes(ExportConfig(static="1x3x500x1000"), 32, "segformer-b0")
    plan = plan_shapes(ExportConfig(static="1x3x520x1000"), 8, "deeplabv3-resnet18")
    assert (plan.height, plan.width, plan.static) == (520, 1000, True)
    assert plan_shapes(ExportConfig(size="512x1024"), 32, "m").profile["min"] == (1, 3, 256, 512)


class _ScaledLogits(torch.nn.Module):
    """A 'model' whose logits reach |30| (a trained net's scale), folded normalisation, for the gate alone."""

    fold, output = True, "logits"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0] / 255 * 30.0, -x[:, 1] / 255 * 30.0], dim=1)


class _OffBy:
    """An ONNX Runtime session stand-in returning the reference plus ``delta`` at one element."""

    def __init__(self, delta: float) -> None:
        self.delta = delta

    def run(self, _names, feeds):
        out = _ScaledLogits()(torch.from_numpy(feeds["x"])).numpy().copy()
        out[0, 0, 0, 0] += self.delta
        return [out]


def test_the_abs_gate_grows_with_the_output_scale():
    from segkd.export.verify import _failure_text, _run_case, resolve_gates

    raw = torch.full((1, 3, 4, 4), 255.0)  # logits exactly +30 / -30: max |output| 30
    # 1.15e-4 off (what a trained MobileNetV3 LR-ASPP export measured): over --atol 1e-4 alone, within
    # 1e-4 + 1e-5 x 30 = 4e-4
    case = _run_case(_OffBy(1.15e-4), "x", _ScaledLogits(), "c", raw, atol=1e-4, min_agreement=0.999, rtol=1e-5)
    assert case["max_abs_ref"] == 30.0 and case["allowed_abs_diff"] == pytest.approx(4e-4) and case["passed"]
    bad = _run_case(_OffBy(5e-4), "x", _ScaledLogits(), "c", raw, atol=1e-4, min_agreement=0.999, rtol=1e-5)
    assert not bad["passed"]
    assert "max |diff| 0.0005 > 0.0004 (--atol 0.0001 + --rtol 1e-05 x max |output| 30)" in _failure_text(
        bad, 1e-4, 0.999, 1e-5)
    assert not _run_case(_OffBy(1.15e-4), "x", _ScaledLogits(), "c", raw, atol=1e-4, min_agreement=0.999,
                         rtol=0.0)["passed"]  # --rtol 0: the old absolute gate
    assert resolve_gates(ExportConfig())[1] == 1e-5 and resolve_gates(ExportConfig(fp16=True))[1] == 0.0
    with pytest.raises(SegkdError, match="--rtol -1"):
        ExportConfig(rtol=-1.0).check()
