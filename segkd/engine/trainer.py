"""The one training loop, used by ``segkd train`` (a :class:`SupervisedTask`) and by ``distill``/``collab`` tasks.

Iteration-based: ``iters`` optimiser steps, each over ``accum`` micro-batches of ``batch`` images (summed over the
processes), poly LR after a linear warm-up, optional AMP (bf16 autocast on CPU; fp16 with a GradScaler on CUDA),
clipping, channels_last, DDP under torchrun. What a run keeps (the log, the validations, the checkpoints, run.json)
is the hooks' (:mod:`segkd.engine.hooks`); the run directory's lifecycle (lock, refusals, resume binding,
config.yaml) is the runs layer's (:mod:`segkd.runs`). The Trainer is the loop, its state and DDP.

Exactness: the data order is a seeded permutation per epoch plus the number of global batches already taken in
that epoch (:class:`~segkd.engine.distributed.StepSampler`), augmentation is seeded per (seed, epoch, index) by the
dataset, the LR is a function of the iteration, and the RNG states of every rank are saved; so on CPU an
interrupted-and-resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import platform
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from segkd.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from segkd.data.transforms import collate_pairs
from segkd.engine.batch import Batch
from segkd.engine.config import TrainConfig
from segkd.engine.display import Display
from segkd.engine.distributed import DistInfo, StepSampler, any_rank, barrier, gather_objects, launch_command
from segkd.engine.hooks import (
    Checkpointing,
    Hook,
    NonFiniteLoss,
    Validation,
    ckpt_name,
    default_hooks,
    worker_init,
)
from segkd.engine.optim_step import OptimizerStep, StepResult
from segkd.engine.schedule import lr_factor
from segkd.engine.state import RESUME_FILE, capture_rng, restore_rng, save_resume
from segkd.engine.task import SupervisedTask, Task, build_optimizer
from segkd.errors import SegkdError
from segkd.models import deploy_param_count

__all__ = ["DataBundle", "NonFiniteLoss", "Trainer", "TrainingInterrupted"]

Callback = Callable[["Trainer", int], None]


@dataclass
class DataBundle:
    """The datasets a run trains and validates on, and what the checkpoints must say about their classes."""

    train: Dataset
    val: Dataset | None
    num_classes: int
    class_names: list[str]
    palette: list[list[int]]
    ignore_index: int = 255
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


class TrainingInterrupted(SegkdError):
    """Ctrl-C / SIGTERM: the resumable state was saved; exit code 130 like an interrupted shell command. Raised on
    every rank; ``silent`` on all but rank 0, so one line is printed per run, not one per process."""

    exit_code = 130

    def __init__(self, message: str, silent: bool = False) -> None:
        super().__init__(message)
        self.silent = silent  # type: ignore[misc]


class _TaskModule(nn.Module):
    """All trainable parts under one module so one DDP wrapper covers them; forward = ``task.losses``."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({name: p.module for name, p in task.parts().items()})
        object.__setattr__(self, "_task", task)  # not a submodule: frozen teachers stay out of DDP

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self._task.losses(batch)


