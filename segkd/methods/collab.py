"""CNN-ViT collaborative learning (Zhu et al., ICCV 2023, "A Good Student is Cooperative and Reliable").

**A reconstruction.** The paper has no public code and only its abstract was readable: HFD makes the two students
consistent in *low-layer feature space*; region-wise BSD decides, per region, the *direction* of transfer in
*feature space*; pixel-wise BSD decides *which* predictions are transferred in *logit space*. Every concrete choice
below is segkd's (methods.md §3.3, papers-extra §1.4) and is a switch. Two students, no teacher; each keeps its own
optimiser (the ``student`` and ``peer`` parts); ``sg`` = stop-gradient::

    L = CE_a + CE_b + hfd_weight * L_HFD + rbsd_weight * L_RBSD + pbsd_weight * L_PBSD

* HFD: on the k-th feature stage of each student (``hfd_stages``, default the first = stride 4: MiT ``stage1``,
  ResNet ``layer1``), 1x1 projections both ways (training-only; ``a->b`` trains with a, ``b->a`` with b), bilinear
  resize to the target's grid: ``MSE(P_ab(F_a), sg(F_b)) + MSE(P_ba(F_b), sg(F_a))``.
* Region-wise BSD: deepest stage of each student, regions = cells of ``rbsd_region`` px at the label resolution
  (default 32, the MiT stage-4 token grid). Per region each student's score is its mean pixel CE over labelled
  pixels (``rbsd_rule="lower-ce"``) or its fraction of correct pixels (``"correct-ratio"``); the better student
  teaches the other in that region (equal scores or no labelled pixel: no transfer). The learner's region feature
  (avg-pooled, then projected 1x1 into the teacher's channels, a training-only projection owned by the learner)
  mimics the teacher's pooled feature, ``sg``-ed: squared error averaged over channels (``rbsd_dist="mse"``) or
  ``1 - cosine`` (``"cosine"``), summed and divided by the number of regions with labelled pixels. Choice: the
  target is the raw feature and only the learner's side is projected, so the loss cannot be minimised by shrinking
  both projections to zero.
* Pixel-wise BSD: both logits aligned to the label grid. At a labelled pixel a student may teach only when it is
  *reliable*: ``pbsd_rule="correct"`` = its argmax equals the label; ``"confidence"`` = correct and ``p_y >=
  pbsd_threshold``. When both qualify, ``pbsd_ties`` decides: ``"lower-ce"`` (the one with lower pixel CE teaches,
  default), ``"none"`` (no transfer), ``"both"`` (each teaches the other). Both wrong: nothing.
  ``KL(sg(p_teacher) || p_learner) * T^2``, summed over transferring pixels and divided by the number of labelled
  pixels (so the term shrinks as fewer pixels are reliable, rather than re-weighting a few pixels up).
* Weights default to 1 (the paper's are unknown).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkd.engine.losses import seg_cross_entropy
from segkd.errors import SegkdError
from segkd.methods.base import (
    Method,
    align_logits,
    check_positive,
    check_temperature,
    register_method,
    resize_to,
    resolve_tap,
    valid_mask,
)
from segkd.methods.kd import pixel_kl
from segkd.models import SegModel, SegOutput, upsample_logits


def stage_tap(model: SegModel, k: int) -> str:
    """The k-th (1-based) backbone stage tap of a model (``stage{k}`` / ``layer{k}``)."""
    feats = [s.name for s in model.feature_info if s.kind == "feature" and s.name != "aspp"]
    if not 1 <= k <= len(feats):
        raise SegkdError(f"collab: {model.zoo_name} has {len(feats)} feature stages, no stage {k}")
    return feats[k - 1]


def pixel_ce(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Per-pixel CE at the label size (0 at void pixels)."""
    logits = upsample_logits(logits, labels.shape[-2:]).float()
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none")


def hfd_loss(fa: Tensor, fb: Tensor, p_ab: nn.Module, p_ba: nn.Module) -> Tensor:
    """``MSE(P_ab(F_a), sg(F_b)) + MSE(P_ba(F_b), sg(F_a))`` with the projection resized to the target grid."""
    a_to_b = resize_to(p_ab(fa), fb.shape[-2:])
    b_to_a = resize_to(p_ba(fb), fa.shape[-2:])
    return F.mse_loss(a_to_b.float(), fb.detach().float()) + F.mse_loss(b_to_a.float(), fa.detach().float())


