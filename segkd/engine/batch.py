"""What one training step gets from the data: :class:`Batch`, one typed object for every task.

A supervised step reads ``images`` and ``labels``; a distillation step may also get what the data brought for the
teacher (:mod:`segkd.methods.distill_data`): the teacher's targets from the cache, the clean teacher view, the
crop's real pixels and which images are labelled. ``Task.losses(batch)`` is the one signature.

Datasets hand these over per item as a plain dict of tensors (what ``DataLoader`` workers can pickle and
:func:`~segkd.data.transforms.collate_pairs` can stack); :func:`item_extras` writes that dict and
:meth:`Batch.from_loader` reads it back, so the keys are spelled here only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

_TAP = "tap."  # prefix of a cached teacher tap in an item's dict (a tap name is free text: keep it apart)
_STORED = "teacher_stored"  # an item's StoredTargets (joined by collate_pairs through StoredTargets.join)


@dataclass
class TeacherTargets:
    """What the teacher says about a batch: its logits and the feature taps a method reads, by tap name.

    Built by :func:`segkd.methods.targets.teacher_targets` (a teacher forward: online, for the cache, for ``bench
    --train-step``) or warped from the cache's :class:`StoredTargets`
    (:func:`segkd.methods.teacher_cache.warp_stored`)."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> TeacherTargets:
        return TeacherTargets(self.logits.to(device, non_blocking=non_blocking),
                              {k: v.to(device, non_blocking=non_blocking) for k, v in self.features.items()})


@dataclass
class StoredTargets:
    """The teacher cache's entries for a batch of crops, as stored, with what the warp needs; the task warps them
    on the training device (:func:`segkd.methods.teacher_cache.warp_stored`), one ``grid_sample`` per tensor kind.

    ``maps``: stored name -> ``B x C x h x w`` as the shard holds it (``logits``, or the top-K triple
    ``logits_top``/``logits_top_index``/``logits_rest``; taps; fp16, or fp32 with ``--cache-dtype float32``), each
    image's map edge-padded to the batch's
    largest ``h x w`` (:meth:`join`); ``sizes``: stored name -> ``B x 2`` int64, each image's own ``h, w``;
    ``geometry``: ``B x 11`` int64 rows of each crop's :class:`~segkd.data.transforms.Geometry`
    (:func:`~segkd.methods.teacher_cache.geometry_row`); ``strides``: target name (``logits``, taps) -> stride of the
    crop grid it is warped onto (1 for logits: the label grid; a tap's own stride); ``topk``: classes stored per cell
    (0: full logits) of ``num_classes``.

    Why edge padding: images of different sizes have stored maps of different sizes. Padding each map by repeating
    its last row and column makes a sample at any position past the edge equal to the edge value, which is exactly
    what ``grid_sample``'s ``padding_mode="border"`` gives on the unpadded map; the warp rescales the sampling grid
    of a padded image by ``h / H``, so one batched ``grid_sample`` serves images of any size."""

    maps: dict[str, Tensor]
    sizes: dict[str, Tensor]
    geometry: Tensor
    strides: dict[str, int]
    num_classes: int
    topk: int = 0

    def _apply(self, fn: Any) -> StoredTargets:
        return replace(self, maps={k: fn(v) for k, v in self.maps.items()},
                       sizes={k: fn(v) for k, v in self.sizes.items()}, geometry=fn(self.geometry))

    def to(self, device: torch.device | str, non_blocking: bool = True) -> StoredTargets:
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> StoredTargets:
        """Page-locked copies (the DataLoader calls this with ``pin_memory=True``)."""
        return self._apply(lambda t: t.pin_memory())

    @staticmethod
    def join(parts: Sequence[StoredTargets]) -> StoredTargets:
        """The parts concatenated along the batch, every map edge-padded to the largest ``h x w`` (class docstring)."""
        first = parts[0]
        maps = {}
        for name in first.maps:
            h = max(int(p.maps[name].shape[-2]) for p in parts)
            w = max(int(p.maps[name].shape[-1]) for p in parts)
            maps[name] = torch.cat([edge_pad(p.maps[name], h, w) for p in parts])
        return replace(first, maps=maps, sizes={k: torch.cat([p.sizes[k] for p in parts]) for k in first.sizes},
                       geometry=torch.cat([p.geometry for p in parts]))


def edge_pad(t: Tensor, h: int, w: int) -> Tensor:
    """``t`` (``... x h0 x w0``, any dtype) grown to ``h x w`` by repeating its last row and column."""
    h0, w0 = t.shape[-2:]
    if (h0, w0) == (h, w):
        return t
    rows = torch.arange(h, device=t.device).clamp_(max=h0 - 1)
    cols = torch.arange(w, device=t.device).clamp_(max=w0 - 1)
    return t[..., rows[:, None], cols[None, :]]


@dataclass
class Batch:
    """One (micro-)batch. ``stored``: the teacher cache's stored maps and crop geometries (``--teacher-cache``; no
    teacher forward: the task warps them); ``teacher``: ready teacher targets (the Python API, tests);
    ``teacher_images``: the teacher's clean view of the crops (``--teacher-view clean``); ``inside``: the crops'
    real pixels (``B x H x W`` bool, False on padding); ``labeled``: which images have labels (``--unlabeled``)."""

    images: Tensor
    labels: Tensor
    teacher: TeacherTargets | None = None
    teacher_images: Tensor | None = None
    inside: Tensor | None = None
    labeled: Tensor | None = None
    stored: StoredTargets | None = None

    @classmethod
    def from_loader(cls, collated: tuple[Any, ...]) -> Batch:
        """A batch from what the loader yields: ``(images, labels)`` or ``(images, labels, extras)``."""
        images, labels = collated[0], collated[1]
        extras: dict[str, Tensor] = collated[2] if len(collated) > 2 else {}
        teacher = None
        if "teacher_logits" in extras:
            teacher = TeacherTargets(extras["teacher_logits"],
                                     {k[len(_TAP):]: v for k, v in extras.items() if k.startswith(_TAP)})
        return cls(images, labels, teacher, extras.get("teacher_images"), extras.get("inside"), extras.get("labeled"),
                   extras.get(_STORED))

    def to(self, device: torch.device | str, channels_last: bool = False) -> Batch:
        """Every tensor on ``device`` (images in channels_last when asked)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if value is not None:
                moved[name] = value.to(device, non_blocking=True)
        if channels_last:
            moved["images"] = moved["images"].contiguous(memory_format=torch.channels_last)
        return replace(self, **moved)


def item_extras(teacher: TeacherTargets | None = None, teacher_images: Tensor | None = None,
                inside: Tensor | None = None, labeled: Tensor | None = None,
                stored: StoredTargets | None = None) -> dict[str, Any]:
    """The dict a dataset item carries for :meth:`Batch.from_loader` (only what is given)."""
    out: dict[str, Any] = {}
    if teacher is not None:
        out["teacher_logits"] = teacher.logits
        out.update({_TAP + k: v for k, v in teacher.features.items()})
    for name, value in (("teacher_images", teacher_images), ("inside", inside), ("labeled", labeled),
                        (_STORED, stored)):
        if value is not None:
            out[name] = value
    return out