class Trainer:
    """Runs a :class:`~segkd.engine.task.Task` for ``cfg.iters`` iterations; see the module docstring.

    The loop (:meth:`fit`) is short: each iteration is one :class:`~segkd.engine.optim_step.OptimizerStep`, then the
    hooks in order (:func:`~segkd.engine.hooks.default_hooks` unless ``hooks`` are given). ``cfg`` is taken as
    checked. ``run_info`` is what the caller binds the run with (a run id): saved in the resume state and run.json."""

    def __init__(self, task: Task, cfg: TrainConfig, data: DataBundle, info: DistInfo | None = None,
                 callbacks: Sequence[Callback] = (), source: str = "segkd train", hooks: Sequence[Hook] | None = None,
                 run_info: dict[str, Any] | None = None) -> None:
        self.task, self.cfg, self.data = task, cfg, data
        self.info = info or DistInfo(device=torch.device("cpu"))
        self.device = self.info.device
        self.source = source
        self.out = Path(cfg.out)
        self.run_info = dict(run_info or {})
        # impossible batch / process combinations fail here, before anything is written
        StepSampler(len(data.train), cfg.batch, cfg.seed, 0, self.info.rank, self.info.world_size)  # type: ignore
        self.parts = task.parts()
        for part in self.parts.values():
            part.module.to(self.device)
            if cfg.channels_last:
                part.module.to(memory_format=torch.channels_last)
        for m in task.deploy_models().values():
            m.to(self.device)
        self.optim_step = OptimizerStep(
            {name: build_optimizer(p) for name, p in self.parts.items()},
            {n: [p for p in part.module.parameters() if p.requires_grad] for n, part in self.parts.items()},
            self.device, accum=cfg.accum, amp=cfg.amp, clip_grad=cfg.clip_grad, channels_last=cfg.channels_last,
            distributed=self.info.enabled, batch_images=cfg.batch, check_finite=self._check_finite)
        self.hooks: list[Hook] = list(hooks) if hooks is not None else default_hooks(
            cfg.log_every, cfg.val_every, cfg.kept(), tuple(callbacks), self.run_info)
        self.iteration = self.epoch = self.step_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.display = Display(cfg.iters, 0, enabled=False, rich_ok=False)  # replaced when fit() starts
        self.run_images = 0  # images of this process's steps (a resumed run: since the resume)
        self.start_iteration = 0  # the iteration fit() started at (a resumed run: where it resumed)
        self._stop_requested = False
        self._wrapped: nn.Module | None = None
        # sha256 of each deploy model's weights as built, before any step (run_task sets it; run.json records it)
        self.initial_weights: dict[str, str] = {}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self.optim_step.optimizers

    @property
    def last_step(self) -> bool:
        return self.iteration == self.cfg.iters

    def hook(self, kind: type) -> Any:
        """The first hook of type ``kind`` (``trainer.hook(Checkpointing).best``), or None."""
        return next((h for h in self.hooks if isinstance(h, kind)), None)

    @property
    def last_results(self) -> dict[str, dict[str, Any]]:
        """The latest validation results per deploy model (empty before the first validation)."""
        validation = self.hook(Validation)
        return validation.results if validation is not None else {}

    @property
    def best(self) -> dict[str, dict[str, Any]]:
        ckpt = self.hook(Checkpointing)
        return ckpt.best if ckpt is not None else {}

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.cfg)

    # ------------------------------------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """The resume state (rank-local parts; RNG states of every rank gathered; each hook's own state)."""
        state = {
            "iteration": self.iteration,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "world_size": self.info.world_size,
            "config": self.config_dict(),
            "run": self.run_info,
            "parts": {n: p.module.state_dict() for n, p in self.parts.items()},
            **self.optim_step.state_dict(),
            "task": self.task.extra_state(),
            "rng": gather_objects(capture_rng(), self.info),
        }
        for hook in self.hooks:
            state.update(hook.state_dict(self))
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore everything :meth:`state` saved (call before :meth:`fit`)."""
        if set(state["parts"]) != set(self.parts):
            raise SegkdError(f"resume state has parts {sorted(state['parts'])}, the task has {sorted(self.parts)}")
        for name, part in self.parts.items():
            part.module.load_state_dict(state["parts"][name])
        self.optim_step.load_state_dict(state)
        self.task.load_extra_state(state.get("task", {}))
        self.iteration = int(state["iteration"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        for hook in self.hooks:
            hook.load_state_dict(self, state)
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            restore_rng(rngs[self.info.rank])
        else:
            restore_rng(rngs[0])
            torch.manual_seed(self.cfg.seed + 7919 * self.info.rank + self.iteration)
            self.note(f"warning: resuming a {len(rngs)}-process run on {self.info.world_size} processes: data order "
                      "is kept, dropout randomness is not (the result will not be bit-identical)")

    def save_resume(self) -> Path:
        state = self.state()  # collective (RNG gather): every rank calls it
        path = self.out / RESUME_FILE
        if self.info.is_main:
            save_resume(path, state)
        return path

    # ------------------------------------------------------------------------------------------------- data
    def _batches(self) -> Iterator[Batch]:
        """Micro-batches forever, epoch after epoch, starting where the (possibly resumed) state says."""
        cfg, info = self.cfg, self.info
        n = len(self.data.train)  # type: ignore[arg-type]
        while True:
            sampler = StepSampler(n, cfg.batch, cfg.seed, self.epoch, info.rank, info.world_size, self.step_in_epoch)
            if hasattr(self.data.train, "set_epoch"):
                self.data.train.set_epoch(self.epoch)  # type: ignore[attr-defined]
            loader = DataLoader(self.data.train, batch_size=sampler.local_batch, sampler=sampler,
                                collate_fn=collate_pairs, num_workers=cfg.workers, drop_last=True,
                                pin_memory=self.device.type == "cuda",
                                generator=torch.Generator().manual_seed(cfg.seed + self.epoch),
                                worker_init_fn=worker_init(cfg.workers))
            for batch in loader:
                self.step_in_epoch += 1
                yield Batch.from_loader(batch)
            self.epoch += 1
            self.step_in_epoch = 0

    # ------------------------------------------------------------------------------------------------ output
    def note(self, text: str) -> None:
        """One line for the user (rank 0): above the progress bar, or on stderr."""
        if self.info.is_main and self.display.enabled:
            self.display.note(text)
        elif self.info.is_main:
            print(text, file=sys.stderr, flush=True)

    def label(self, name: str) -> str:
        """How a deploy model is named in notes: its role in a distillation, ``model NAME`` in a supervised run
        (a teacher trained with ``segkd train`` is no student)."""
        if isinstance(self.task, SupervisedTask):
            model = self.task.deploy_models()[name]
            return f"model {getattr(model, 'zoo_name', type(model).__name__)}"
        return name

    def log(self, record: dict[str, Any]) -> None:
        """Append a record to the history and hand it to every hook (:class:`~segkd.engine.hooks.RunFiles` writes
        metrics.jsonl on rank 0)."""
        self.history.append(record)
        for hook in self.hooks:
            hook.record(self, record)

    def describe(self) -> dict[str, Any]:
        """What run.json says about this run besides the caller's header and the summary."""
        return {
            "command": self.source,
            "config": self.config_dict(),
            "world_size": self.info.world_size,
            "device": str(self.device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "classes": self.data.class_names,
            "trainable_params": {n: sum(p.numel() for p in part.module.parameters() if p.requires_grad)
                                 for n, part in self.parts.items()},
            "deploy_params": {n: deploy_param_count(m) for n, m in self.task.deploy_models().items()},
            "initial_weights_sha256": self.initial_weights,
        }

    # ------------------------------------------------------------------------------------------------- train
    def _forward_module(self) -> nn.Module:
        if self._wrapped is None:
            module: nn.Module = _TaskModule(self.task)
            if self.info.enabled:
                # Depthwise convs with one input channel get grads whose size-1 dim has another stride than the
                # bucket view; the reducer warns on every step although the layouts are equivalent (a plain copy).
                warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
                ids = [self.device.index] if self.device.type == "cuda" else None
                module = DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True,
                                                 find_unused_parameters=self.find_unused())
            self._wrapped = module
        return self._wrapped

    def find_unused(self) -> bool:
        """DDP's ``find_unused_parameters``: the task's answer for this run's images per process (the task
        protocol's optional ``find_unused_parameters(local_batch)``; a plain bool attribute, the protocol's older
        form, is taken as it is; absent: False)."""
        ask = getattr(self.task, "find_unused_parameters", False)
        return bool(ask(self.cfg.batch // self.info.world_size)) if callable(ask) else bool(ask)

    def _check_finite(self, values: dict[str, float], what: str) -> None:
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if any_rank(bool(bad), self.info):
            if self.info.is_main:
                self.log({"type": "error", "iter": self.iteration + 1, "error": f"non-finite {what}",
                          **{k: str(v) for k, v in bad.items()}})
            terms = ", ".join(f"{k} = {v}" for k, v in bad.items()) or "on another rank"
            last = self.out / ckpt_name("student", "last")
            kept = f"; the last good checkpoint {last} is kept" if last.exists() else "; nothing was overwritten"
            raise NonFiniteLoss(f"non-finite {what} at iteration {self.iteration + 1} ({terms}); training stopped"
                                f"{kept} (try a lower --lr, --clip-grad, or no --amp)")

    def _install_signals(self) -> dict[int, Any]:
        """Ctrl-C / SIGTERM ask for a stop after the current step; a second one stops at once, except under
        torchrun: there a worker gets the terminal's Ctrl-C and then the same signal again from torchrun, which
        forwards what it receives and kills its workers itself after its own timeout, so a rank never aborts
        mid-step (its resume state would be lost and the other ranks would wait in a collective)."""
        old: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested and not self.info.enabled:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop_requested = True

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no handlers, KeyboardInterrupt behaves as usual
            pass
        return old

    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.iters``; returns the summary (the hooks complete it; RunFiles writes it to run.json)."""
        self._begin()
        old_signals = self._install_signals()
        t_start = time.perf_counter()
        try:
            while self.iteration < self.cfg.iters:
                result = self.step()
                for hook in self.hooks:
                    hook.after_step(self, result)
                self._stop_if_requested()
            summary = self.summary(time.perf_counter() - t_start, self.run_images)
            for hook in self.hooks:
                hook.end(self, summary)
        finally:
            self._end(old_signals)
        barrier(self.info)
        return summary

    def step(self) -> StepResult:
        """One optimiser step at the scheduled LR (``accum`` micro-batches); advances the iteration."""
        cfg = self.cfg
        factor = lr_factor(self.iteration, cfg.iters, cfg.warmup, cfg.poly_power, cfg.warmup_ratio)
        result = self.optim_step(self._forward_module(), self._batch_iter, factor)
        self.iteration += 1
        self.run_images += result.images
        return result

    def _begin(self) -> None:
        """The hooks' start (run directory files), the progress display, train mode, the batch stream."""
        self.start_iteration = self.iteration
        for hook in self.hooks:
            hook.start(self)
        # the bar only on a terminal and without --no-progress; plain periodic lines otherwise (never silence)
        self.display = Display(self.cfg.iters, self.iteration, self.info.is_main,
                               rich_ok=self.cfg.progress and sys.stderr.isatty())
        self._forward_module()
        self.task.train(True)
        self._batch_iter = self._batches()

    def _end(self, old_signals: dict[int, Any]) -> None:
        for sig, h in old_signals.items():
            signal.signal(sig, h)
        self.display.close()
        for hook in self.hooks:
            hook.close(self)

    def _stop_if_requested(self) -> None:
        """After Ctrl-C / SIGTERM (on any rank): save the resume state and stop with the command that continues."""
        if any_rank(self._stop_requested, self.info) and not self.last_step:
            path = self.save_resume()
            again = launch_command(f"{self.source} --resume {self.out}", self.info)
            raise TrainingInterrupted(f"interrupted at iteration {self.iteration}/{self.cfg.iters}; resumable state "
                                      f"saved to {path}; continue with: {again}", silent=not self.info.is_main)

    def summary(self, wall: float, images: int) -> dict[str, Any]:
        """The trainer's part of the summary; the hooks add the results, checkpoints and files. ``iterations`` is
        where the run stands; ``wall_time_s`` and ``img_s`` are this process's session only (a resumed run: the
        ``iterations_run`` since ``resumed_from``, never the iterations of an earlier session over this one's
        time)."""
        return {
            "out": str(self.out),
            "rank": self.info.rank,
            "world_size": self.info.world_size,
            "iterations": self.iteration,
            "resumed_from": self.start_iteration,
            "iterations_run": self.iteration - self.start_iteration,
            "wall_time_s": round(wall, 3),
            "img_s": round(images / max(wall, 1e-9), 3),
            "models": {n: getattr(m, "zoo_name", type(m).__name__) for n, m in self.task.deploy_models().items()},
        }