def region_scores(ce: Tensor, correct: Tensor, valid: Tensor, grid: tuple[int, int], rule: str) -> tuple[Tensor,
                                                                                                         Tensor]:
    """Per-region score (lower is better) and the mask of regions with labelled pixels, ``B x gh x gw``."""
    v = valid.float()[:, None]
    count = F.adaptive_avg_pool2d(v, grid)[:, 0]
    if rule == "lower-ce":
        num = F.adaptive_avg_pool2d((ce * valid)[:, None].float(), grid)[:, 0]
    else:
        num = -F.adaptive_avg_pool2d((correct & valid)[:, None].float(), grid)[:, 0]
    has = count > 0
    return num / count.clamp_min(1e-12), has


def region_dist(student: Tensor, target: Tensor, dist: str) -> Tensor:
    """Per-region distance between ``B x C x gh x gw`` maps: mean squared error over channels or 1 - cosine."""
    if dist == "mse":
        return (student.float() - target.float()).pow(2).mean(1)
    return 1.0 - F.cosine_similarity(student.float(), target.float(), dim=1)


def rbsd_loss(fa: Tensor, fb: Tensor, q_ab: nn.Module, q_ba: nn.Module, score_a: Tensor, score_b: Tensor,
              has: Tensor, dist: str = "mse") -> tuple[Tensor, Tensor, Tensor]:
    """Region-wise BSD on pooled features; returns the loss and the masks (a teaches b, b teaches a)."""
    grid = tuple(score_a.shape[-2:])
    pa, pb = F.adaptive_avg_pool2d(fa, grid), F.adaptive_avg_pool2d(fb, grid)
    a_teaches = has & (score_a < score_b)
    b_teaches = has & (score_b < score_a)
    d_b = region_dist(q_ba(pb), pa.detach(), dist)   # b learns from a, in a's channels
    d_a = region_dist(q_ab(pa), pb.detach(), dist)   # a learns from b, in b's channels
    n = has.sum().clamp_min(1)
    loss = ((d_b * a_teaches).sum() + (d_a * b_teaches).sum()) / n
    return loss, a_teaches, b_teaches


def pbsd_masks(za: Tensor, zb: Tensor, labels: Tensor, ignore_index: int, rule: str = "correct",
               ties: str = "lower-ce", threshold: float = 0.7) -> tuple[Tensor, Tensor, Tensor]:
    """Where a teaches b and where b teaches a (``B x H x W`` bools), and the valid mask; logits at label size."""
    valid = valid_mask(labels, ignore_index)
    y = labels.clamp(0, za.shape[1] - 1).long()
    pa, pb = F.softmax(za.float(), 1), F.softmax(zb.float(), 1)
    ok_a = (pa.argmax(1) == y) & valid
    ok_b = (pb.argmax(1) == y) & valid
    if rule == "confidence":
        ok_a = ok_a & (pa.gather(1, y[:, None])[:, 0] >= threshold)
        ok_b = ok_b & (pb.gather(1, y[:, None])[:, 0] >= threshold)
    both = ok_a & ok_b
    a_t, b_t = ok_a & ~ok_b, ok_b & ~ok_a
    if ties == "lower-ce":
        ce_a = -pa.gather(1, y[:, None])[:, 0].clamp_min(1e-12).log()
        ce_b = -pb.gather(1, y[:, None])[:, 0].clamp_min(1e-12).log()
        a_t = a_t | (both & (ce_a < ce_b))
        b_t = b_t | (both & (ce_b < ce_a))
    elif ties == "both":
        a_t, b_t = a_t | both, b_t | both
    return a_t, b_t, valid


def pbsd_loss(za: Tensor, zb: Tensor, labels: Tensor, ignore_index: int = 255, rule: str = "correct",
              ties: str = "lower-ce", threshold: float = 0.7, temperature: float = 1.0) -> Tensor:
    """Pixel-wise BSD: per reliable pixel, KL from the reliable student's (stopped) prediction to the other's."""
    a_t, b_t, valid = pbsd_masks(za.detach(), zb.detach(), labels, ignore_index, rule, ties, threshold)
    kl_b = pixel_kl(zb, za.detach(), temperature)   # b learns from a
    kl_a = pixel_kl(za, zb.detach(), temperature)   # a learns from b
    n = valid.sum().clamp_min(1)
    return ((kl_b * a_t).sum() + (kl_a * b_t).sum()) / n * temperature**2


@dataclass
class CollabOptions:
    hfd_weight: float = 1.0
    rbsd_weight: float = 1.0
    pbsd_weight: float = 1.0
    ce_weight: float = 1.0
    hfd_stages: tuple[int, ...] = (1,)
    rbsd_region: int = 32
    rbsd_rule: Literal["lower-ce", "correct-ratio"] = "lower-ce"
    rbsd_dist: Literal["mse", "cosine"] = "mse"
    pbsd_rule: Literal["correct", "confidence"] = "correct"
    pbsd_ties: Literal["lower-ce", "none", "both"] = "lower-ce"
    pbsd_threshold: float = 0.7
    temperature: float = 1.0

    def check(self) -> None:
        check_positive(self, "hfd_weight", "rbsd_weight", "pbsd_weight", "ce_weight")
        check_temperature(self, "temperature")
        if self.rbsd_region < 1:
            raise SegkdError(f"option rbsd_region must be >= 1 pixel, got {self.rbsd_region}")
        if not self.hfd_stages:
            raise SegkdError("option hfd_stages needs at least one stage (set hfd_weight=0 to drop HFD)")


