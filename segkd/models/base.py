"""The contract every zoo model follows.

A zoo model is a plain ``nn.Module``:

* ``model(x)`` takes a normalised image batch ``B x 3 x H x W`` and returns logits at the architecture's own
  output stride (``model.output_stride``: 4 for SegFormer and DeepLabV3+, 8 for DeepLabV3). Nothing else is
  computed or kept, so export and inference see a plain logits model.
* ``model(x, taps=True)`` returns a :class:`SegOutput`: the same logits plus the named feature taps declared in
  ``model.feature_info`` (post-norm stage outputs ``stage1..4`` and pre-block patch embeddings ``embed1..4`` for
  transformers; ``layer1..layer4`` and ``aspp`` for CNNs), all as ``B x C x h x w`` maps.
* ``model.feature_info`` lists every tap's name, channels and stride without a forward pass.
* :func:`upsample_logits` brings logits to the input size (bilinear, ``align_corners=False``), as torchvision and
  HuggingFace do at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Family = Literal["cnn", "transformer"]


@dataclass(frozen=True)
class FeatureSpec:
    """One named tap: ``kind`` is ``feature`` (stage output) or ``embed`` (patch embedding before the blocks)."""

    name: str
    channels: int
    stride: int
    kind: Literal["feature", "embed"] = "feature"


@dataclass
class SegOutput:
    """Logits plus the taps asked for (empty dicts when none were)."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)
    embeds: dict[str, Tensor] = field(default_factory=dict)

    def tap(self, name: str) -> Tensor:
        """A feature or embedding by name."""
        if name in self.features:
            return self.features[name]
        if name in self.embeds:
            return self.embeds[name]
        raise KeyError(f"no tap {name!r}; have {sorted(self.features) + sorted(self.embeds)}")


class SegModel(nn.Module):
    """Base class: holds the zoo metadata shared by all architectures."""

    family: Family = "cnn"
    output_stride: int = 8
    feature_info: list[FeatureSpec]
    # parameter-name prefixes of training-only parts (an auxiliary head): left out of deploy checkpoints and
    # parameter counts, ignored when present in a checkpoint; each architecture names its own (one place)
    training_only: tuple[str, ...] = ()

    def __init__(self, name: str, num_classes: int) -> None:
        super().__init__()
        self.zoo_name = name
        self.num_classes = num_classes
        self.feature_info = []

    def feature_spec(self, name: str) -> FeatureSpec:
        for spec in self.feature_info:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.zoo_name} has no tap {name!r}; taps: {[s.name for s in self.feature_info]}")

    def taps_of(self, kind: str) -> list[FeatureSpec]:
        return [s for s in self.feature_info if s.kind == kind]

    def classifier_parameters(self) -> list[nn.Parameter]:
        """Parameters of the decoder/head (useful for a higher head LR). Overridden by each architecture."""
        return []

    def deploy_form(self) -> SegModel:
        """The model as deployed (export, bench): the same function, its trainable branches fused where the
        architecture has such (timm's reparameterisable encoders); ``self`` for every other model."""
        return self

    def predict(self, x: Tensor) -> Tensor:
        """Logits upsampled to the input size."""
        return upsample_logits(self(x), x.shape[-2:])


def upsample_logits(logits: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear upsampling of logits to ``size`` with ``align_corners=False`` (torchvision / HF convention)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def is_training_only(model: nn.Module, key: str) -> bool:
    """Whether the state-dict ``key`` belongs to a training-only part of ``model`` (its ``training_only``)."""
    return key.startswith(tuple(getattr(model, "training_only", ())))


def deploy_state(model: nn.Module) -> dict[str, Tensor]:
    """The deployable weights: ``model.state_dict()`` without its training-only parts (DeepLabV3's aux head)."""
    return {k: v for k, v in model.state_dict().items() if not is_training_only(model, k)}


def deploy_param_count(model: nn.Module) -> int:
    """Parameters of the deployable model: the one definition run.json, distill.json and ``segkd bench`` report
    (buffers such as BatchNorm statistics are not parameters; training-only parts are left out)."""
    return sum(p.numel() for k, p in model.named_parameters() if not is_training_only(model, k))
