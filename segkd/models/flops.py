"""FLOPs with torch's FlopCounterMode, plus formulas for what it misses, counted the same way on every device.

Conventions (stated in every report): FlopCounterMode counts 2 FLOPs per multiply-add; GMACs = GFLOPs / 2 is the
convention of the SegFormer and mmseg/mmcv papers and of fvcore/thop/ptflops (their "FLOPs" are multiply-adds).
Counted: convolutions, linear layers / matmuls and attention (``scaled_dot_product_attention``: QK^T and AV).
Not counted (as in those papers): elementwise ops, normalisation, activations, softmax, pooling and interpolation
(bilinear upsampling); ``--detail`` lists every such op seen during the forward.

Why the count runs on the ``meta`` device by default: PyTorch picks a different attention kernel per device (CPU's
``aten._scaled_dot_product_flash_attention_for_cpu`` has no formula in FlopCounterMode's registry and would be
counted as 0; CUDA's flash/efficient/cudnn kernels have formulas), so the same model could give different figures on
a CPU CI runner and a GPU box. On ``meta`` no arithmetic runs (a full DeepLabV3-R101 forward at 512x1024 is counted
in well under a second) and the count does not depend on the machine. Counting on a real device is still possible
(``device=``); then the formula for the CPU fused-attention kernel registered here keeps the figure identical.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    """CPU fused attention: the formula FlopCounterMode uses for the CUDA kernels (2 matmuls, 2 FLOPs per MAC)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def extra_formulas() -> dict:
    """Formulas FlopCounterMode lacks on some device (only ops that exist in this torch build)."""
    table: dict = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        table[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
    return table


class _OpRecorder(TorchDispatchMode):
    """Records every aten op executed (after FlopCounterMode's own decompositions), with call counts."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.views: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        name = str(func.overloadpacket)
        self.calls[name] += 1
        if getattr(func, "is_view", False):
            self.views.add(name)
        return func(*args, **(kwargs or {}))


@dataclass
class FlopCount:
    """One forward's count. ``flops`` counts 2 per multiply-add; ``by_module`` keys are dotted module paths."""

    flops: int
    by_module: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)
    uncounted_ops: dict[str, int] = field(default_factory=dict)  # op -> calls, for ops with no formula (views out)
    device: str = "meta"

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def gmacs(self) -> float:
        return self.flops / 2e9


def _run_counted(
    model: nn.Module, x: torch.Tensor, forward: Callable[[nn.Module, torch.Tensor], Any] | None
) -> tuple[FlopCounterMode, _OpRecorder]:
    counter = FlopCounterMode(display=False, custom_mapping=extra_formulas())
    recorder = _OpRecorder()
    # recorder outside, counter inside: the counter sees each op first (and may decompose it), the recorder then
    # sees exactly the ops that ran, so "no formula" below means "contributed nothing".
    with torch.no_grad(), recorder, counter:
        if forward is None:
            model(x)
        else:
            forward(model, x)
    return counter, recorder


def count_flops(
    model: nn.Module,
    shape: tuple[int, int, int, int],
    device: str | torch.device | None = "meta",
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> FlopCount:
    """FLOPs of one eval-mode forward at ``shape`` (B, C, H, W), attention included.

    ``device="meta"`` (default) counts on a weightless copy of the model, so nothing is computed and the figure is
    the same on every machine; ``device=None`` counts on the model's own device (a real forward). ``forward``
    replaces ``model(x)`` (e.g. ``lambda m, x: m.forward_aux(x)`` to include DeepLabV3's auxiliary head).
    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    if device is not None and torch.device(device).type == "meta":
        target = copy.deepcopy(model).to("meta")
        dev = torch.device("meta")
    else:
        target = model
        first = next(iter(model.parameters()), None)
        own = first.device if first is not None else torch.device("cpu")
        dev = torch.device(device) if device is not None else own
    target.eval()
    try:
        counter, recorder = _run_counted(target, torch.zeros(shape, device=dev), forward)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    by_module = {k: int(sum(v.values())) for k, v in counts.items()}
    by_op = {str(op): int(n) for op, n in counts.get("Global", {}).items()}
    registered = {str(k) for k in counter.flop_registry}
    uncounted = {
        op: n for op, n in sorted(recorder.calls.items(), key=lambda kv: (-kv[1], kv[0]))
        if op not in registered and op not in recorder.views and by_op.get(op, 0) == 0
    }
    return FlopCount(int(counter.get_total_flops()), by_module, by_op, uncounted, str(dev))


def module_table(count: FlopCount, max_depth: int = 3) -> list[tuple[str, int, int]]:
    """``(module path, depth, flops)`` rows down to ``max_depth`` dots below the root, in forward order.

    A path that is not itself a called module (an ``nn.ModuleList`` such as ``encoder.stages``) gets the sum of its
    children, so every level of the tree adds up. Rows with 0 FLOPs are dropped.
    """
    names = [k for k in count.by_module if k != "Global"]
    children: dict[str, list[str]] = {}
    roots: list[str] = []
    for name in names:
        parts = name.split(".")
        for d in range(len(parts)):
            prefix = ".".join(parts[: d + 1])
            parent = ".".join(parts[:d])
            siblings = children.setdefault(parent, []) if d else roots
            if prefix not in siblings:
                siblings.append(prefix)

    def flops_of(prefix: str) -> int:
        if prefix in count.by_module:
            return count.by_module[prefix]
        return sum(flops_of(c) for c in children.get(prefix, []))

    rows: list[tuple[str, int, int]] = []

    def walk(prefix: str, depth: int) -> None:
        value = flops_of(prefix)
        if value == 0 or depth > max_depth:
            return
        rows.append((prefix, depth, value))
        for c in children.get(prefix, []):
            walk(c, depth + 1)

    for r in roots:
        walk(r, 0)
    return rows
