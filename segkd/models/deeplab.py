"""DeepLabV3 (torchvision-compatible) and DeepLabV3+ on dilated timm ResNets.

DeepLabV3 follows torchvision's ``deeplabv3_resnet50/101`` module for module (output stride 8, ASPP rates 12/24/36,
256 channels, a 3x3 conv + BN + ReLU, a 1x1 classifier, optional FCN aux head on layer3), so its state dict is
interchangeable with torchvision's. The backbone is timm's ResNet (``features_only``, ``output_stride``), whose
parameter names equal torchvision's and whose dilation pattern (first block of a dilated stage keeps the previous
dilation) matches torchvision's ``replace_stride_with_dilation``.

DeepLabV3+ (the C2VKD teacher) follows the C2VKD reference: output stride 16, ASPP 6/12/18 (no dropout), layer1
projected to 48 channels, ASPP output upsampled to stride 4, concatenated, one 3x3 conv (256) + BN + ReLU, then a
1x1 classifier. Logits come out at stride 4. The reference upsamples with ``align_corners=True``; segkd uses
``align_corners=False`` everywhere so that ONNX/TensorRT see one resize mode (a documented, minor deviation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkd.models.base import FeatureSpec, SegModel, SegOutput
from segkd.models.timm_seg import timm_backbone


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> list[nn.Module]:
    pad = 0 if k == 1 else dilation
    return [nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class ASPPPooling(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, cout))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with torchvision's module names (``convs``, ``project``)."""

    def __init__(self, cin: int, rates: Sequence[int], cout: int = 256, dropout: float = 0.5) -> None:
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(*_conv_bn_relu(cin, cout))]
        branches += [nn.Sequential(*_conv_bn_relu(cin, cout, 3, r)) for r in rates]
        branches.append(ASPPPooling(cin, cout))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(*_conv_bn_relu(cout * len(branches), cout), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """torchvision's DeepLabHead: ASPP, 3x3 conv + BN + ReLU, 1x1 classifier (indices 0..4)."""

    def __init__(self, cin: int, num_classes: int, rates: Sequence[int]) -> None:
        super().__init__(ASPP(cin, rates), *_conv_bn_relu(256, 256, 3), nn.Conv2d(256, num_classes, 1))


class FCNHead(nn.Sequential):
    """torchvision's auxiliary FCN head on layer3."""

    def __init__(self, cin: int, num_classes: int) -> None:
        mid = cin // 4
        super().__init__(*_conv_bn_relu(cin, mid, 3), nn.Dropout(0.1), nn.Conv2d(mid, num_classes, 1))


def _backbone(arch: str, output_stride: int, pretrained: str | None) -> nn.Module:
    return timm_backbone(arch, pretrained, features_only=True, output_stride=output_stride, out_indices=(1, 2, 3, 4))


class _ResNetSeg(SegModel):
    family = "cnn"

    def _init_backbone(self, arch: str, output_stride: int, pretrained: str | None) -> list[int]:
        self.arch = arch
        self.backbone = _backbone(arch, output_stride, pretrained)
        chans = list(self.backbone.feature_info.channels())
        strides = [4, 8, min(16, output_stride), min(32, output_stride)]
        self.feature_info = [FeatureSpec(f"layer{i + 1}", c, s) for i, (c, s) in enumerate(zip(chans, strides))]
        self.feature_info.append(FeatureSpec("aspp", 256, output_stride))
        return chans

    def _taps(self, logits: Tensor, feats: list[Tensor], aspp: Tensor) -> SegOutput:
        named = {f"layer{i + 1}": f for i, f in enumerate(feats)}
        named["aspp"] = aspp
        return SegOutput(logits, named)


class DeepLabV3(_ResNetSeg):
    output_stride = 8
    training_only = ("aux_classifier.",)  # the FCN auxiliary head (torchvision's layout): trained, never deployed

    def __init__(
        self,
        name: str,
        arch: str,
        num_classes: int,
        aux: bool = False,
        rates: Sequence[int] = (12, 24, 36),
        pretrained: str | None = None,
    ) -> None:
        super().__init__(name, num_classes)
        chans = self._init_backbone(arch, 8, pretrained)
        self.classifier = DeepLabHead(chans[-1], num_classes, rates)
        self.aux_classifier = FCNHead(chans[-2], num_classes) if aux else None

    def forward(self, x: Tensor, taps: bool = False) -> Tensor | SegOutput:
        feats = self.backbone(x)
        if not taps:
            return self.classifier(feats[-1])
        aspp = self.classifier[0](feats[-1])
        logits = aspp
        for mod in list(self.classifier)[1:]:
            logits = mod(logits)
        return self._taps(logits, feats, aspp)

    def forward_aux(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Main and auxiliary logits (both at stride 8); the aux head is optional and training-only."""
        feats = self.backbone(x)
        aux = self.aux_classifier(feats[-2]) if self.aux_classifier is not None else None
        return self.classifier(feats[-1]), aux

    def classifier_parameters(self) -> list[nn.Parameter]:
        params = list(self.classifier.parameters())
        if self.aux_classifier is not None:
            params += list(self.aux_classifier.parameters())
        return params


class DeepLabV3Plus(_ResNetSeg):
    output_stride = 4

    def __init__(
        self,
        name: str,
        arch: str,
        num_classes: int,
        rates: Sequence[int] = (6, 12, 18),
        pretrained: str | None = None,
    ) -> None:
        super().__init__(name, num_classes)
        chans = self._init_backbone(arch, 16, pretrained)
        self.aspp = ASPP(chans[-1], rates, dropout=0.0)
        self.low_proj = nn.Sequential(*_conv_bn_relu(chans[0], 48))
        self.fuse = nn.Sequential(*_conv_bn_relu(256 + 48, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.feature_info[-1] = FeatureSpec("aspp", 256, 16)

    def forward(self, x: Tensor, taps: bool = False) -> Tensor | SegOutput:
        feats = self.backbone(x)
        aspp = self.aspp(feats[-1])
        low = self.low_proj(feats[0])
        up = F.interpolate(aspp, size=low.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.classifier(self.fuse(torch.cat([up, low], dim=1)))
        return self._taps(logits, feats, aspp) if taps else logits

    def classifier_parameters(self) -> list[nn.Parameter]:
        mods = (self.aspp, self.low_proj, self.fuse, self.classifier)
        return [p for m in mods for p in m.parameters()]
