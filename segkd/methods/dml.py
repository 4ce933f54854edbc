"""Deep mutual learning (Zhang et al., CVPR 2018) per pixel: the online-KD baseline for ``collab``.

Each student adds ``KL(sg(p_other) || p_self) * T^2`` averaged over labelled pixels (``mask_ignore``, default on:
with no teacher there is no reason to match the other student on void pixels) to its own CE::

    L = CE_a + CE_b + weight * (KL(sg(p_b) || p_a) + KL(sg(p_a) || p_b))
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from segkd.engine.losses import seg_cross_entropy
from segkd.methods.base import Method, align_logits, check_positive, check_temperature, register_method, valid_mask
from segkd.methods.kd import kd_loss
from segkd.models import SegModel, SegOutput


@dataclass
class DMLOptions:
    weight: float = 1.0
    temperature: float = 1.0
    ce_weight: float = 1.0
    mask_ignore: bool = True

    def check(self) -> None:
        check_positive(self, "weight", "ce_weight")
        check_temperature(self, "temperature")


class DML(Method):

    def forward(self, images: Tensor, labels: Tensor, outs: dict[str, SegOutput]) -> dict[str, Tensor]:
        o = self.opts
        za, zb, lab = align_logits(outs["student"].logits, outs["peer"].logits, labels, "label")
        mask = valid_mask(lab, self.ignore_index) if o.mask_ignore else None
        return self.record({
            "ce": (o.ce_weight, seg_cross_entropy(outs["student"].logits, labels, self.ignore_index)),
            "peer_ce": (o.ce_weight, seg_cross_entropy(outs["peer"].logits, labels, self.ignore_index)),
            "dml": (o.weight, kd_loss(za, zb.detach(), o.temperature, mask)),
            "peer_dml": (o.weight, kd_loss(zb, za.detach(), o.temperature, mask)),
        }, student=za, peer=zb)


@register_method("dml", "deep mutual learning: two students, per-pixel KL to each other", DMLOptions,
                 teacher=False, peer=True)
def _build(opts: DMLOptions, student: SegModel, peer: SegModel, ignore_index: int = 255) -> DML:
    return DML(opts, ignore_index)

