"""FLOPs with torch's FlopCounterMode, plus formulas for what it misses.

FlopCounterMode counts 2 FLOPs per multiply-add but has no formula for CPU's fused attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``), which it counts as 0; we register the same formula it uses
for the CUDA kernels, so a model gives the same figure on CPU and GPU. GMACs = GFLOPs / 2, the convention of the
SegFormer and mmseg papers ("FLOPs" there are multiply-adds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict:
    table = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        table[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
    return table


@dataclass
class FlopCount:
    flops: int
    by_module: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def gmacs(self) -> float:
        return self.flops / 2e9


@torch.no_grad()
def count_flops(model: nn.Module, shape: tuple[int, int, int, int]) -> FlopCount:
    """FLOPs of one eval-mode forward at ``shape`` (B, C, H, W), attention included."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(shape, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    try:
        with counter:
            model(x)
    finally:
        model.train(was_training)
    by_module = {k: int(sum(v.values())) for k, v in counter.get_flop_counts().items()}
    total = int(counter.get_total_flops())
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return FlopCount(total, by_module, by_op)
