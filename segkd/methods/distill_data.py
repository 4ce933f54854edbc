"""The training data of a distillation run: the student's crop, plus what the teacher needs to answer for it.

:class:`DistillDataset` wraps the labelled training split (and, with ``--unlabeled DIR``, a folder of images
without labels). Items are ``(student image, labels, extras)`` (extras written by
:func:`~segkd.engine.batch.item_extras`, read back as a :class:`~segkd.engine.batch.Batch`); they carry

* ``teacher_images`` (``--teacher-view clean``, the default, with jitter on): the student's crop with the *same*
  geometry (rescale, crop, flip, padding) but without photometric jitter. The teacher never saw jittered images in
  its own training; the student still gets its augmentation. ``--teacher-view same`` hands the teacher the
  student's jittered tensor (segkd < 0.2 behaviour) and adds no extra.
* ``teacher_stored`` (``--teacher-cache DIR``; :class:`~segkd.engine.batch.StoredTargets`): the cached whole-image
  teacher outputs as stored (fp16 logits or the top-K form, taps) and the crop's geometry; the task warps the batch
  onto its crops on the training device (:func:`~segkd.methods.teacher_cache.warp_stored`), so the workers only read
  compact tensors. No teacher forward at train time.
* ``labeled`` (bool per image) and ``inside`` (the crop's real pixels) with ``--unlabeled``: unlabelled images
  come with void labels, so every cross-entropy term skips them, and the task fills in the teacher's argmax as
  the class the distillation terms decouple on (DKD/PDD need one per pixel). Each labelled image brings
  ``--unlabeled-ratio`` unlabelled ones into its batch (see :class:`DistillDataset`).

The random draws of an item are those of the plain dataset (seeded by ``(seed, epoch, index)``), so the student's
crops are bit-identical to a run without teacher view or cache: KD rows stay paired with the row trained alone.
Unlabelled images draw from their own stream (``(seed, epoch, index, 1)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from segkd.data.datasets import IMAGE_EXTS, DatasetInfo, SegDataset, item_rng, read_image
from segkd.data.transforms import join_extras
from segkd.engine.batch import item_extras
from segkd.errors import SegkdError
from segkd.methods.teacher_cache import CacheImage, TeacherCache, image_sha256, inside_mask, stored_item
from segkd.models.base import upsample_logits

TEACHER_VIEWS = ("clean", "same")


class UnlabeledImages(Dataset):
    """Every image file in a folder (sorted, non-recursive); anything else in it is refused by name."""

    def __init__(self, root: str | Path, info: DatasetInfo, transform: Any, seed: int = 0) -> None:
        root = Path(root)
        if not root.is_dir():
            raise SegkdError(f"--unlabeled {root}: folder not found")
        self.paths: list[Path] = []
        for p in sorted(root.iterdir()):
            if p.name.startswith("."):
                continue  # hidden files (.DS_Store, editor swap files) are not data
            if p.is_dir():
                raise SegkdError(f"--unlabeled {p}: a sub-folder; the folder must hold image files only")
            if p.suffix.lower() not in IMAGE_EXTS:
                raise SegkdError(f"--unlabeled {p}: not an image file (expected {', '.join(IMAGE_EXTS)})")
            self.paths.append(p)
        if not self.paths:
            raise SegkdError(f"--unlabeled {root}: no image files")
        self.info, self.transform, self.seed, self.epoch = info, transform, seed, 0

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The image and an all-zero label (class 0 inside the image): after augmentation, padding is the only
        void, which tells the real pixels apart; the labels themselves are then replaced by void."""
        img = read_image(self.paths[index])
        return img, np.zeros(img.shape[:2], np.int64)

    def validate(self) -> None:
        """Open every image once (fails on the first unreadable file, naming it)."""
        for p in self.paths:
            read_image(p)


