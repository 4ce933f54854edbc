"""What the trainer does around each optimiser step, as named hooks run in order after every step.

* :class:`TrainLog`: averages the loss terms over a window of ``log_every`` steps, writes the ``train`` record of
  metrics.jsonl and updates the progress display. Its open window is part of the resume state, so the first
  record after ``--resume`` averages the same steps as in an uninterrupted run.
* :class:`Validation`: every ``val_every`` steps and at the last one, evaluates each deploy model and logs the
  ``val`` records.
* :class:`Checkpointing`: right after each validation, writes the checkpoints and the resume state
  (:meth:`Trainer.checkpoint`).
* :class:`CallbackHook`: the plain ``callback(trainer, iteration)`` functions of :func:`~segkd.engine.trainer.run_task`
  (tests and notebooks use them to watch or interrupt a run); they run first, then the log, the validation and
  the checkpoints.

A hook is any object with ``after_step(trainer, result)``; ``start(trainer)`` is optional.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from segkd.engine.distributed import mean_across
from segkd.engine.optim_step import StepResult

if TYPE_CHECKING:
    from segkd.engine.trainer import Trainer


class Hook(Protocol):
    def after_step(self, trainer: Trainer, result: StepResult) -> None: ...


class CallbackHook:
    """A ``callback(trainer, iteration)`` function as a hook."""

    def __init__(self, fn: Callable[[Trainer, int], None]) -> None:
        self.fn = fn

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        self.fn(trainer, trainer.iteration)


class TrainLog:
    """The ``train`` records of metrics.jsonl and the progress line (see the module docstring)."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self.window: dict[str, float] = {}  # sums of the terms over the open window
        self.iters = 0  # steps in the open window
        self.images = 0
        self.t0 = self.run_t0 = time.perf_counter()
        self.start_it = 0

    def start(self, trainer: Trainer) -> None:
        self.images, self.t0, self.run_t0 = 0, time.perf_counter(), time.perf_counter()
        self.start_it = trainer.iteration

    def state(self) -> list[Any]:
        return [dict(self.window), self.iters]

    def load_state(self, window: list[Any]) -> None:
        self.window = {str(k): float(v) for k, v in window[0].items()}
        self.iters = int(window[1])

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        self.images += result.images
        self.iters += 1
        for k, v in result.values.items():
            self.window[k] = self.window.get(k, 0.0) + v
        if trainer.iteration % self.log_every and not trainer.last_step:
            trainer.display.advance(trainer.iteration)
            return
        dt = time.perf_counter() - self.t0
        avg = mean_across({k: v / self.iters for k, v in self.window.items()}, trainer.info)
        rec: dict[str, Any] = {"type": "train", "iter": trainer.iteration, "epoch": trainer.epoch,
                               "lr": result.lrs[0], **avg, "img_s": self.images / max(dt, 1e-9)}
        for name, norm in result.norms.items():
            rec[f"grad_norm_{name}" if len(result.norms) > 1 else "grad_norm"] = norm
        if trainer.optim_step.use_scaler:
            rec["amp_scale"] = float(trainer.optim_step.scaler.get_scale())
        trainer.log(rec)
        per_it = (time.perf_counter() - self.run_t0) / max(trainer.iteration - self.start_it, 1)
        trainer.display.update(trainer.iteration, f"loss {avg['loss']:.4f}  lr {result.lrs[0]:.2e}  "
                               f"{rec['img_s']:.1f} img/s", per_it * (trainer.cfg.iters - trainer.iteration))
        self.window, self.iters, self.images, self.t0 = {}, 0, 0, time.perf_counter()


def at_validation(trainer: Trainer, every: int) -> bool:
    """Whether this step validates (and checkpoints): every ``every`` steps and at the last one."""
    return trainer.iteration % every == 0 or trainer.last_step


class Validation:
    """Evaluate each deploy model every ``val_every`` steps and at the last step, and log the results."""

    def __init__(self, val_every: int) -> None:
        self.val_every = val_every

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        if not at_validation(trainer, self.val_every):
            return
        results = trainer.validate()
        for name, res in results.items():
            trainer.log({"type": "val", "iter": trainer.iteration, "model": name,
                         **{k: v for k, v in res.items() if k != "per_class_iou"},
                         "per_class_iou": res.get("per_class_iou")})
            trainer.note(f"val @ {trainer.iteration}: {trainer.label(name)} mIoU {100 * res['miou']:.2f}  "
                         f"aAcc {100 * res['aacc']:.2f}")
        trainer.last_results = results


class Checkpointing:
    """After each validation: ``last`` (and ``best`` when the val mIoU improved) per deploy model, then the resume
    state (:meth:`Trainer.checkpoint`), so a resume restarts from a validated step."""

    def __init__(self, val_every: int) -> None:
        self.val_every = val_every

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        if at_validation(trainer, self.val_every):
            trainer.checkpoint(trainer.last_results)
