"""What one training step gets from the data: :class:`Batch`, one typed object for every task.

A supervised step reads ``images`` and ``labels``; a distillation step may also get what the data brought for the
teacher (:mod:`segkd.methods.distill_data`): the teacher's targets from the cache, the clean teacher view, the
crop's real pixels and which images are labelled. ``Task.losses(batch)`` is the one signature.

Datasets hand these over per item as a plain dict of tensors (what ``DataLoader`` workers can pickle and
:func:`~segkd.data.transforms.collate_pairs` can stack); :func:`item_extras` writes that dict and
:meth:`Batch.from_loader` reads it back, so the keys are spelled here only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

_TAP = "tap."  # prefix of a cached teacher tap in an item's dict (a tap name is free text: keep it apart)


@dataclass
class TeacherTargets:
    """What the teacher says about a batch: its logits and the feature taps a method reads, by tap name.

    Built by :func:`segkd.methods.targets.teacher_targets` (a teacher forward: online, for the cache, for ``bench
    --train-step``) or warped from the cache per crop (:func:`segkd.methods.teacher_cache.cached_targets`)."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> TeacherTargets:
        return TeacherTargets(self.logits.to(device, non_blocking=non_blocking),
                              {k: v.to(device, non_blocking=non_blocking) for k, v in self.features.items()})


@dataclass
class Batch:
    """One (micro-)batch. ``teacher``: cached teacher targets (``--teacher-cache``; no teacher forward);
    ``teacher_images``: the teacher's clean view of the crops (``--teacher-view clean``); ``inside``: the crops'
    real pixels (``B x H x W`` bool, False on padding); ``labeled``: which images have labels (``--unlabeled``)."""

    images: Tensor
    labels: Tensor
    teacher: TeacherTargets | None = None
    teacher_images: Tensor | None = None
    inside: Tensor | None = None
    labeled: Tensor | None = None

    @classmethod
    def from_loader(cls, collated: tuple[Any, ...]) -> Batch:
        """A batch from what the loader yields: ``(images, labels)`` or ``(images, labels, extras)``."""
        images, labels = collated[0], collated[1]
        extras: dict[str, Tensor] = collated[2] if len(collated) > 2 else {}
        teacher = None
        if "teacher_logits" in extras:
            teacher = TeacherTargets(extras["teacher_logits"],
                                     {k[len(_TAP):]: v for k, v in extras.items() if k.startswith(_TAP)})
        return cls(images, labels, teacher, extras.get("teacher_images"), extras.get("inside"), extras.get("labeled"))

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
                inside: Tensor | None = None, labeled: Tensor | None = None) -> dict[str, Tensor]:
    """The dict a dataset item carries for :meth:`Batch.from_loader` (only what is given)."""
    out: dict[str, Tensor] = {}
    if teacher is not None:
        out["teacher_logits"] = teacher.logits
        out.update({_TAP + k: v for k, v in teacher.features.items()})
    for name, value in (("teacher_images", teacher_images), ("inside", inside), ("labeled", labeled)):
        if value is not None:
            out[name] = value
    return out
