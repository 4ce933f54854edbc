"""Every registered zoo model: builds, runs forward/backward, declares its taps truthfully (timm-style)."""

from __future__ import annotations

import pytest
import torch

from segkd.errors import SegkdError
from segkd.models import MODELS, SegOutput, count_params, create_model, upsample_logits

SIZE = (64, 96)


@pytest.fixture(scope="module", params=MODELS.names())
def model(request):
    torch.manual_seed(0)
    return create_model(request.param, num_classes=5)


def test_forward_backward_and_taps(model):
    x = torch.randn(2, 3, *SIZE)
    model.train()
    logits = model(x)
    assert isinstance(logits, torch.Tensor)
    s = model.output_stride
    assert logits.shape == (2, 5, SIZE[0] // s, SIZE[1] // s)
    logits.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "every parameter takes part in the forward"
    model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        plain = model(x)
        out = model(x, taps=True)
    assert isinstance(out, SegOutput)
    torch.testing.assert_close(out.logits, plain)
    declared = {spec.name: spec for spec in model.feature_info}
    got = {**out.features, **out.embeds}
    assert set(got) == set(declared)
    for name, spec in declared.items():
        t = got[name]
        assert t.shape[:2] == (2, spec.channels), name
        assert t.shape[-2:] == (SIZE[0] // spec.stride, SIZE[1] // spec.stride), name
        assert (name in out.embeds) == (spec.kind == "embed")


def test_family_taps(model):
    names = [s.name for s in model.feature_info]
    if hasattr(model, "head_kind"):  # timm students: the four pyramid levels, named by family
        assert names == [f"{'stage' if model.family == 'transformer' else 'layer'}{i}" for i in range(1, 5)]
    elif model.family == "transformer":
        assert names == [f"stage{i}" for i in range(1, 5)] + [f"embed{i}" for i in range(1, 5)]
    else:
        assert names == ["layer1", "layer2", "layer3", "layer4", "aspp"]


def test_upsample_to_input(model):
    model.eval()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        full = model.predict(x)
        assert full.shape[-2:] == SIZE
        torch.testing.assert_close(full, upsample_logits(model(x), SIZE))


@pytest.mark.parametrize(
    ("name", "published_m"),
    [("segformer-b0", 3.7), ("segformer-b1", 13.7), ("segformer-b2", 27.4)],
)
def test_segformer_params_match_paper(name, published_m):
    # 19 Cityscapes classes, as in the SegFormer/TransKD tables (B0 3.72 M, B2 27.36 M with 19-20 classes)
    n = count_params(create_model(name, num_classes=19)) / 1e6
    assert abs(n - published_m) / published_m < 0.01, n


def test_deeplabv3_r50_params_match_torchvision():
    from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights

    published = DeepLabV3_ResNet50_Weights.DEFAULT.meta["num_params"]  # 21 classes with the aux head
    n = count_params(create_model("deeplabv3-resnet50", num_classes=21, aux=True))
    assert abs(n - published) / published < 0.01
    assert n == published  # module for module the same network


def test_aliases_and_unknown_name():
    assert create_model("deeplabv3", num_classes=3).zoo_name == "deeplabv3-resnet50"
    assert create_model("deeplabv3plus", num_classes=3).zoo_name == "deeplabv3plus-resnet101"
    with pytest.raises(SegkdError, match="did you mean .*segformer-b0"):
        create_model("segformer-bo", num_classes=3)


def test_pretrained_must_be_a_local_file(tmp_path):
    with pytest.raises(SegkdError, match="never downloads"):
        create_model("deeplabv3-resnet18", num_classes=3, pretrained=str(tmp_path / "missing.pth"))


def test_pretrained_backbone_from_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("resnet18", pretrained=False)
    save_file(ref.state_dict(), tmp_path / "r18.safetensors")
    model = create_model("deeplabv3-resnet18", num_classes=3, pretrained=str(tmp_path / "r18.safetensors"))
    torch.testing.assert_close(model.backbone.conv1.weight, ref.conv1.weight)
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
