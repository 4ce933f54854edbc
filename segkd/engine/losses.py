"""Supervised loss shared by ``train``, ``distill`` and every method."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from segkd.models.base import upsample_logits


def seg_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Pixel cross-entropy of logits (at any stride) against full-resolution labels.

    Logits are upsampled bilinearly to the label size first (the mmseg convention), so every labelled pixel counts
    once; pixels equal to ``ignore_index`` are skipped. Returns 0 (with a gradient path) when no pixel is labelled.
    ``log_softmax`` then ``nll_loss`` is what ``F.cross_entropy`` runs (the same values); spelt out so that a
    method that needs the student's log-probabilities too computes them once (:func:`seg_nll`).
    """
    logits = upsample_logits(logits, labels.shape[-2:])
    return seg_nll(F.log_softmax(logits.float(), dim=1), labels, ignore_index)


def seg_nll(log_probs: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """:func:`seg_cross_entropy` from log-probabilities already at the label size (``B x K x H x W``)."""
    valid = labels != ignore_index
    if not bool(valid.any()):
        return log_probs.sum() * 0.0
    return F.nll_loss(log_probs, labels.long(), ignore_index=ignore_index)
