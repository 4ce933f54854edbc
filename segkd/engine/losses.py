"""Supervised loss shared by ``train``, ``distill`` and every method."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from segkd.models.base import upsample_logits


def seg_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Pixel cross-entropy of logits (at any stride) against full-resolution labels.

    Logits are upsampled bilinearly to the label size first (the mmseg convention), so every labelled pixel counts
    once; pixels equal to ``ignore_index`` are skipped. Returns 0 (with a gradient path) when no pixel is labelled.
    """
    logits = upsample_logits(logits, labels.shape[-2:])
    valid = labels != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index)
