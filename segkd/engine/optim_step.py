"""One optimiser step of the trainer: gradient accumulation, autocast (AMP), loss scaling, clipping, finite checks.

:class:`OptimizerStep` owns the optimisers of a task's parts and the grad scaler, and knows nothing of logging,
validation or checkpoints (those are :mod:`segkd.engine.hooks`). Each call runs ``accum`` micro-batches: forward
under ``torch.autocast`` (bf16 on CPU, fp16 on CUDA), backward of ``loss / accum`` through the scaler, DDP's
gradient all-reduce only on the last micro-batch (``no_sync`` before it); then the loss terms are checked finite,
gradients are unscaled, clipped (or their norm measured), checked finite (without a scaler: with one, inf
gradients just skip the step and lower the scale), and every optimiser steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from segkd.engine.batch import Batch
from segkd.engine.schedule import apply_lr
from segkd.errors import SegkdError


@dataclass
class StepResult:
    """What one optimiser step measured: the mean of each loss term over its micro-batches, each part's gradient
    norm (before clipping), the LR of each optimiser's first group, and the images it consumed (all processes)."""

    values: dict[str, float]
    norms: dict[str, float]
    lrs: list[float]
    images: int


class OptimizerStep:
    """The optimisers of a task's parts, the grad scaler, and the step that uses them (see the module docstring).

    ``check_finite(values, what)`` raises when a value is not finite (the trainer's, so the error can name the
    iteration and the checkpoint that is kept); ``batch_images`` is the global batch of one micro-batch."""

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer], params: Mapping[str, list[nn.Parameter]],
                 device: torch.device, *, accum: int = 1, amp: bool = False, clip_grad: float | None = None,
                 channels_last: bool = False, distributed: bool = False, batch_images: int = 1,
                 check_finite: Callable[[dict[str, float], str], None]) -> None:
        self.optimizers, self.params, self.device = dict(optimizers), dict(params), device
        self.accum, self.amp, self.clip_grad, self.channels_last = accum, amp, clip_grad, channels_last
        self.distributed, self.batch_images, self.check_finite = distributed, batch_images, check_finite
        self.use_scaler = amp and device.type == "cuda"
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_scaler)

    def __call__(self, forward: nn.Module, batches: Iterator[Batch], lr_factor: float) -> StepResult:
        lrs = apply_lr(self.optimizers.values(), lr_factor)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        for micro in range(self.accum):
            terms = self._micro_batch(forward, next(batches), last=micro == self.accum - 1)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / self.accum
        values = {k: float(v) for k, v in sums.items()}
        self.check_finite(values, "loss")
        norms = self._unscale_and_clip()
        if not self.use_scaler:
            self.check_finite({f"grad_norm_{k}": v for k, v in norms.items()}, "gradient")
        for opt in self.optimizers.values():
            self.scaler.step(opt)
        self.scaler.update()
        return StepResult(values, norms, lrs, self.batch_images * self.accum)

    def _micro_batch(self, forward: nn.Module, batch: Batch, last: bool) -> dict[str, Tensor]:
        """Forward and backward of one micro-batch; DDP syncs gradients only on the last one."""
        batch = batch.to(self.device, channels_last=self.channels_last)
        sync = last or not self.distributed
        with nullcontext() if sync else forward.no_sync():  # type: ignore[operator]
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                terms = forward(batch)
            if "loss" not in terms:
                raise SegkdError("the task returned no 'loss' term")
            self.scaler.scale(terms["loss"] / self.accum).backward()
        return terms

    def _unscale_and_clip(self) -> dict[str, float]:
        """Each part's gradient norm (clipped to ``clip_grad`` when set), after unscaling AMP gradients."""
        norms: dict[str, float] = {}
        for name, opt in self.optimizers.items():
            if self.use_scaler:
                self.scaler.unscale_(opt)
            params = self.params[name]
            if self.clip_grad is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            norms[name] = float(norm)
        return norms

    def state_dict(self) -> dict[str, object]:
        return {"optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])  # type: ignore[index]
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])  # type: ignore[arg-type]