class Collab(Method):
    def __init__(self, opts: CollabOptions, student: SegModel, peer: SegModel, ignore_index: int = 255) -> None:
        super().__init__(opts, ignore_index)
        self.hfd_taps = [(stage_tap(student, k), stage_tap(peer, k)) for k in opts.hfd_stages]
        self.deep = (resolve_tap(student, "deep"), resolve_tap(peer, "deep"))

        def ch(m: SegModel, t: str) -> int:
            return m.feature_spec(t).channels

        self.a = nn.ModuleDict({  # trained with the student
            "hfd": nn.ModuleList(nn.Conv2d(ch(student, ta), ch(peer, tb), 1) for ta, tb in self.hfd_taps),
            "rbsd": nn.Conv2d(ch(student, self.deep[0]), ch(peer, self.deep[1]), 1, bias=False),
        })
        self.b = nn.ModuleDict({  # trained with the peer
            "hfd": nn.ModuleList(nn.Conv2d(ch(peer, tb), ch(student, ta), 1) for ta, tb in self.hfd_taps),
            "rbsd": nn.Conv2d(ch(peer, self.deep[1]), ch(student, self.deep[0]), 1, bias=False),
        })

    def student_modules(self) -> nn.Module:
        return self.a

    def peer_modules(self) -> nn.Module:
        return self.b

    def forward(self, images: Tensor, labels: Tensor, outs: dict[str, SegOutput]) -> dict[str, Tensor]:
        o = self.opts
        sa, sb = outs["student"], outs["peer"]
        terms: dict[str, tuple[float, Tensor]] = {
            "ce": (o.ce_weight, seg_cross_entropy(sa.logits, labels, self.ignore_index)),
            "peer_ce": (o.ce_weight, seg_cross_entropy(sb.logits, labels, self.ignore_index)),
        }
        if o.hfd_weight > 0:
            hfd = sum(hfd_loss(sa.tap(ta), sb.tap(tb), pab, pba)
                      for (ta, tb), pab, pba in zip(self.hfd_taps, self.a["hfd"], self.b["hfd"], strict=True))
            terms["hfd"] = (o.hfd_weight, hfd)  # type: ignore[assignment]
        za, zb, lab = align_logits(sa.logits, sb.logits, labels, "label")
        if o.rbsd_weight > 0:
            valid = valid_mask(lab, self.ignore_index)
            with torch.no_grad():
                y = lab.clamp(0, za.shape[1] - 1)
                ce_a = pixel_ce(za, lab, self.ignore_index)
                ce_b = pixel_ce(zb, lab, self.ignore_index)
                grid = (max(1, lab.shape[-2] // o.rbsd_region), max(1, lab.shape[-1] // o.rbsd_region))
                score_a, has = region_scores(ce_a, za.argmax(1) == y, valid, grid, o.rbsd_rule)
                score_b, _ = region_scores(ce_b, zb.argmax(1) == y, valid, grid, o.rbsd_rule)
            rb, _, _ = rbsd_loss(sa.tap(self.deep[0]), sb.tap(self.deep[1]), self.a["rbsd"], self.b["rbsd"],
                                 score_a, score_b, has, o.rbsd_dist)
            terms["rbsd"] = (o.rbsd_weight, rb)
        if o.pbsd_weight > 0:
            terms["pbsd"] = (o.pbsd_weight, pbsd_loss(za, zb, lab, self.ignore_index, o.pbsd_rule, o.pbsd_ties,
                                                      o.pbsd_threshold, o.temperature))
        return self.record(terms, student=za, peer=zb)


@register_method("collab", "online CNN<->ViT collaborative learning (reconstruction): HFD + region-wise and "
                 "pixel-wise BSD", CollabOptions, teacher=False, peer=True,
                 taps={"student": ("low", "deep"), "peer": ("low", "deep")}, reconstruction=True,
                 # HFD's / RBSD's projections idle at weight 0; the heads when neither CE nor PBSD is weighted
                 unused_params=lambda o, b: o.hfd_weight == 0 or o.rbsd_weight == 0 or (
                     o.ce_weight == o.pbsd_weight == 0))
def _build(opts: CollabOptions, student: SegModel, peer: SegModel, ignore_index: int = 255) -> Collab:
    return Collab(opts, student, peer, ignore_index)

