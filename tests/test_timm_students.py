"""Students on timm encoders (issue 20 item 2): forward, taps, a distillation step and ONNX parity per encoder family,
local pretrained weights, reparameterisation before export, and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset

from segkd.checkpoint import IMAGENET_MEAN, IMAGENET_STD, CheckpointMeta, save_checkpoint
from segkd.engine.batch import Batch
from segkd.engine.task import build_optimizer
from segkd.engine.trainer import DataBundle
from segkd.errors import SegkdError
from segkd.models import MODELS, SegOutput, create_model
from segkd.models.timm_seg import encoder_layout
from segkd.runs.distill import DistillConfig
from tests.conftest import build_distill_task

torch.set_num_threads(1)
HW = 64

# one encoder per family: MobileNetV3/V4 and EfficientNet (inverted residuals), MobileOne/RepViT/FastViT
# (reparameterisable), EfficientViT (linear attention: a hybrid), ConvNeXt, ResNet
ENCODERS = [("lraspp", "mobilenetv3_large_100"), ("lraspp", "mobilenetv4_conv_small"), ("lraspp", "efficientnet_b0"),
            ("mlp", "mobileone_s0"), ("mlp", "repvit_m1"), ("mlp", "fastvit_t8"), ("mlp", "efficientvit_b0"),
            ("mlp", "convnext_atto"), ("lraspp", "resnet18")]


class Tiny(Dataset):
    def __init__(self, n: int = 2, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, HW, HW, generator=g)
        self.y = torch.randint(0, 2, (n, HW, HW), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


def calibrated(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with BatchNorm statistics measured on random batches, as training leaves them: at
    their initial values (mean 0, var 1) the branches of a random MobileOne sum to activations near 1e12, where
    float32 parity means nothing."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the batches below
    model.train()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        for seed in range(3):  # noise images normalised like export verification's random cases
            model((torch.rand(4, 3, HW, HW, generator=torch.Generator().manual_seed(seed)) - mean) / std)
    return model.eval()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("teacher") / "t.safetensors"
    torch.manual_seed(0)
    save_checkpoint(path, create_model("deeplabv3-resnet18", num_classes=2),
                    CheckpointMeta(model="deeplabv3-resnet18", num_classes=2))
    return str(path)


@pytest.mark.parametrize(("head", "arch"), ENCODERS, ids=[f"{h}-{a}" for h, a in ENCODERS])
def test_timm_student(head: str, arch: str, teacher: str, tmp_path: Path) -> None:
    """Forward and taps at their declared strides, one cwd (logits + deep features) step that trains the student,
    then export: ONNX Runtime matches the model as trained (before reparameterisation) and the graph is TensorRT-
    ready."""
    from segkd.export.onnx_export import ExportConfig, export_checkpoint
    from segkd.export.runtime import create_session

    name = f"{head}-{arch}"
    torch.manual_seed(0)
    model = calibrated(create_model(name, num_classes=2))
    x = (torch.rand(1, 3, HW, HW) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1)
    with torch.no_grad():
        out = model(x, taps=True)
    assert isinstance(out, SegOutput) and model.family == MODELS.get(name).family
    s = model.output_stride
    assert s == (8 if head == "lraspp" else 4) and out.logits.shape == (1, 2, HW // s, HW // s)
    assert [spec.stride for spec in model.feature_info] == [4, 8, 16, 32]
    for spec in model.feature_info:
        assert out.features[spec.name].shape == (1, spec.channels, HW // spec.stride, HW // spec.stride)

    cfg = DistillConfig(method="cwd", model=name, teacher="deeplabv3-resnet18", teacher_weights=teacher,
                        method_opts={"feature": "true"}, out=str(tmp_path / "run"), iters=1, batch=2, workers=0,
                        progress=False, device="cpu", scale="1", crop=None)
    task = build_distill_task(cfg, DataBundle(Tiny(), Tiny(1, 1), 2, ["a", "b"], [[0, 0, 0], [9, 9, 9]]))
    task.train(True)
    head_before = [p.detach().clone() for p in task.student.classifier_parameters()]
    terms = task.losses(Batch(Tiny().x, Tiny().y))
    assert {"loss_cwd", "loss_cwd_feat"} <= set(terms) and terms["loss_cwd_feat"] > 0
    terms["loss"].backward()
    build_optimizer(task.parts()["student"]).step()
    assert any(not torch.equal(a, b) for a, b in zip(head_before, task.student.classifier_parameters()))

    ckpt = save_checkpoint(tmp_path / "s.safetensors", model, CheckpointMeta(model=name, num_classes=2))
    # atol 1e-3 (export's default is 1e-4): fusing a random MobileOne's branches gives kernels scaled by
    # 1/sqrt(running var) of untrained BNs, whose float32 rounding differs by ~3e-4 between ORT and PyTorch
    report = export_checkpoint(ckpt, tmp_path / "s.onnx", ExportConfig(size=f"{HW}x{HW}", atol=1e-3,
                                                                       progress=False))
    assert report["verification"]["passed"], report["verification"]["failure"]
    assert report["tensorrt"]["unsupported"] == [], report["tensorrt"]["issues"]
    sess = create_session(tmp_path / "s.onnx", ("cpu",))
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), atol=1e-3, rtol=0)  # the trained (unfused) form


def test_reparameterisable_encoders_are_fused_for_deployment() -> None:
    """MobileOne's training branches (several convs + BN per block) collapse into one conv: fewer parameters and
    MACs, the same function."""
    from segkd.models.flops import count_flops

    torch.manual_seed(0)
    model = calibrated(create_model("mlp-mobileone_s0", num_classes=2))
    x = torch.randn(1, 3, HW, HW)
    with torch.no_grad():
        ref = model(x)
    train_macs = count_flops(model, (1, 3, HW, HW)).gmacs
    n_train = sum(p.numel() for p in model.parameters())
    fused = model.deploy_form()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref, atol=1e-4, rtol=1e-3)
    assert sum(p.numel() for p in fused.parameters()) < n_train
    assert count_flops(fused, (1, 3, HW, HW)).gmacs < 0.6 * train_macs
    zoo = create_model("segformer-b0", num_classes=2)
    assert zoo.deploy_form() is zoo  # models without branches to fuse are returned as they are


def test_attention_of_hybrid_encoders_is_counted() -> None:
    """EfficientViT's linear attention (``q (k^T v)``, batched matmuls) shows in the GMACs of bench/models."""
    from segkd.models.flops import count_flops

    count = count_flops(create_model("mlp-efficientvit_b0", num_classes=2), (1, 3, 128, 128))
    assert count.by_op.get("aten.bmm", 0) > 0
    assert encoder_layout("efficientvit_b0")[1] == "transformer" and encoder_layout("repvit_m1")[1] == "cnn"


