"""``segkd predict``: label maps and colour overlays for images without labels.

Each image is preprocessed exactly as ``segkd eval`` does (:func:`preprocess_image`: RGB in [0, 1], resized
bilinearly to the size the checkpoint was validated at unless ``--resize`` says otherwise, normalised with the
checkpoint's mean/std), run through :func:`segkd.engine.inference.make_predictor` (sliding window and TTA as in
eval), and the scores are upsampled to the image's own size before the argmax, so every output matches its image
pixel for pixel. Outputs per image ``NAME.ext`` in ``--out``:

* ``NAME.png``: the label map, an indexed (palette) PNG whose pixel values are class indices and whose palette is
  the checkpoint's, so it opens in colour and reads back as labels;
* ``NAME_overlay.png``: the image with the colour map blended over it (``--alpha``).

Never overwrite: when any output already exists the command stops before predicting anything and names it, unless
``--overwrite``. An unreadable image is reported on one line and skipped; the others are still written, and the
command then exits 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from segkd.checkpoint import atomic_write
from segkd.data.datasets import IMAGE_EXTS, read_image
from segkd.data.transforms import build_eval_transform
from segkd.engine.evaluate import InferenceOptions, prepare_inference, progress_steps
from segkd.engine.visualize import colorize, overlay, save_png
from segkd.errors import SegkdError
from segkd.models.base import upsample_logits
from segkd.options import option


@dataclass
class PredictConfig(InferenceOptions):
    """Options of ``segkd predict`` beyond the inference options it shares with ``segkd eval``."""

    overwrite: bool = option(False, "Replace existing outputs (by default the command refuses before predicting "
                             "if any NAME.png or NAME_overlay.png is already in --out).")
    overlay: bool = option(True, "Also write NAME_overlay.png (the image with the colour map blended over it).")
    alpha: float = option(0.5, "Weight of the colour map in the overlay (0-1).")

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.alpha <= 1.0:
            raise SegkdError(f"--alpha must be in [0, 1], got {self.alpha}")


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files given directly or found in given folders (not recursive, sorted); one-line errors for a missing
    path, a file that is not an image, an empty folder or two images that would write the same outputs."""

    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
            if not images:
                raise SegkdError(f"{path}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
            found += images
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTS:
                raise SegkdError(f"{path}: not an image file (expected {', '.join(IMAGE_EXTS)})")
            found.append(path)
        else:
            raise SegkdError(f"{path}: no such file or folder")
    stems: dict[str, Path] = {}
    for p in found:
        if p.stem in stems and stems[p.stem] != p:
            raise SegkdError(f"{p} and {stems[p.stem]} would both write {p.stem}.png; predict them into different "
                             "--out folders")
        stems[p.stem] = p
    return list(dict.fromkeys(found))


def output_paths(out_dir: Path, image: Path, overlay: bool) -> list[Path]:
    return [out_dir / f"{image.stem}.png"] + ([out_dir / f"{image.stem}_overlay.png"] if overlay else [])


def check_outputs(out_dir: Path, images: list[Path], cfg: PredictConfig) -> None:
    """The never-overwrite rule, checked for every image before any prediction."""
    if cfg.overwrite:
        return
    taken = [p for image in images for p in output_paths(out_dir, image, cfg.overlay) if p.exists()]
    if taken:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise SegkdError(f"{taken[0]} exists{more}: segkd predict never overwrites; pass --overwrite or choose "
                         "another --out")


def preprocess_image(rgb: np.ndarray, meta: Any, resize: tuple[int, int] | None = None) -> Tensor:
    """One ``H x W x 3`` uint8 RGB image as the model takes it: ``1 x 3 x h x w`` float32, resized (bilinear) to
    ``resize`` when given and normalised with the checkpoint's ``meta.mean``/``meta.std`` (the eval transform)."""

    transform = build_eval_transform(resize=resize, mean=list(meta.mean), std=list(meta.std), resize_labels=False)
    image, _ = transform(rgb, np.zeros(rgb.shape[:2], dtype=np.uint8))
    return image[None]


def save_label_png(path: Path, labels: np.ndarray, palette: Sequence[Sequence[int]]) -> Path:
    """An indexed PNG: pixel values = class indices, the checkpoint's palette attached; written atomically."""


    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [int(c) for colour in palette for c in colour][:768]
    img.putpalette(flat + [0] * (768 - len(flat)))
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def predict_one(predict: Callable[[Tensor], Tensor], rgb: np.ndarray, meta: Any, resize: tuple[int, int] | None,
                device: torch.device) -> np.ndarray:
    """The ``H x W`` label map of one image at its own size (scores upsampled before the argmax)."""

    scores = predict(preprocess_image(rgb, meta, resize).to(device))
    return upsample_logits(scores.float(), rgb.shape[:2]).argmax(1)[0].cpu().numpy()


def _write_outputs(out_dir: Path, image: Path, rgb: np.ndarray, labels: np.ndarray, meta: Any,
                   cfg: PredictConfig) -> None:

    save_label_png(out_dir / f"{image.stem}.png", labels, meta.palette)
    if cfg.overlay:
        colour = colorize(labels, meta.palette, ignore_index=None)
        save_png(out_dir / f"{image.stem}_overlay.png", overlay(rgb, colour, cfg.alpha))


def run_predict(source: str | Path, inputs: Sequence[str | Path], out_dir: str | Path,
                cfg: PredictConfig | None = None, note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Everything ``segkd predict`` does; returns ``{"written": [...], "failed": {path: reason}, ...}``."""

    cfg = cfg or PredictConfig()
    cfg.check()
    out_dir = Path(out_dir)
    images = list_images(inputs)
    check_outputs(out_dir, images, cfg)
    setup = prepare_inference(source, cfg, None)
    if note is not None and setup.size.from_checkpoint:
        note(setup.size.note)
    written: list[str] = []
    failed: dict[str, str] = {}
    with progress_steps(cfg.progress, len(images), "predict") as advance:
        for image in images:
            try:
                rgb = read_image(image)
            except SegkdError as e:
                failed[str(image)] = str(e)
                if note is not None:
                    note(f"skipped {e}")
                advance()
                continue
            labels = predict_one(setup.predict, rgb, setup.meta, setup.size.resize, setup.device)
            _write_outputs(out_dir, image, rgb, labels, setup.meta, cfg)
            written.append(str(out_dir / f"{image.stem}.png"))
            advance()
    return {"source": str(source), "out": str(out_dir), "images": len(images), "written": written,
            "failed": failed, "input_size": setup.size.note, "resize": list(setup.size.resize) if setup.size.resize
            else None, "mode": cfg.mode, "flip": cfg.flip, "scales": cfg.scales}
