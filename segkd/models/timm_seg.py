"""Students on any timm encoder: ``lraspp-<encoder>`` and ``mlp-<encoder>`` (the SMP recipe: timm ``features_only``).

The encoder is ``timm.create_model(<encoder>, features_only=True, out_indices=...)`` with the four levels at strides
4, 8, 16 and 32 (for each stride the deepest level timm reports); an encoder without such a pyramid (plain ViTs,
MLP-Mixers: one stride 16) or without ``features_only`` is refused in one line, and an unknown name gets timm's
closest names. The four levels are the model's taps (``layer1..4`` for convolutional encoders, ``stage1..4`` when
the encoder holds attention, its ``family`` then being ``transformer``), so feature methods (cwd features, collab's
HFD, c2vkd's ``deep`` tap) read them like the zoo's. Heads:

* ``lraspp``: Lite R-ASPP of MobileNetV3 (Howard et al., ICCV 2019), torchvision's layout: the stride-32 level
  through 1x1 conv + BN + ReLU (128 ch) gated by a sigmoid of its global average, upsampled to the stride-8 level,
  one 1x1 classifier on each, summed; logits at stride 8. Choice: no dilated last stage (torchvision dilates
  MobileNetV3 to output stride 16) because timm cannot dilate every encoder (FastViT, RepViT...); the gate uses a
  global pool (torchvision) rather than the paper's 49x49 pool, which ONNX/TensorRT would see as a fixed-size op.
* ``mlp``: SegFormer's all-MLP head (:class:`segkd.models.segformer.AllMLPHead`) on the four levels, logits at
  stride 4; decoder width 128 (SegFormer-B0 uses 256): for mobile encoders the stride-4 fuse conv dominates the
  head's cost, and 128 halves it.

Reparameterisable encoders (MobileOne, RepViT, FastViT...) train with their branches and are fused for deployment by
:meth:`TimmSeg.deploy_form` (``timm.utils.reparameterize_model``), which ``segkd export`` and ``segkd bench`` call.
``pretrained`` is a local timm weights file of the encoder (e.g. ``torch.save(timm.create_model(name).state_dict())``
or timm's own ``.safetensors``), never a download.
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache

import timm
import torch
import torch.nn.functional as F
from timm.utils import reparameterize_model
from torch import Tensor, nn

from segkd.checkpoint import torch_load_weights
from segkd.errors import SegkdError
from segkd.models.base import FeatureSpec, SegModel, SegOutput
from segkd.models.segformer import AllMLPHead

PYRAMID = (4, 8, 16, 32)
HEADS = {"lraspp": "LR-ASPP head (MobileNetV3), logits at stride 8",
         "mlp": "SegFormer all-MLP head (128 ch), logits at stride 4"}
# module class names that mark an attention (or linear-attention) block: such an encoder's family is "transformer"
_ATTENTION = re.compile(r"attention|attn|mla\b|transformer", re.IGNORECASE)


def timm_backbone(arch: str, pretrained: str | None, **kwargs: object) -> nn.Module:
    """``timm.create_model(arch, **kwargs)``, its weights read from the local file ``pretrained`` when given (timm's
    ``pretrained_cfg_overlay``: it never touches the network); a file timm cannot load is one line naming it."""
    if not pretrained:
        return timm.create_model(arch, pretrained=False, **kwargs)
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=pretrained), **kwargs)
    except Exception as e:  # timm raises RuntimeError/KeyError/pickle errors: one line naming the file instead

        if not str(pretrained).endswith(".safetensors"):
            torch_load_weights(pretrained)  # a pickle it refuses gets the same one line as every other entry point
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise SegkdError(f"--pretrained {pretrained}: not loadable as {arch} backbone weights ({reason})") from None


def check_encoder(arch: str) -> str:
    """``arch`` if timm knows it, else a one-line error with timm's closest names."""
    if timm.is_model(arch):
        return arch
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise SegkdError(f"unknown timm encoder {arch!r}{hint}")


@lru_cache(maxsize=64)
def encoder_layout(arch: str) -> tuple[tuple[int, ...], str]:
    """``(out_indices, family)`` of a timm encoder, probed on the meta device (no weights are allocated): the
    deepest level at each stride of :data:`PYRAMID`, and ``transformer`` if any module is an attention block."""
    check_encoder(arch)
    try:
        with torch.device("meta"):
            probe = timm.create_model(arch, pretrained=False, features_only=True)
    except Exception as e:  # timm raises assertion/runtime errors for encoders it cannot cut into stages
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise SegkdError(f"timm encoder {arch!r} does not support features_only ({reason}); segkd students need "
                         "its multi-scale features") from None
    reductions = list(probe.feature_info.reduction())
    missing = [s for s in PYRAMID if s not in reductions]
    if missing:
        raise SegkdError(f"timm encoder {arch!r} gives features at strides {sorted(set(reductions))}, not the "
                         f"pyramid {list(PYRAMID)} a segmentation head needs")
    indices = tuple(max(i for i, r in enumerate(reductions) if r == s) for s in PYRAMID)
    hybrid = any(_ATTENTION.search(type(m).__name__) for m in probe.modules())
    return indices, "transformer" if hybrid else "cnn"


class LRASPPHead(nn.Module):
    """Lite R-ASPP (torchvision's module names): ``cbr`` and ``scale`` on the deep level, a classifier per level."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter: int = 128) -> None:
        super().__init__()
        self.cbr = nn.Sequential(nn.Conv2d(high_channels, inter, 1, bias=False), nn.BatchNorm2d(inter), nn.ReLU())
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(high_channels, inter, 1, bias=False),
                                   nn.Sigmoid())
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        low, high = feats[1], feats[3]  # strides 8 and 32
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


class TimmSeg(SegModel):
    """A timm encoder (:func:`encoder_layout`) and one of :data:`HEADS`."""

    def __init__(self, name: str, head: str, arch: str, num_classes: int, pretrained: str | None = None) -> None:
        super().__init__(name, num_classes)
        indices, family = encoder_layout(arch)
        self.arch, self.head_kind, self.family = arch, head, family  # type: ignore[assignment]
        self.encoder = timm_backbone(arch, pretrained, features_only=True, out_indices=indices)
        chans = [int(c) for c in self.encoder.feature_info.channels()]
        prefix = "stage" if family == "transformer" else "layer"
        self.feature_info = [FeatureSpec(f"{prefix}{i + 1}", c, s) for i, (c, s) in enumerate(zip(chans, PYRAMID))]
        if head == "lraspp":
            self.output_stride = 8
            self.head: nn.Module = LRASPPHead(chans[1], chans[3], num_classes)
        else:
            self.output_stride = 4
            self.head = AllMLPHead(tuple(chans), 128, num_classes)

    def forward(self, x: Tensor, taps: bool = False) -> Tensor | SegOutput:
        feats = self.encoder(x)
        logits = self.head(feats)
        if not taps:
            return logits
        return SegOutput(logits, {spec.name: f for spec, f in zip(self.feature_info, feats, strict=True)})

    def classifier_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def deploy_form(self) -> SegModel:
        """Fuse the encoder's reparameterisable branches (timm's ``reparameterize_model``, in place): the same
        function with fewer ops; call it on a model that will not be trained or saved any more."""

        self.encoder = reparameterize_model(self.encoder, inplace=True)
        return self


def parse_timm_name(name: str) -> tuple[str, str] | None:
    """``"lraspp-mobilenetv3_large_100"`` -> ``("lraspp", "mobilenetv3_large_100")``; ``None`` for other names."""
    head, sep, arch = name.partition("-")
    return (head, arch) if sep and head in HEADS and arch else None