def test_listed_students_declare_their_family_truthfully() -> None:
    """The families written beside the listed timm students equal what probing their encoder finds."""
    listed = [n for n in MODELS.names() if n.startswith(("lraspp-", "mlp-"))]
    assert len(listed) >= 4
    for name in listed:
        assert MODELS.get(name).family == encoder_layout(name.partition("-")[2])[1], name


def test_pretrained_reads_a_local_timm_file(tmp_path: Path) -> None:
    """A timm weights file (the whole classifier's state dict, as timm's hub files hold) initialises the encoder."""
    import timm

    torch.manual_seed(1)
    src = timm.create_model("mobilenetv3_large_100", pretrained=False)
    path = tmp_path / "mbv3.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(2)
    model = create_model("lraspp-mobilenetv3_large_100", num_classes=3, pretrained=str(path))
    torch.testing.assert_close(model.encoder.conv_stem.weight, src.conv_stem.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.encoder.blocks[2][0].conv_pw.weight, src.blocks[2][0].conv_pw.weight,
                               atol=0, rtol=0)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not weights")
    with pytest.raises(SegkdError, match="junk.pth"):
        create_model("lraspp-mobilenetv3_large_100", num_classes=3, pretrained=str(junk))


def test_bad_encoders_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SegkdError, match=r"unknown timm encoder 'mobilenetv3_larg_100'; did you mean "
                                         r"mobilenetv3_large_100"):
        create_model("lraspp-mobilenetv3_larg_100", num_classes=2)
    with pytest.raises(SegkdError, match=r"'vit_tiny_patch16_224' gives features at strides \[16\], not the pyramid"):
        create_model("mlp-vit_tiny_patch16_224", num_classes=2)
    with pytest.raises(SegkdError, match="unknown model 'lrasp-resnet18'; did you mean lraspp-"):
        create_model("lrasp-resnet18", num_classes=2)

    import timm

    def refuse(*args: object, **kwargs: object) -> None:  # what timm does for a model it cannot cut into stages
        raise RuntimeError("features_only not implemented for this model")

    encoder_layout.cache_clear()
    monkeypatch.setattr(timm, "create_model", refuse)
    with pytest.raises(SegkdError, match="timm encoder 'ghostnet_100' does not support features_only"):
        create_model("mlp-ghostnet_100", num_classes=2)
    encoder_layout.cache_clear()
