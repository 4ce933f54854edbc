"""Segmentation augmentation: one geometric transform applied identically to image and label.

Order (mmseg's): optional fixed resize (``--resize``), random rescale, random crop, horizontal flip, photometric
jitter, padding to the crop size (image 0, label the ignore index), normalisation. Jitter runs before the padding
so padded pixels stay exactly 0 (black) whatever the jitter draws. Padding goes to the bottom/right as in mmseg.
All randomness comes from the ``rng`` passed in, which the dataset seeds from ``(seed, epoch, index)``.

Jitter ranges are mmseg's PhotoMetricDistortion (brightness +-32, contrast and saturation x0.5..1.5) with a light
hue rotation (+-18 degrees about the grey axis, done as a 3x3 colour matrix so it needs no HSV round trip).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from segkd.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from segkd.errors import SegkdError


def to_tensors(img: np.ndarray, lab: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 H x W x 3 -> normalised float 3 x H x W; label -> int64 H x W."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s, torch.from_numpy(np.ascontiguousarray(lab)).long()


def resize_pair(img: np.ndarray, lab: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``size`` (H, W): image bilinear, label nearest."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img, lab
    img = np.array(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    lab = np.array(Image.fromarray(lab.astype(np.int32)).resize((w, h), Image.NEAREST)).astype(np.int64)
    return img, lab


HUE_DEGREES = 18.0


def hue_matrix(degrees: float) -> np.ndarray:
    """3x3 RGB matrix rotating colours by ``degrees`` about the grey axis (greys are unchanged)."""
    a = np.deg2rad(degrees)
    k = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], np.float32) / np.sqrt(3)
    return (np.cos(a) * np.eye(3) + (1 - np.cos(a)) / 3 * np.ones((3, 3)) + np.sin(a) * k).astype(np.float32)


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float32)
    x += rng.uniform(-32, 32)  # brightness
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.5, 1.5) + mean  # contrast
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * rng.uniform(0.5, 1.5) + grey  # saturation
    x = x @ hue_matrix(rng.uniform(-HUE_DEGREES, HUE_DEGREES)).T  # hue
    return np.clip(x, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Geometry:
    """Where a training crop came from: enough to warp any map of the source image exactly like the crop.

    The source image (``source`` = H0 x W0) was scaled (``--resize``, then the random rescale; bilinear with
    ``align_corners=False`` semantics, so the two compose into one scaling) to ``scaled``, cropped at
    ``(top, left)`` to ``cropped`` (smaller than ``out`` where the scaled image is smaller than the crop),
    flipped horizontally when ``flipped``, then padded bottom/right to ``out``."""

    source: tuple[int, int]
    scaled: tuple[int, int]
    top: int
    left: int
    cropped: tuple[int, int]
    out: tuple[int, int]
    flipped: bool


class TrainTransform:
    """Random rescale, crop, flip, jitter, pad, normalise (a picklable callable for DataLoader workers).

    Without ``crop`` the output keeps the (resized) input size: a rescaled image is cropped or padded back to it,
    so batches stack.
    """

    def __init__(self, crop: tuple[int, int] | None = None, scale: tuple[float, float] = (0.5, 2.0),
                 flip: bool = True, jitter: bool = True, resize: tuple[int, int] | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 ignore_index: int = 255) -> None:
        if crop is not None and min(crop) < 1:
            raise SegkdError(f"--crop {crop[0]}x{crop[1]}: both sides must be at least 1")
        if not 0 < scale[0] <= scale[1]:
            raise SegkdError(f"--scale {scale[0]},{scale[1]}: needs 0 < min <= max")
        self.crop, self.scale, self.flip, self.jitter, self.resize = crop, scale, flip, jitter, resize
        self.mean, self.std, self.ignore_index = list(mean), list(std), ignore_index

    def __call__(self, img: np.ndarray, lab: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _, _ = self.apply(img, lab, rng)
        return x, y

    def apply(self, img: np.ndarray, lab: np.ndarray, rng: np.random.Generator, clean: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, Geometry, torch.Tensor | None]:
        """The augmented pair, the geometry that made it, and (``clean=True``) the same crop without jitter.

        The random draws are the same with or without ``clean``, so the student's crop never depends on whether a
        teacher view or a teacher cache is attached (paired runs stay paired)."""
        h0, w0 = img.shape[:2]
        if self.resize:
            img, lab = resize_pair(img, lab, self.resize)
        ch, cw = self.crop or img.shape[:2]
        s = rng.uniform(*self.scale)
        if s != 1.0:
            h, w = img.shape[:2]
            img, lab = resize_pair(img, lab, (max(1, round(h * s)), max(1, round(w * s))))
        h, w = img.shape[:2]
        top = int(rng.integers(0, max(h - ch, 0) + 1))
        left = int(rng.integers(0, max(w - cw, 0) + 1))
        img, lab = img[top:top + ch, left:left + cw], lab[top:top + ch, left:left + cw]
        flipped = bool(self.flip and rng.random() < 0.5)
        if flipped:
            img, lab = img[:, ::-1], lab[:, ::-1]
        geom = Geometry((h0, w0), (h, w), top, left, (img.shape[0], img.shape[1]), (ch, cw), flipped)
        plain = img
        if self.jitter:
            img = _jitter(img, rng)
        ph, pw = ch - img.shape[0], cw - img.shape[1]
        if ph or pw:
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=0)
            lab = np.pad(lab.astype(np.int64), ((0, ph), (0, pw)), constant_values=self.ignore_index)
        x, y = to_tensors(img, lab, self.mean, self.std)
        teacher_x = None
        if clean:
            if not self.jitter:
                teacher_x = x
            else:
                if ph or pw:
                    plain = np.pad(plain, ((0, ph), (0, pw), (0, 0)), constant_values=0)
                teacher_x, _ = to_tensors(plain, lab, self.mean, self.std)
        return x, y, geom, teacher_x


class EvalTransform:
    """Deterministic: optional resize (image bilinear, label nearest unless ``resize_labels=False``), normalise.

    ``resize_labels=False`` resizes the image only: a model run at a reduced input size is then scored against the
    labels at their stored resolution (the evaluator upsamples the scores to the label size), as mmseg does."""

    def __init__(self, resize: tuple[int, int] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, resize_labels: bool = True) -> None:
        self.resize, self.mean, self.std, self.resize_labels = resize, list(mean), list(std), resize_labels

    def __call__(self, img: np.ndarray, lab: np.ndarray, rng: np.random.Generator | None = None):
        if self.resize:
            resized, lab_r = resize_pair(img, lab, self.resize)
            img, lab = resized, (lab_r if self.resize_labels else lab)
        return to_tensors(img, lab, self.mean, self.std)


def build_train_transform(crop: tuple[int, int] | None = None, scale: tuple[float, float] = (0.5, 2.0),
                          flip: bool = True, jitter: bool = True, resize: tuple[int, int] | None = None,
                          mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                          ignore_index: int = 255) -> TrainTransform:
    """The training augmentation: ``(uint8 HxWx3, int HxW, rng) -> (normalised 3xHxW, int64 HxW)``."""
    _check_resize(resize)
    return TrainTransform(crop, scale, flip, jitter, resize, mean, std, ignore_index)


def build_eval_transform(resize: tuple[int, int] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD, resize_labels: bool = True) -> EvalTransform:
    """Deterministic evaluation transform: optional resize (image bilinear, label nearest), normalisation."""
    _check_resize(resize)
    return EvalTransform(resize, mean, std, resize_labels)


def _check_resize(resize: tuple[int, int] | None) -> None:
    if resize is not None and min(resize) < 1:
        raise SegkdError(f"--resize {resize[0]}x{resize[1]}: both sides must be at least 1")


def collate_pairs(batch: list[tuple]) -> tuple:
    """Stack (image, label) pairs; images of different sizes get a one-line hint instead of a stack error.

    Items may carry a third element, a dict of per-image tensors (a distillation dataset's teacher view, cached
    teacher maps, labelled flags); each key is stacked and the batch is ``(images, labels, extras)`` (see
    :func:`join_extras`). An item may also be a group of images (a 4-D image tensor, e.g. a labelled crop with its
    unlabelled partners): groups are concatenated along the batch."""
    shapes = {tuple(b[0].shape[-3:]) for b in batch}
    if len(shapes) > 1:
        sizes = ", ".join(f"{s[1]}x{s[2]}" for s in sorted(shapes)[:3])
        raise SegkdError(f"images of different sizes in one batch ({sizes}); pass --crop HxW or --resize HxW")
    join = torch.cat if batch[0][0].ndim == 4 else torch.stack
    images, labels = join([b[0] for b in batch]), join([b[1] for b in batch])
    if len(batch[0]) < 3:
        return images, labels
    return images, labels, join_extras([b[2] for b in batch], join)


def join_extras(items: list[dict[str, Any]], join: Any = torch.stack) -> dict[str, Any]:
    """Per-image extras joined key by key: tensors with ``join`` (stack, or cat for groups); any other value by its
    own ``join`` (e.g. :class:`~segkd.engine.batch.StoredTargets`, already batched, which pads maps of different
    sizes and concatenates)."""
    out: dict[str, Any] = {}
    for k in items[0]:
        values = [e[k] for e in items]
        out[k] = join(values) if isinstance(values[0], torch.Tensor) else type(values[0]).join(values)
    return out