class DistillDataset(Dataset):
    """Labelled (+ unlabelled) training images with the extras of the module docstring.

    With unlabelled images an item is a *group*: the labelled crop plus ``unlabeled_ratio`` unlabelled crops
    (``1 + ratio`` images, concatenated along the batch by :func:`~segkd.data.transforms.collate_pairs`). So every
    step keeps ``--batch`` labelled images, as the student trained alone has, and adds ``ratio x --batch``
    unlabelled ones (the usual semi-supervised batch); the epoch is the labelled set. Unlabelled images are drawn
    from a seeded permutation per epoch, so they cycle through the folder whatever its size."""

    def __init__(self, labeled: SegDataset, unlabeled: UnlabeledImages | None = None, teacher_view: str = "clean",
                 cache: TeacherCache | None = None, taps: list[str] | None = None, unlabeled_ratio: int = 1) -> None:
        if teacher_view not in TEACHER_VIEWS:
            raise SegkdError(f"--teacher-view must be one of {', '.join(TEACHER_VIEWS)}, got {teacher_view!r}")
        if not hasattr(labeled.transform, "apply"):
            raise SegkdError("a distillation dataset needs segkd's training transform (random crop/flip/jitter)")
        if unlabeled_ratio < 1:
            raise SegkdError(f"--unlabeled-ratio must be >= 1, got {unlabeled_ratio}")
        self.labeled, self.unlabeled, self.teacher_view, self.cache = labeled, unlabeled, teacher_view, cache
        self.taps = taps  # the cached taps the method reads (None: every tap in the cache)
        self.ratio = unlabeled_ratio
        self.info = labeled.info
        self.transform = labeled.transform
        self.seed = labeled.seed
        self._sha: dict[tuple[bool, int], str] = {}
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labeled)

    def set_epoch(self, epoch: int) -> None:
        self.labeled.set_epoch(epoch)
        if self.unlabeled is not None:
            self.unlabeled.set_epoch(epoch)

    def _path(self, is_lab: bool, j: int) -> Path:
        return self.labeled.pairs[j][0] if is_lab else self.unlabeled.paths[j]  # type: ignore[union-attr]

    def _sha_of(self, is_lab: bool, j: int) -> str:
        """sha256 of an image file (the cache key), computed once."""
        if (is_lab, j) not in self._sha:
            self._sha[(is_lab, j)] = image_sha256(self._path(is_lab, j))
        return self._sha[(is_lab, j)]

    def sha(self, index: int) -> str:
        """sha256 of labelled item ``index``'s image."""
        return self._sha_of(True, index)

    def cache_images(self) -> list[CacheImage]:
        """Every image of the run, labelled then unlabelled, as the teacher cache sees it (hash, name, loader)."""
        sources = [(True, j) for j in range(len(self.labeled))]
        sources += [(False, j) for j in range(len(self.unlabeled))] if self.unlabeled is not None else []
        return [CacheImage(self._sha_of(lab, j), self._path(lab, j).name,
                           _Loader(self.labeled if lab else self.unlabeled, j)) for lab, j in sources]

    def unlabeled_index(self, index: int, k: int) -> int:
        """The k-th unlabelled partner of labelled item ``index`` this epoch (a seeded per-epoch permutation)."""
        assert self.unlabeled is not None
        epoch = self.unlabeled.epoch
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, item_rng(self.seed, epoch, 0, 2).permutation(len(self.unlabeled)))
        return int(self._perm[1][(index * self.ratio + k) % len(self.unlabeled)])

    def _one(self, is_lab: bool, j: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
        ds = self.labeled if is_lab else self.unlabeled
        img, lab = ds.load(j)  # type: ignore[union-attr]
        rng = item_rng(ds.seed, ds.epoch, j, 0 if is_lab else 1)  # type: ignore[union-attr]
        clean = self.cache is None and self.teacher_view == "clean"
        x, y, geom, tx = self.transform.apply(img, lab, rng, clean=clean)
        stored = stored_item(self.cache, self._sha_of(is_lab, j), geom, self.taps) if self.cache else None
        # the crop's real pixels (padding has no teacher output), with the cache or unlabelled images
        inside = inside_mask(geom) if self.cache is not None or self.unlabeled is not None else None
        labeled = torch.tensor(is_lab) if self.unlabeled is not None else None
        if self.unlabeled is not None and not is_lab:
            y = torch.full_like(y, self.info.ignore_index)
        extras = item_extras(None, tx if clean else None, inside, labeled, stored)  # type: ignore[arg-type]
        return x, y, extras

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
        item = self._one(True, index)
        if self.unlabeled is None:
            return item
        group = [item] + [self._one(False, self.unlabeled_index(index, k)) for k in range(self.ratio)]
        return (torch.stack([g[0] for g in group]), torch.stack([g[1] for g in group]),
                join_extras([g[2] for g in group]))


class _Loader:
    """A picklable ``() -> image`` for one item (the cache build reads images through it)."""

    def __init__(self, ds: Any, index: int) -> None:
        self.ds, self.index = ds, index

    def __call__(self) -> np.ndarray:
        return self.ds.load(self.index)[0]


def pseudo_labels(labels: Tensor, teacher_logits: Tensor, labeled: Tensor, inside: Tensor,
                  ignore_index: int) -> Tensor:
    """Labels for the distillation terms: the ground truth on labelled images, the teacher's argmax (at the label
    size) on the real pixels of unlabelled ones, void on their padding."""
    if bool(labeled.all()):
        return labels
    arg = upsample_logits(teacher_logits.detach().float(), labels.shape[-2:]).argmax(1)
    arg = torch.where(inside, arg, torch.full_like(arg, ignore_index))
    return torch.where(labeled.view(-1, 1, 1), labels, arg)
