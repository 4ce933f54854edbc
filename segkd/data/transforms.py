"""Segmentation augmentation: one geometric transform applied identically to image and label.

Order (mmseg's): optional fixed resize (``--resize``), random rescale, random crop padded with 0 (image) and the
ignore index (label), horizontal flip, photometric jitter (brightness, contrast, saturation; hue is not jittered:
it costs an HSV round trip per image and matters little for driving scenes), normalisation. All randomness comes
from the ``rng`` passed in, which the dataset seeds from ``(seed, epoch, index)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from segkd.checkpoint import IMAGENET_MEAN, IMAGENET_STD


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


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float32)
    x += rng.uniform(-32, 32)  # brightness
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.5, 1.5) + mean  # contrast
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * rng.uniform(0.5, 1.5) + grey  # saturation
    return np.clip(x, 0, 255).astype(np.uint8)


class TrainTransform:
    """Random rescale, crop, flip, jitter, normalise (a picklable callable for DataLoader workers)."""

    def __init__(self, crop: tuple[int, int] | None = None, scale: tuple[float, float] = (0.5, 2.0),
                 flip: bool = True, jitter: bool = True, resize: tuple[int, int] | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 ignore_index: int = 255) -> None:
        self.crop, self.scale, self.flip, self.jitter, self.resize = crop, scale, flip, jitter, resize
        self.mean, self.std, self.ignore_index = list(mean), list(std), ignore_index

    def __call__(self, img: np.ndarray, lab: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.resize:
            img, lab = resize_pair(img, lab, self.resize)
        crop = self.crop or img.shape[:2]  # without --crop, a rescaled image is cropped/padded back to its size
        s = rng.uniform(*self.scale)
        if s != 1.0:
            h, w = img.shape[:2]
            img, lab = resize_pair(img, lab, (max(1, round(h * s)), max(1, round(w * s))))
        if tuple(img.shape[:2]) != tuple(crop):
            img, lab = self._random_crop(img, lab, crop, rng)
        if self.flip and rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        if self.jitter:
            img = _jitter(img, rng)
        return to_tensors(img, lab, self.mean, self.std)

    def _random_crop(self, img: np.ndarray, lab: np.ndarray, crop: tuple[int, int], rng: np.random.Generator):
        ch, cw = crop
        h, w = img.shape[:2]
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        if ph or pw:
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=0)
            lab = np.pad(lab, ((0, ph), (0, pw)), constant_values=self.ignore_index)
            h, w = img.shape[:2]
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        return img[top:top + ch, left:left + cw], lab[top:top + ch, left:left + cw]


class EvalTransform:
    """Deterministic: optional resize (image bilinear, label nearest), then normalise."""

    def __init__(self, resize: tuple[int, int] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.resize, self.mean, self.std = resize, list(mean), list(std)

    def __call__(self, img: np.ndarray, lab: np.ndarray, rng: np.random.Generator | None = None):
        if self.resize:
            img, lab = resize_pair(img, lab, self.resize)
        return to_tensors(img, lab, self.mean, self.std)


def build_train_transform(crop: tuple[int, int] | None = None, scale: tuple[float, float] = (0.5, 2.0),
                          flip: bool = True, jitter: bool = True, resize: tuple[int, int] | None = None,
                          mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                          ignore_index: int = 255) -> TrainTransform:
    return TrainTransform(crop, scale, flip, jitter, resize, mean, std, ignore_index)


def build_eval_transform(resize: tuple[int, int] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> EvalTransform:
    return EvalTransform(resize, mean, std)


def collate_pairs(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, label) pairs; images of different sizes get a one-line hint instead of a stack error."""
    shapes = {tuple(img.shape) for img, _ in batch}
    if len(shapes) > 1:
        from segkd.errors import SegkdError

        sizes = ", ".join(f"{s[1]}x{s[2]}" for s in sorted(shapes)[:3])
        raise SegkdError(f"images of different sizes in one batch ({sizes}); pass --crop HxW or --resize HxW")
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
