"""Iteration-based learning-rate schedule: linear warm-up, then polynomial decay (the mmseg/SegFormer recipe).

The schedule is a pure function of the iteration, so it has no state of its own to save: resuming at iteration
``i`` and calling :func:`apply_lr` gives exactly the learning rates the uninterrupted run had there.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch.optim import Optimizer

from segkd.errors import SegkdError


def lr_factor(it: int, total: int, warmup: int = 0, power: float = 1.0, warmup_ratio: float = 1e-6,
              min_factor: float = 0.0) -> float:
    """Multiplier of the base LR for (0-based) iteration ``it`` of ``total``.

    * warm-up, ``it < warmup``: linear from ``warmup_ratio`` (at ``it = 0``) towards 1 (reached at ``it = warmup``),
      ``f = warmup_ratio + (1 - warmup_ratio) * it / warmup``. The default ratio 1e-6 is mmseg's SegFormer
      ``LinearLR(start_factor=1e-6)``.
    * then poly: ``f = (1 - (it - warmup) / (total - warmup)) ** power``, floored at ``min_factor``. The decay
      starts after the warm-up (mmseg's ``PolyLR(begin=warmup)``), so the peak LR is the base LR.
    """
    if total <= 0:
        raise SegkdError(f"--iters must be >= 1, got {total}")
    if warmup < 0 or (warmup > 0 and warmup >= total):
        raise SegkdError(f"--warmup must be in [0, --iters), got {warmup} for {total} iterations")
    if power < 0:
        raise SegkdError(f"--poly-power must be >= 0, got {power}")
    if it < warmup:
        return warmup_ratio + (1.0 - warmup_ratio) * it / warmup
    frac = (it - warmup) / (total - warmup)
    return max((1.0 - frac) ** power, min_factor)


def apply_lr(optimizers: Iterable[Optimizer], factor: float) -> list[float]:
    """Set every param group's LR to ``group["initial_lr"] * factor``; returns the LR of each optimiser's group 0."""
    first = []
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor
        first.append(opt.param_groups[0]["lr"])
    return first
