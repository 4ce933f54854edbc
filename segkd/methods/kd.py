"""Pixel-wise KD (Hinton et al.), in the CIRKD convention.

``L_kd = T^2 * mean_pixels sum_k pT_k (log pT_k - log pS_k)`` with ``p = softmax(z / T)`` over classes; the mean
is over all pixels (CIRKD flattens to ``(B*H*W) x K`` and uses ``kl_div(reduction='batchmean')``). CIRKD does not
mask void pixels; ``mask_ignore=True`` averages over labelled pixels only. Objective: ``CE + weight * L_kd``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from segkd.engine.losses import seg_cross_entropy, seg_nll
from segkd.methods.base import (
    Method,
    align_logits,
    ce_input,
    check_positive,
    check_temperature,
    distill_labels,
    register_method,
    valid_mask,
)
from segkd.models import SegModel, SegOutput


def pixel_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0, log_student: Tensor | None = None) -> Tensor:
    """Per-pixel ``KL(softmax(t/T) || softmax(s/T))`` over the class axis: ``B x K x H x W`` -> ``B x H x W``.
    At ``T = 1`` the division is skipped (``x / 1`` is ``x`` exactly, forward and backward): two full passes over
    the label-size logits less per step. ``log_student``: ``log_softmax(student / T)`` when the caller has it
    already (KD at ``T = 1`` shares it with the CE term: one ``log_softmax`` forward and backward less)."""
    scale = (lambda z: z) if temperature == 1 else (lambda z: z / temperature)
    log_s = F.log_softmax(scale(student.float()), dim=1) if log_student is None else log_student
    log_t = F.log_softmax(scale(teacher.float()), dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1)


def kd_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0, mask: Tensor | None = None,
            log_student: Tensor | None = None) -> Tensor:
    """``T^2`` times the per-pixel KL averaged over pixels (all of them, or those where ``mask`` is true)."""
    kl = pixel_kl(student, teacher, temperature, log_student)
    if mask is None:
        return kl.mean() * temperature**2
    n = mask.sum()
    return (kl * mask).sum() / n.clamp(min=1) * temperature**2


@dataclass
class KDOptions:
    """``temperature`` 1 and ``weight`` 1 as in CIRKD; ``ce_weight`` 1 (the student keeps its CE)."""

    temperature: float = 1.0
    weight: float = 1.0
    ce_weight: float = 1.0
    mask_ignore: bool = False
    align: Literal["label", "student"] = "label"

    def check(self) -> None:
        check_positive(self, "weight", "ce_weight")
        check_temperature(self, "temperature")


class KD(Method):

    def forward(self, images: Tensor, labels: Tensor, outs: dict[str, SegOutput],
                kd_labels: Tensor | None = None) -> dict[str, Tensor]:
        o = self.opts
        zs, zt, lab = align_logits(outs["student"].logits, outs["teacher"].logits, distill_labels(labels, kd_labels),
                                   o.align)
        mask = valid_mask(lab, self.ignore_index) if o.mask_ignore else None
        if o.temperature == 1 and o.align == "label":  # CE and KD read the same log-probabilities: computed once
            log_s = F.log_softmax(zs.float(), dim=1)
            ce, kd = seg_nll(log_s, labels, self.ignore_index), kd_loss(zs, zt, 1.0, mask, log_student=log_s)
        else:
            ce = seg_cross_entropy(ce_input(outs["student"].logits, zs, o.align), labels, self.ignore_index)
            kd = kd_loss(zs, zt, o.temperature, mask)
        return self.record({"ce": (o.ce_weight, ce), "kd": (o.weight, kd)}, student=zs, teacher=zt)


@register_method("kd", "pixel-wise KD with temperature (CIRKD convention)", KDOptions)
def _build(opts: KDOptions, student: SegModel, teacher: SegModel, ignore_index: int = 255) -> KD:
    return KD(opts, ignore_index)

