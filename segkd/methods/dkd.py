"""Decoupled KD (Zhao et al., CVPR 2022) applied per pixel, on labelled pixels only.

With the GT class ``y`` of a pixel and ``p = softmax(z / T)``: ``b = [p_y, sum_{c != y} p_c]`` (the non-target
mass is summed, not ``1 - p_y``, for stability), ``TCKD = KL(b^T || b^S) T^2``, ``NCKD = KL(p^T_hat || p^S_hat) T^2``
where ``p_hat`` is the softmax over the non-target classes (target logit pushed down by 1000, as mdistiller does).
``L_dkd = alpha TCKD + beta NCKD``, averaged over valid pixels (mdistiller's batchmean, one sample = one pixel).
Defaults alpha 1, beta 8, T 4 are DKD's published setting; mdistiller's epoch warm-up of the DKD weight is not
used (segkd schedules are iteration-based and a teacher-driven loss is stable from the first step here).
Objective: ``CE + dkd``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from segkd.engine.losses import seg_cross_entropy
from segkd.methods.base import (
    Method,
    align_logits,
    check_positive,
    check_temperature,
    distill_labels,
    register_method,
    valid_mask,
)
from segkd.models import SegModel, SegOutput

EPS = 1e-8


def valid_pixels(student: Tensor, other: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten ``B x K x H x W`` logits to ``N x K`` rows of labelled pixels (void removed before any gather)."""
    k = student.shape[1]
    mask = valid_mask(labels, ignore_index).reshape(-1)
    s = student.permute(0, 2, 3, 1).reshape(-1, k)[mask]
    t = other.permute(0, 2, 3, 1).reshape(-1, k)[mask]
    return s.float(), t.float(), labels.reshape(-1)[mask].long()


def binary_probs(logits: Tensor, target: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(N x K logits, N targets)`` -> ``N x 2`` ``[p_target, sum of non-target p]`` and the ``N x K`` probs."""
    p = F.softmax(logits / temperature, dim=1)
    onehot = F.one_hot(target, logits.shape[1]).to(p.dtype)
    pt = (p * onehot).sum(1)
    pnt = (p * (1 - onehot)).sum(1)
    return torch.stack([pt, pnt], dim=1), p


def nckd_rows(s: Tensor, t: Tensor, target: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row KL between the non-target distributions (target logit masked with -1000), times ``T^2``."""
    gt = F.one_hot(target, s.shape[1]).to(s.dtype)
    log_s = F.log_softmax(s / temperature - 1000.0 * gt, dim=1)
    log_t = F.log_softmax(t / temperature - 1000.0 * gt, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1) * temperature**2


def dkd_rows(s: Tensor, t: Tensor, target: Tensor, alpha: float, beta: float, temperature: float) -> tuple[Tensor,
                                                                                                         Tensor]:
    """Per-row TCKD and NCKD (unweighted, each times ``T^2``)."""
    bs, _ = binary_probs(s, target, temperature)
    bt, _ = binary_probs(t, target, temperature)
    tckd = (bt * (bt.clamp_min(EPS).log() - bs.clamp_min(EPS).log())).sum(1) * temperature**2
    return tckd, nckd_rows(s, t, target, temperature)


def dkd_loss(student: Tensor, teacher: Tensor, labels: Tensor, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0, ignore_index: int = 255) -> Tensor:
    """Pixel-wise DKD over labelled pixels (0 with a gradient path when none is labelled)."""
    s, t, y = valid_pixels(student, teacher, labels, ignore_index)
    if y.numel() == 0:
        return student.sum() * 0.0
    tckd, nckd = dkd_rows(s, t, y, alpha, beta, temperature)
    return (alpha * tckd + beta * nckd).mean()


@dataclass
class DKDOptions:
    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    weight: float = 1.0
    ce_weight: float = 1.0
    align: Literal["label", "student"] = "label"

    def check(self) -> None:
        check_positive(self, "alpha", "beta", "weight", "ce_weight")
        check_temperature(self, "temperature")


class DKD(Method):

    def forward(self, images: Tensor, labels: Tensor, outs: dict[str, SegOutput],
                kd_labels: Tensor | None = None) -> dict[str, Tensor]:
        o = self.opts
        zs, zt, lab = align_logits(outs["student"].logits, outs["teacher"].logits, distill_labels(labels, kd_labels),
                                   o.align)
        return self.record({
            "ce": (o.ce_weight, seg_cross_entropy(outs["student"].logits, labels, self.ignore_index)),
            "dkd": (o.weight, dkd_loss(zs, zt, lab, o.alpha, o.beta, o.temperature, self.ignore_index)),
        })


@register_method("dkd", "pixel-wise decoupled KD (TCKD + NCKD) on labelled pixels", DKDOptions)
def _build(opts: DKDOptions, student: SegModel, teacher: SegModel, ignore_index: int = 255) -> DKD:
    return DKD(opts, ignore_index)

