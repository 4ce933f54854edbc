"""Parsing of the size and shape strings every command takes (``512x1024``, trtexec's ``1x3x512x1024``)."""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import overload

from segkd.errors import SegkdError

# One pixel limit for every image segkd reads or is asked to make (files, --size, --crop, --resize, --input): 8192 x
# 8192 = 67,108,864 pixels. Chosen well above every segmentation benchmark (Cityscapes 2048x1024 = 2.1 Mpx, Mapillary
# at most ~22 Mpx) and well below what a request typed by mistake asks (100000x100000 = 10 Gpx: 30 GB as uint8 RGB,
# 120 GB as float32). PIL's own bomb check is set to the same number (segkd.data.datasets), so a decoded file and a
# typed size meet the same limit; docs/data.md says so.
MAX_PIXELS = 8192 * 8192
# a whole batch (bench --input/--batch, export profiles): 2^30 pixels = 12 GiB of float32 RGB input
MAX_BATCH_PIXELS = 2**30


def check_pixels(h: int, w: int, what: str, batch: int = 1) -> None:
    """Refuse an image (or batch) size above :data:`MAX_PIXELS` (:data:`MAX_BATCH_PIXELS`) before anything is
    allocated; ``what`` (the option and its value) starts the one-line error."""
    if h * w > MAX_PIXELS:
        raise SegkdError(f"{what}: {h * w:,} pixels per image, above segkd's limit of {MAX_PIXELS:,} (8192x8192; "
                         "see docs/data.md)")
    if batch * h * w > MAX_BATCH_PIXELS:
        raise SegkdError(f"{what}: {batch * h * w:,} pixels per batch, above segkd's limit of {MAX_BATCH_PIXELS:,} "
                         "(see docs/data.md)")


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
    check_pixels(vals[0], vals[1], f"{option} {text!r}")
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
    check_pixels(dims[2], dims[3], f"{option} {text!r}", batch=dims[0])
    return dims[0], dims[1], dims[2], dims[3]


def model_stride(model: object) -> int:
    """The coarsest feature stride of a zoo model (32 SegFormer, 16 DeepLabV3+, 8 DeepLabV3): the smallest input
    side it can take (SegFormer's spatial-reduction convs and the stride-2 stems fail or floor away below it)."""
    info = getattr(model, "feature_info", None) or []
    return max((spec.stride for spec in info), default=getattr(model, "output_stride", 1))


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
