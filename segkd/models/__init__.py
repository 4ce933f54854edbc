"""The model zoo: one registry of builders, each returning a :class:`SegModel`.

Adding a model is one builder function plus one ``MODELS.add`` call; ``tests/test_models.py`` then exercises it.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import timm

from segkd.errors import SegkdError
from segkd.models.base import (
    FeatureSpec,
    SegModel,
    SegOutput,
    count_params,
    deploy_param_count,
    deploy_state,
    upsample_logits,
)
from segkd.models.convert import load_pretrained_encoder
from segkd.models.deeplab import DeepLabV3, DeepLabV3Plus
from segkd.models.segformer import SegFormer
from segkd.models.timm_seg import HEADS, TimmSeg, encoder_layout, parse_timm_name
from segkd.registry import Registry
from segkd.shapes import model_stride

__all__ = [
    "MODELS",
    "FeatureSpec",
    "ModelEntry",
    "SegModel",
    "SegOutput",
    "check_model_kwargs",
    "count_params",
    "create_model",
    "deploy_param_count",
    "deploy_state",
    "upsample_logits",
]


@dataclass(frozen=True)
class ModelEntry:
    """``options_of``: the constructor whose keyword options ``build`` forwards through ``**kw`` (when ``build``
    itself does not list them), so :func:`check_model_kwargs` can name what a model takes."""

    build: Callable[..., SegModel]
    family: str
    summary: str
    options_of: Callable[..., object] | None = None


def _timm_entry(name: str) -> ModelEntry | None:
    """``<head>-<timm encoder>`` for any timm encoder with a feature pyramid (:mod:`segkd.models.timm_seg`)."""

    parsed = parse_timm_name(name)
    if parsed is None:
        return _near_timm_name(name)
    head, arch = parsed
    family = encoder_layout(arch)[1]  # unknown names and encoders without a pyramid fail here, in one line
    return ModelEntry(partial(_timm, name, head, arch), family, f"timm {arch} encoder, {HEADS[head]}")


def _near_timm_name(name: str) -> None:
    """A one-line error for ``<misspelt head>-<timm encoder>`` naming the student meant; ``None`` otherwise."""


    head, _, arch = name.partition("-")
    close = difflib.get_close_matches(head, list(HEADS), n=1, cutoff=0.6)
    if close and arch and timm.is_model(arch):
        raise SegkdError(f"unknown model {name!r}; did you mean {close[0]}-{arch}? (timm students are "
                         f"{' or '.join(f'{h}-<timm encoder>' for h in HEADS)})")
    return None


def _timm(name: str, head: str, arch: str, num_classes: int, pretrained: str | None = None) -> SegModel:

    return TimmSeg(name, head, arch, num_classes, pretrained=pretrained)


MODELS: Registry[ModelEntry] = Registry("model", resolver=_timm_entry)


def _segformer(name: str, variant: str, num_classes: int, pretrained: str | None = None, **kw) -> SegModel:
    model = SegFormer(name, variant, num_classes, **kw)
    if pretrained:

        load_pretrained_encoder(model, pretrained)
    return model


for _v in ("b0", "b1", "b2", "b3", "b4", "b5"):
    MODELS.add(
        f"segformer-{_v}",
        ModelEntry(partial(_segformer, f"segformer-{_v}", _v), "transformer", f"SegFormer with MiT-{_v.upper()}",
                   options_of=SegFormer),
        aliases=(f"segformer_{_v}", f"mit-{_v}", f"mit_{_v}"),
    )

for _depth in (18, 50, 101):
    _arch = f"resnet{_depth}"
    MODELS.add(
        f"deeplabv3-{_arch}",
        ModelEntry(
            partial(DeepLabV3, f"deeplabv3-{_arch}", _arch),
            "cnn",
            f"DeepLabV3, dilated ResNet-{_depth}, OS8, ASPP 12/24/36 (torchvision layout)",
        ),
        aliases=(f"deeplabv3_{_arch}",) + (("deeplabv3",) if _depth == 50 else ()),
    )
    MODELS.add(
        f"deeplabv3plus-{_arch}",
        ModelEntry(
            partial(DeepLabV3Plus, f"deeplabv3plus-{_arch}", _arch),
            "cnn",
            f"DeepLabV3+, ResNet-{_depth}, OS16, ASPP 6/12/18, 48-ch low-level decoder",
        ),
        aliases=(f"deeplabv3plus_{_arch}",) + (("deeplabv3plus",) if _depth == 101 else ()),
    )


_NOT_OPTIONS = ("self", "name", "variant", "arch", "head", "num_classes", "pretrained")


def model_options(name: str) -> dict[str, inspect.Parameter] | None:
    """The keyword options of zoo model ``name`` (its constructor's parameters beyond name, class count and
    pretrained weights), or ``None`` when its builder does not say (then nothing is checked)."""
    entry = MODELS.get(name)
    target = entry.options_of or (entry.build.func if isinstance(entry.build, partial) else entry.build)
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {k: p for k, p in params.items() if k not in _NOT_OPTIONS}


def check_model_kwargs(name: str, kwargs: dict, source: str = "model_kwargs") -> None:
    """One line naming ``source`` for a model option the constructor does not take or a value of the wrong kind
    (a number for a number, a flag for a flag, a list of integers for a sequence), before the model is built."""
    options = model_options(name)
    if options is None:
        return
    for key, value in kwargs.items():
        param = options.get(key)
        if param is None:
            takes = ", ".join(options) or "none"
            raise SegkdError(f"{source}: {MODELS.canonical(name)} takes no option {key!r} (it takes: {takes})")
        default = param.default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif isinstance(default, (tuple, list)):
            ok = isinstance(value, (tuple, list)) and all(isinstance(v, int) and v > 0 for v in value)
        else:
            ok = True
        if not ok:
            raise SegkdError(f"{source}: {MODELS.canonical(name)} option {key}={value!r} is not of the kind of its "
                             f"default ({default!r})")


# timm students listed by `segkd models` (any other `lraspp-`/`mlp-` + timm encoder name works as well); the family
# is written here so that listing them never builds a timm model (tests/test_timm_students.py checks it)
for _head, _arch, _family in (("lraspp", "mobilenetv3_large_100", "cnn"), ("lraspp", "mobilenetv4_conv_small", "cnn"),
                              ("mlp", "repvit_m1", "cnn"), ("mlp", "efficientvit_b0", "transformer")):
    MODELS.add(f"{_head}-{_arch}", ModelEntry(partial(_timm, f"{_head}-{_arch}", _head, _arch), _family,
                                              f"timm {_arch} encoder, {HEADS[_head]}"))


def create_model(name: str, num_classes: int = 19, pretrained: str | None = None, **kwargs) -> SegModel:
    """Build a zoo model by name (aliases allowed). ``pretrained`` is a local backbone weights file, never a URL."""
    check_model_kwargs(name, kwargs)
    if num_classes < 1:
        raise SegkdError(f"num_classes must be >= 1, got {num_classes}")
    if pretrained is not None:

        if not Path(pretrained).is_file():
            raise SegkdError(f"{pretrained}: pretrained weights file not found (segkd never downloads weights)")
    entry = MODELS.get(name)
    return entry.build(num_classes=num_classes, pretrained=pretrained, **kwargs)


def zoo_stride(name: str, **model_kwargs: object) -> int:
    """:func:`~segkd.shapes.model_stride` of a zoo model by name (for sources without a module, e.g. an ONNX
    file's metadata)."""
    return model_stride(create_model(name, **model_kwargs))  # type: ignore[arg-type]
