"""Channel-wise distillation (Shu et al., ICCV 2021), in the CIRKD convention.

Each channel's map is turned into a distribution over spatial positions, ``phi(x)_c = softmax_i(x_{c,i} / T)``;
``L_cwd = T^2 / (B*C) * sum_{b,c} sum_i phi(t)_{c,i} (log phi(t)_{c,i} - log phi(s)_{c,i})``. On logits
(``weight`` 3, T 4 as in CIRKD), optionally also on features (``feat_weight`` 50): the student's deepest feature
(``deep`` tap: MiT ``stage4`` / ResNet ``layer4``) goes through a training-only 1x1 conv (+BN, CIRKD's connector
shape) to the teacher's channels and is resized bilinearly to the teacher's grid. Objective: ``CE + terms``.

Choice: the logits are aligned as every method does (label size by default, see ``segkd.methods.base``); the
spatial softmax then runs over the label grid. CIRKD compares both at stride 8 because its pairs share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from segkd.engine.losses import seg_cross_entropy
from segkd.methods.base import (
    Method,
    align_logits,
    ce_input,
    check_positive,
    check_temperature,
    register_method,
    resize_to,
    resolve_tap,
)
from segkd.models import SegModel, SegOutput


def cwd_loss(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """Channel-wise KL of spatial softmaxes, ``T^2 / (B*C)`` normalisation. Inputs ``B x C x H x W`` (same size)."""
    b, c = student.shape[:2]
    s = student.float().reshape(b, c, -1) / temperature
    t = teacher.float().reshape(b, c, -1) / temperature
    log_s, log_t = F.log_softmax(s, dim=2), F.log_softmax(t, dim=2)
    return (log_t.exp() * (log_t - log_s)).sum() * temperature**2 / (b * c)


@dataclass
class CWDOptions:
    temperature: float = 4.0
    weight: float = 3.0
    feature: bool = False
    feat_weight: float = 50.0
    feat_temperature: float = 4.0
    ce_weight: float = 1.0
    align: Literal["label", "student"] = "label"

    def check(self) -> None:
        check_positive(self, "weight", "feat_weight", "ce_weight")
        check_temperature(self, "temperature", "feat_temperature")


class CWD(Method):
    def __init__(self, opts: CWDOptions, student: SegModel, teacher: SegModel, ignore_index: int = 255) -> None:
        super().__init__(opts, ignore_index)
        if opts.feature:  # the taps exist only when read: a logits-only cwd runs on a teacher without taps (ONNX)
            self.s_tap, self.t_tap = resolve_tap(student, "deep"), resolve_tap(teacher, "deep")
            cs, ct = student.feature_spec(self.s_tap).channels, teacher.feature_spec(self.t_tap).channels
            self.connector = nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))

    def forward(self, images: Tensor, labels: Tensor, outs: dict[str, SegOutput],
                kd_labels: Tensor | None = None) -> dict[str, Tensor]:
        o = self.opts
        zs, zt, _ = align_logits(outs["student"].logits, outs["teacher"].logits, labels, o.align)
        terms = {
            "ce": (o.ce_weight, seg_cross_entropy(ce_input(outs["student"].logits, zs, o.align), labels,
                                                  self.ignore_index)),
            "cwd": (o.weight, cwd_loss(zs, zt, o.temperature)),
        }
        if o.feature:
            ft = outs["teacher"].tap(self.t_tap)
            fs = resize_to(self.connector(outs["student"].tap(self.s_tap)), ft.shape[-2:])
            terms["cwd_feat"] = (o.feat_weight, cwd_loss(fs, ft, o.feat_temperature))
        return self.record(terms, student=zs, teacher=zt)


@register_method("cwd", "channel-wise distillation on logits (T=4, x3), optionally features (x50)", CWDOptions,
                 taps={"student": ("deep",), "teacher": ("deep",)}, taps_when=lambda o: o.feature,
                 unused_params=lambda o, b: o.feature and (o.feat_weight == 0 or o.weight == o.ce_weight == 0))
def _build(opts: CWDOptions, student: SegModel, teacher: SegModel, ignore_index: int = 255) -> CWD:
    return CWD(opts, student, teacher, ignore_index)

