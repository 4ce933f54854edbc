"""Colourised masks and image overlays, written as PNG (atomically, like every segkd output)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from segkd.checkpoint import atomic_write
from segkd.errors import SegkdError

IGNORE_COLOUR = (0, 0, 0)


def colorize(mask: Tensor | np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int | None = 255) -> np.ndarray:
    """``H x W`` class map -> ``H x W x 3`` uint8 RGB using ``palette``; ignore pixels are black."""
    m = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise SegkdError(f"colorize expects an H x W mask, got shape {m.shape}")
    lut = np.zeros((max(256, len(palette) + 1), 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    m = m.astype(np.int64)
    out = np.zeros((*m.shape, 3), dtype=np.uint8)
    keep = (m >= 0) & (m < len(palette))
    out[keep] = lut[m[keep]]
    if ignore_index is not None:
        out[m == ignore_index] = IGNORE_COLOUR
    return out


def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised ``3 x H x W`` image back to ``H x W x 3`` uint8 RGB (inverse of ``(x/255 - mean) / std``)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise SegkdError(f"denormalize expects a 3 x H x W image, got shape {tuple(image.shape)}")
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * s + m).clamp(0, 1) * 255
    return rgb.round().to(torch.uint8).permute(1, 2, 0).numpy()


def overlay(image_rgb: np.ndarray, colour_mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour mask over an RGB image (``alpha`` = mask weight)."""
    if image_rgb.shape != colour_mask.shape:
        raise SegkdError(f"overlay: image {image_rgb.shape} and mask {colour_mask.shape} differ in size")
    blended = image_rgb.astype(np.float32) * (1 - alpha) + colour_mask.astype(np.float32) * alpha
    return blended.round().clip(0, 255).astype(np.uint8)


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write an ``H x W`` or ``H x W x 3`` uint8 array as PNG, atomically."""

    img = Image.fromarray(np.ascontiguousarray(array))
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_prediction(
    out_dir: str | Path,
    stem: str,
    pred: Tensor,
    palette: Sequence[Sequence[int]],
    image: Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    alpha: float = 0.5,
) -> list[Path]:
    """``<stem>_pred.png`` (colourised mask) and, given the normalised image, ``<stem>_overlay.png``.

    The overlay is drawn at the prediction's size; the image is resized (bilinear) when it differs.
    """
    out_dir = Path(out_dir)
    colour = colorize(pred, palette, ignore_index=None)
    paths = [save_png(out_dir / f"{stem}_pred.png", colour)]
    if image is not None:
        if mean is None or std is None:
            raise SegkdError("save_prediction: an overlay needs the mean/std the image was normalised with")
        if tuple(image.shape[-2:]) != tuple(pred.shape[-2:]):
            image = torch.nn.functional.interpolate(image[None].float(), size=tuple(pred.shape[-2:]),
                                                    mode="bilinear", align_corners=False)[0]
        paths.append(save_png(out_dir / f"{stem}_overlay.png", overlay(denormalize(image, mean, std), colour, alpha)))
    return paths
