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

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from segkd.engine.losses import seg_cross_entropy
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

EPS = 1e-8
LOG_EPS = math.log(EPS)


def valid_pixels(student: Tensor, other: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten ``B x K x H x W`` logits to ``N x K`` rows of labelled pixels (void removed before any gather)."""
    k = student.shape[1]
    mask = valid_mask(labels, ignore_index).reshape(-1)
    s = student.permute(0, 2, 3, 1).reshape(-1, k)[mask]
    t = other.permute(0, 2, 3, 1).reshape(-1, k)[mask]
    return s.float(), t.float(), labels.reshape(-1)[mask].long()


def binary_probs(logits: Tensor, target: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(N x K logits, N targets)`` -> ``N x 2`` ``[p_target, sum of non-target p]`` and the ``N x K`` probs."""
    return binary_onehot(logits, F.one_hot(target, logits.shape[1]), temperature)


def binary_onehot(logits: Tensor, onehot: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """:func:`binary_probs` with the target as a one-hot of the logits' shape, class axis 1 (rows or maps)."""
    return _binary(logits / temperature, onehot.to(logits.dtype))


def _binary(scaled: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    p = F.softmax(scaled, dim=1)
    pt = (p * gt).sum(1)
    pnt = (p * (1 - gt)).sum(1)
    return torch.stack([pt, pnt], dim=1), p


def nckd_rows(s: Tensor, t: Tensor, target: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row KL between the non-target distributions (target logit masked with -1000), times ``T^2``."""
    gt = F.one_hot(target, s.shape[1]).to(s.dtype)
    return _nckd(s / temperature, t / temperature, 1000.0 * gt, temperature)


def _nckd(scaled_s: Tensor, scaled_t: Tensor, mask: Tensor, temperature: float) -> Tensor:
    log_s = F.log_softmax(scaled_s - mask, dim=1)
    log_t = F.log_softmax(scaled_t - mask, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1) * temperature**2


def dkd_terms(s: Tensor, t: Tensor, onehot: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Per-pixel (or per-row) TCKD and NCKD, unweighted, each times ``T^2``; class axis 1. ``s / T``, ``t / T`` and
    the target mask are computed once for both terms (the values of computing them per term)."""
    gt = onehot.to(s.dtype)
    zs, zt = s / temperature, t / temperature
    bs, _ = _binary(zs, gt)
    bt, _ = _binary(zt, gt)
    tckd = (bt * (bt.clamp_min(EPS).log() - bs.clamp_min(EPS).log())).sum(1) * temperature**2
    return tckd, _nckd(zs, zt, 1000.0 * gt, temperature)


def dkd_rows(s: Tensor, t: Tensor, target: Tensor, alpha: float, beta: float, temperature: float) -> tuple[Tensor,
                                                                                                         Tensor]:
    """Per-row TCKD and NCKD (unweighted, each times ``T^2``)."""
    return dkd_terms(s, t, F.one_hot(target, s.shape[1]), temperature)


def without_target(z: Tensor, idx: Tensor) -> Tensor:
    """``z`` (``B x K x H x W``) with each pixel's target logit (``idx``, ``B x 1 x H x W``) replaced by the largest
    other logit minus 80, with no gradient to it. In a log-sum-exp its share is then at most ``exp(-80)`` ~ 1.8e-35
    of the rest's: 0 to float32, as :func:`dkd_terms`'s push of 1000 makes it, while ``exp`` stays in its fast
    range. x86's vectorised ``exp`` leaves that range for inputs below about -87 (results that underflow): on a map
    where one class in eleven sits 1000 below the rest, ``exp``, ``logsumexp`` and the whole DKD loss ran several
    times slower on this project's CPU (2 x 11 x 180 x 240, one thread), for the same value and gradient (bit for
    bit on random CamVid-shaped maps: the target's share moves from 0 to below 1e-34; ``benchmarks/step_ratios.py``
    times the step before and after). With one class there are no others: the target is pushed 1000 down as
    before (DKD's terms are then 0 up to float32 rounding at that magnitude, and finite)."""
    if z.shape[1] == 1:
        return z - 1000.0
    with torch.no_grad():
        floor = z.scatter(1, idx, float("-inf")).amax(1, keepdim=True) - 80.0
    return z.scatter(1, idx, floor)


def dkd_maps(s: Tensor, t: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Per-pixel TCKD and NCKD on ``B x K x H x W`` maps (each times ``T^2``; ``target`` ``B x H x W`` class indices),
    the values of :func:`dkd_terms` from one log-sum-exp per network instead of two softmaxes and two log-softmaxes.

    With ``z = logits / T``, ``l = logsumexp(z)``, ``n = logsumexp`` over the non-target classes (the target logit
    taken out of the sum by :func:`without_target`, as :func:`dkd_terms` masks it): ``log b = [z_y - l, n - l]``
    (clamped at ``log EPS`` as :func:`dkd_terms` clamps ``b`` at ``EPS``), and with the teacher's non-target
    distribution ``q``, ``NCKD = sum_c q_c (zt_c - zs_c) - (n_t - n_s)`` (``sum q = 1``; the target's ``q`` is below
    ``exp(-80)``, 0 to float32). The teacher side runs without autograd. Against :func:`dkd_terms` in float64, the
    value agrees to ~2e-7 relative (as :func:`dkd_terms` in float32 does); the gradient to ~3e-7 of its largest
    entry at logits of a few units and ~7e-6 at logits of +-300 (float32 rounding of the two separately computed
    halves of ``softmax_s - q``; ``tests/test_methods.py``)."""
    idx = target.unsqueeze(1)
    zs, zt = s / temperature, t / temperature
    with torch.no_grad():
        t_rest = without_target(zt, idx)
        n_t = torch.logsumexp(t_rest, 1)
        zt_y = zt.gather(1, idx).squeeze(1)
        l_t = torch.logaddexp(zt_y, n_t)
        q = (t_rest - n_t.unsqueeze(1)).exp_()
        cross_t = (q * zt).sum(1)
    n_s = torch.logsumexp(without_target(zs, idx), 1)
    zs_y = zs.gather(1, idx).squeeze(1)
    l_s = torch.logaddexp(zs_y, n_s)
    bt_y, bt_n, bs_y, bs_n = zt_y - l_t, n_t - l_t, zs_y - l_s, n_s - l_s
    tckd = (bt_y.exp() * (bt_y.clamp_min(LOG_EPS) - bs_y.clamp_min(LOG_EPS))
            + bt_n.exp() * (bt_n.clamp_min(LOG_EPS) - bs_n.clamp_min(LOG_EPS)))
    nckd = cross_t - (q * zs).sum(1) - (n_t - n_s)
    return tckd * temperature**2, nckd * temperature**2


def dkd_loss(student: Tensor, teacher: Tensor, labels: Tensor, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0, ignore_index: int = 255) -> Tensor:
    """Pixel-wise DKD over labelled pixels (0 with a gradient path when none is labelled).

    Computed on the ``B x K x H x W`` maps (void pixels weighted 0, the sum divided by the labelled count) by
    :func:`dkd_maps` rather than on the ``N x K`` rows of the labelled pixels (:func:`dkd_rows`): the same per-pixel
    terms, but reductions over the class axis of a map vectorise across pixels, where a row softmax over K = 11
    classes does not. Equal to the row form within float32 rounding (``tests/test_methods.py`` checks value and
    gradient)."""
    valid = valid_mask(labels, ignore_index)
    n = valid.sum()
    if not bool(n > 0):
        return student.sum() * 0.0
    target = labels.clamp(0, student.shape[1] - 1).long()
    tckd, nckd = dkd_maps(student.float(), teacher.float(), target, temperature)
    return ((alpha * tckd + beta * nckd) * valid).sum() / n


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
            "ce": (o.ce_weight, seg_cross_entropy(ce_input(outs["student"].logits, zs, o.align), labels,
                                                  self.ignore_index)),
            "dkd": (o.weight, dkd_loss(zs, zt, lab, o.alpha, o.beta, o.temperature, self.ignore_index)),
        }, student=zs, teacher=zt)


@register_method("dkd", "pixel-wise decoupled KD (TCKD + NCKD) on labelled pixels", DKDOptions)
def _build(opts: DKDOptions, student: SegModel, teacher: SegModel, ignore_index: int = 255) -> DKD:
    return DKD(opts, ignore_index)

