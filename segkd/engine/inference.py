"""Inference at the input size: whole image, sliding window, flip and multi-scale test-time augmentation.

:func:`make_predictor` wraps any callable that maps a normalised image batch ``B x 3 x h x w`` to logits
``B x K x h' x w'`` at some output stride (a zoo model, a plain function, an ONNX Runtime session wrapper) and
returns ``predict(images) -> B x K x H x W`` scores at the input size. The callable's output is always brought to
the size of what it was given by bilinear upsampling with ``align_corners=False`` (the torchvision / HF / mmseg
convention, :func:`segkd.models.upsample_logits`).

Choices (the papers and tools differ; these follow mmseg, which most published numbers use):

* **slide**: windows of ``crop`` size every ``stride`` pixels; the last window in each direction is shifted back
  so it ends at the border (mmseg ``slide_inference``), and when the image is smaller than the crop the window is
  zero-padded on the bottom/right to the crop size (zero = the mean colour after normalisation) and the padded part
  of the output is dropped, so fixed-shape models (static ONNX) see only crop-sized inputs. Logits are summed
  over windows and divided by the per-pixel window count.
* **TTA** (flip and/or several scales): each view's logits are brought back to the input size (flipped back,
  resized bilinearly) and the views are averaged as **softmax probabilities** (mmseg ``SegTTAModel``), because
  logits of differently scaled views are not calibrated against each other. ``tta_average="logits"`` averages
  logits instead. To keep one output type, the averaged probabilities are returned as their log, so ``softmax``
  of the result gives the averaged probabilities and ``argmax`` the prediction either way; without TTA the plain
  (window-averaged) logits are returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from segkd.errors import SegkdError
from segkd.models.base import upsample_logits
from segkd.shapes import hw_text, parse_hw, trained_size

Predictor = Callable[[Tensor], Tensor]


def parse_scales(text: str | Sequence[float] | None) -> tuple[float, ...]:
    """``"0.75,1.0,1.25"`` -> ``(0.75, 1.0, 1.25)``; a one-line error for anything else."""
    if text is None or text == "":
        return (1.0,)
    if isinstance(text, str):
        try:
            vals = tuple(float(p) for p in text.replace(" ", "").split(",") if p)
        except ValueError:
            raise SegkdError(f"--scales {text!r}: expected comma-separated numbers, e.g. 0.75,1.0,1.25") from None
    else:
        vals = tuple(float(v) for v in text)
    if not vals or any(not (v > 0 and v < 16) for v in vals):
        raise SegkdError(f"--scales {text!r}: expected comma-separated numbers in (0, 16), e.g. 0.75,1.0,1.25")
    return vals


def _as_tensor(out: object, device: torch.device) -> Tensor:
    """Accept model outputs that are tensors, numpy arrays, ``SegOutput``-like objects or 1-tuples."""
    if hasattr(out, "logits"):
        out = out.logits  # type: ignore[union-attr]
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        out = torch.as_tensor(out)
    if out.ndim != 4:
        raise SegkdError(f"the model returned a tensor of shape {tuple(out.shape)}; expected B x K x h x w logits")
    return out.to(device=device, dtype=torch.float32)


def _whole(fn: Predictor, images: Tensor) -> Tensor:
    return upsample_logits(_as_tensor(fn(images), images.device), images.shape[-2:])


def slide_windows(
    height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """``(y1, y2, x1, x2)`` windows covering an image (mmseg grid; last window shifted back to the border)."""
    (ch, cw), (sh, sw) = crop, stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            out.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return out


def _slide(fn: Predictor, images: Tensor, crop: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    b, _, h, w = images.shape
    total: Tensor | None = None
    count = torch.zeros(1, 1, h, w, device=images.device)
    for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
        window = images[:, :, y1:y2, x1:x2]
        wh, ww = y2 - y1, x2 - x1
        if (wh, ww) != crop:  # image smaller than the crop: pad bottom/right so the model sees crop-sized input
            window = F.pad(window, (0, crop[1] - ww, 0, crop[0] - wh))
        logits = _whole(fn, window)[:, :, :wh, :ww]
        if total is None:
            total = images.new_zeros(b, logits.shape[1], h, w, dtype=torch.float32)
        total[:, :, y1:y2, x1:x2] += logits
        count[:, :, y1:y2, x1:x2] += 1
    assert total is not None  # slide_windows always yields at least one window
    return total / count


def _windows(mode: str, crop: tuple[int, int] | str | None, stride: tuple[int, int] | str | None
             ) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """``(crop, stride)`` of the sliding window, checked (stride defaults to 2/3 of the crop)."""
    if mode not in ("whole", "slide"):
        raise SegkdError(f"--mode {mode!r}: expected whole or slide")
    crop_hw = parse_hw(crop, "--crop")
    stride_hw = parse_hw(stride, "--stride")
    if mode == "whole":
        if stride is not None:
            raise SegkdError("--stride only applies with --mode slide")
        return crop_hw, None
    if crop_hw is None:
        raise SegkdError("--mode slide needs --crop HxW")
    if stride_hw is None:
        stride_hw = (max(1, crop_hw[0] * 2 // 3), max(1, crop_hw[1] * 2 // 3))
    if stride_hw[0] > crop_hw[0] or stride_hw[1] > crop_hw[1]:
        raise SegkdError(f"--stride {stride_hw[0]}x{stride_hw[1]} is larger than --crop "
                         f"{crop_hw[0]}x{crop_hw[1]}: some pixels would never be predicted")
    return crop_hw, stride_hw


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """The size of a ``--scales`` view: each side times ``scale``, rounded, at least 1."""
    return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))) if scale != 1.0 else (size[0], size[1])


def _tta(single: Predictor, images: Tensor, scales: Sequence[float], flip: bool, average: str) -> Tensor:
    """Scores averaged over the rescaled (and flipped) views, each upsampled back to the input size: mean of the
    softmax probabilities (returned as log-probabilities) or of the logits."""
    size = images.shape[-2:]
    acc: Tensor | None = None
    views = 0
    for s in scales:
        scaled = images if s == 1.0 else F.interpolate(images, size=scaled_size(size, s), mode="bilinear",
                                                       align_corners=False)
        for flipped in (False, True) if flip else (False,):
            logits = single(scaled.flip(-1) if flipped else scaled).float()
            logits = upsample_logits(logits.flip(-1) if flipped else logits, size)
            term = logits.softmax(1) if average == "probs" else logits
            acc = term if acc is None else acc + term
            views += 1
    assert acc is not None
    mean = acc / views
    return mean.clamp_min(1e-12).log() if average == "probs" else mean


def make_predictor(
    model: Predictor,
    mode: Literal["whole", "slide"] = "whole",
    crop: tuple[int, int] | str | None = None,
    stride: tuple[int, int] | str | None = None,
    flip: bool = False,
    scales: Sequence[float] | str = (1.0,),
    tta_average: Literal["probs", "logits"] = "probs",
    amp: bool = False,
    min_side: int = 1,
    model_name: str = "the model",
) -> Predictor:
    """``predict(images) -> B x K x H x W`` scores at the input size (see the module docstring for the choices).

    ``model`` is called under ``torch.inference_mode()``; put an ``nn.Module`` in eval mode first. ``stride``
    defaults to two thirds of ``crop`` (mmseg's usual 512/341 ratio). ``amp`` runs the model under autocast
    (bf16 on CPU, fp16 on CUDA) while the averaging stays fp32. ``min_side`` (the model's coarsest stride) makes a
    whole-image input, or a ``scales`` view of one, smaller than that a one-line error instead of a conv traceback.
    """
    crop_hw, stride_hw = _windows(mode, crop, stride)
    scale_list = parse_scales(scales)
    if tta_average not in ("probs", "logits"):
        raise SegkdError(f"tta_average {tta_average!r}: expected probs or logits")
    use_tta = flip or len(scale_list) > 1 or scale_list[0] != 1.0

    def check_side(hw: Sequence[int], size: Sequence[int], s: float) -> None:
        if mode == "whole" and min(hw) < min_side:  # slide windows are --crop sized, checked by the caller
            what = (f"--scales {s:g}: scales a {size[0]}x{size[1]} image to {hw[0]}x{hw[1]}" if s != 1.0
                    else f"a {hw[0]}x{hw[1]} image")
            raise SegkdError(f"{what}, below the {min_side}x{min_side} {model_name} needs (its coarsest feature "
                             "stride)" + ("" if s != 1.0 else "; resize it with --resize"))

    def single(images: Tensor) -> Tensor:
        if stride_hw is not None:
            assert crop_hw is not None
            return _slide(model, images, crop_hw, stride_hw)
        return _whole(model, images)

    def predict(images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise SegkdError(f"expected an image batch B x C x H x W, got shape {tuple(images.shape)}")
        dtype = torch.bfloat16 if images.device.type == "cpu" else torch.float16
        size = tuple(images.shape[-2:])
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=dtype, enabled=amp):
            if not use_tta:
                check_side(size, size, 1.0)
                return single(images).float()
            for scale in scale_list:  # every view checked before any forward
                check_side(scaled_size(size, scale), size, scale)
            return _tta(single, images, scale_list, flip, tta_average)

    return predict


@dataclass(frozen=True)
class InputSize:
    """The size images are resized to before inference (``None``: as stored), how labels are scored, and a note
    saying which size was used and why (``eval`` and ``predict`` print it when the checkpoint chose the size)."""

    resize: tuple[int, int] | None
    val_labels: str
    note: str
    from_checkpoint: bool = False  # the size was not typed but taken from what the checkpoint records


def parse_resize(text: str | None) -> tuple[int, int] | None:
    """``--resize HxW`` checked (``native`` and ``None`` pass as ``None``: the caller decides what they mean)."""
    if text is None or str(text).strip().lower() == "native":
        return None
    return parse_hw(text, "--resize")


def resolve_input_size(resize: str | None, val_labels: str | None, meta: object, source: str) -> InputSize:
    """``--resize``/``--val-labels`` as given, else what the checkpoint ``meta`` was validated at
    (:func:`segkd.shapes.trained_size`): a model trained on 60x80 inputs is scored at 60x80, not at the stored
    size it never saw; ``--resize native`` asks for the stored size explicitly."""
    trained = trained_size(meta)
    if resize is not None:
        hw = parse_resize(resize)
        why = "--resize native" if hw is None else "--resize"
    else:
        hw = trained.resize
        why = (f"the size {Path(source).name} was validated at, from its {trained.source}" if hw else
               f"{Path(source).name} records no validation size" if not trained.source else
               f"{Path(source).name} was validated at the stored size")
    labels = val_labels or (trained.val_labels if trained.source else "resized")
    what = f"input {hw_text(hw)}" if hw else "input at the stored size"
    scored = "" if hw is None else "; labels resized with it" if labels == "resized" else \
        "; labels at their stored size (logits upsampled)"
    return InputSize(hw, labels, f"{what} ({why}){scored}", resize is None and bool(trained.source))
