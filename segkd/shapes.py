"""Parsing of the size and shape strings every command takes (``512x1024``, trtexec's ``1x3x512x1024``)."""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import overload

from segkd.errors import SegkdError


@overload
def parse_hw(text: None, option: str = "size") -> None: ...


@overload
def parse_hw(text: str | Sequence[int], option: str = "size") -> tuple[int, int]: ...


def parse_hw(text: str | Sequence[int] | None, option: str = "size") -> tuple[int, int] | None:
    """``"512x1024"``, ``"512"`` (square) or ``(512, 1024)`` -> ``(512, 1024)``; a one-line error naming ``option``.
    ``None`` (an option not given) passes through as ``None``."""
    if text is None:
        return None
    if isinstance(text, str):
        parts = text.strip().lower().replace("*", "x").replace(",", "x").split("x")
        try:
            vals = tuple(int(p) for p in parts)
        except ValueError:
            raise SegkdError(f"{option} {text!r}: expected HxW with positive integers, e.g. 512x1024") from None
    else:  # the Python API: integers only (int() would floor 1.5 and raise on "a" or nan)
        try:
            vals = tuple(operator.index(v) for v in text)
        except TypeError:
            raise SegkdError(f"{option} {text!r}: expected HxW with positive integers, e.g. 512x1024") from None
    if len(vals) == 1:
        vals = (vals[0], vals[0])
    if len(vals) != 2 or min(vals) < 1:
        raise SegkdError(f"{option} {text!r}: expected HxW with positive integers, e.g. 512x1024")
    return vals[0], vals[1]


def parse_shape(text: str, option: str = "--input", allow_hw: bool = False) -> tuple[int, int, int, int]:
    """A trtexec-style ``BxCxHxW`` (C must be 3), or with ``allow_hw`` an ``HxW`` meaning ``1x3xHxW``."""
    raw = (text or "").strip().lower().replace(" ", "")
    expected = "BxCxHxW (e.g. 1x3x512x1024)" + (" or HxW (e.g. 512x1024)" if allow_hw else ", as in trtexec")
    if not re.fullmatch(r"\d+(x\d+){1,3}", raw):
        raise SegkdError(f"{option} {text!r}: expected {expected}")
    dims = [int(p) for p in raw.split("x")]
    if len(dims) == 2 and allow_hw:
        dims = [1, 3, *dims]
    if len(dims) != 4:
        raise SegkdError(f"{option} {text!r}: expected {expected}")
    if min(dims[0], dims[2], dims[3]) < 1:
        raise SegkdError(f"{option} {text!r}: batch, height and width must be positive integers")
    if dims[1] != 3:
        raise SegkdError(f"{option} {text!r}: segkd models take 3-channel RGB images (C must be 3, got {dims[1]})")
    return dims[0], dims[1], dims[2], dims[3]


def model_stride(model: object) -> int:
    """The coarsest feature stride of a zoo model (32 SegFormer, 16 DeepLabV3+, 8 DeepLabV3): the smallest input
    side it can take (SegFormer's spatial-reduction convs and the stride-2 stems fail or floor away below it)."""
    info = getattr(model, "feature_info", None) or []
    return max((spec.stride for spec in info), default=getattr(model, "output_stride", 1))


def zoo_stride(name: str, **model_kwargs: object) -> int:
    """:func:`model_stride` of a zoo model by name (for sources without a module, e.g. an ONNX file's metadata)."""
    from segkd.models import create_model

    return model_stride(create_model(name, **model_kwargs))  # type: ignore[arg-type]


def check_min_size(hw: Sequence[int], stride: int, option: str, model_name: str) -> None:
    """The one input-size check of every command: each side at least the model's coarsest stride."""
    h, w = int(hw[-2]), int(hw[-1])
    if h < stride or w < stride:
        raise SegkdError(f"{option} {h}x{w}: {model_name} needs at least {stride}x{stride} (its coarsest feature "
                         f"stride is {stride})")


@dataclass(frozen=True)
class TrainedSize:
    """The input size a checkpoint was trained and validated at (:func:`trained_size`).

    ``resize`` is what every training image was resized to before augmenting and what validation fed the model, so
    ``eval`` and ``predict`` resize to it; ``crop`` is the patch the model was trained on. ``export --size`` and
    ``bench --input`` need one fixed size: :attr:`deploy` is ``resize``, else ``crop`` (a crop-only run validated at
    native size, whose resolution segkd does not know), else nothing (the command's own default applies).
    ``val_labels`` is how validation scored: against labels ``resized`` with the input, or at their ``native`` size.
    ``source`` says where the figures came from: ``metadata`` (the checkpoint's ``input_size``), ``run arguments``
    (older checkpoints, whose ``args`` hold the run's ``--crop``/``--resize``/``--val-labels``) or ``""`` (unknown).
    """

    crop: tuple[int, int] | None = None
    resize: tuple[int, int] | None = None
    val_labels: str = "resized"
    source: str = ""

    @property
    def deploy(self) -> tuple[int, int] | None:
        return self.resize or self.crop

    def record(self) -> dict[str, object]:
        """The JSON form stored as ``CheckpointMeta.input_size``."""
        return {"crop": list(self.crop) if self.crop else None, "resize": list(self.resize) if self.resize else None,
                "val_labels": self.val_labels}


def size_from_options(options: Mapping[str, object], source: str = "metadata") -> TrainedSize:
    """The :class:`TrainedSize` of a run's options (``crop``, ``resize``, ``val_labels``: a ``TrainConfig`` as a dict,
    or a stored record); unparseable values count as unknown (a command only wanted a default from them)."""
    try:
        crop, resize = (parse_hw(options.get(k) or None, k) for k in ("crop", "resize"))  # type: ignore[arg-type]
    except (SegkdError, TypeError):
        return TrainedSize()
    if crop is None and resize is None:
        return TrainedSize()
    labels = options.get("val_labels")
    return TrainedSize(crop, resize, labels if labels in ("resized", "native") else "resized", source)  # type: ignore


def trained_size(meta: object) -> TrainedSize:
    """The :class:`TrainedSize` of a checkpoint's metadata (``CheckpointMeta`` or its JSON dict, as a segkd ONNX file
    holds it):
    its ``input_size``, else (older checkpoints) the ``--crop``/``--resize`` of the run arguments it stored."""
    get = meta.get if isinstance(meta, Mapping) else lambda key: getattr(meta, key, None)
    for source, record in (("metadata", get("input_size")), ("run arguments", get("args"))):
        if isinstance(record, Mapping):
            found = size_from_options(record, source)
            if found.source:
                return found
    return TrainedSize()


def hw_text(hw: Sequence[int]) -> str:
    """``(60, 80)`` -> ``"60x80"``."""
    return f"{hw[0]}x{hw[1]}"
