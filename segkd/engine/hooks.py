"""What the trainer does around each optimiser step, as hooks that own their policy and their resume state.

The :class:`~segkd.engine.trainer.Trainer` is the loop, its state and DDP; everything a run *keeps* is a hook's
(mmengine's idea, not its code). The default hooks, run in this order after every step (:func:`default_hooks`):

* :class:`CallbackHook`: the plain ``callback(trainer, iteration)`` functions of ``run_task`` (tests and notebooks
  use them to watch or interrupt a run); they run first.
* :class:`TrainLog`: averages the loss terms over a window of ``log_every`` steps, emits the ``train`` record and
  updates the progress display. Its open window is resume state, so the first record after ``--resume``
  averages the same steps as in an uninterrupted run.
* :class:`Validation`: every ``val_every`` steps and at the last one, evaluates each deploy model on the val set
  (confusion matrices all-reduced under DDP) and emits the ``val`` records.
* :class:`Checkpointing`: right after each validation, ``last`` (and ``best`` when the val mIoU improved) per
  deploy model, then the resume state; at the end, deletes what ``--keep`` leaves out. The best scores are its
  resume state.
* :class:`RunFiles`: ``metrics.jsonl`` (every record, fsynced; on resume cut back to the resumed iteration) and
  ``run.json`` (at the start, and with the summary at the end).

A hook subclasses :class:`Hook` and overrides what it needs: ``start``, ``after_step``, ``record`` (every record
the trainer logs), ``end`` (a finished run: add to the summary), ``close`` (always, last), and
``state_dict``/``load_state_dict`` (its part of the resume state: top-level keys of ``resume.pt``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from segkd import __version__
from segkd.checkpoint import CheckpointMeta, atomic_write_text, save_checkpoint
from segkd.engine.distributed import ShardSampler, broadcast_buffers, gather_objects, mean_across
from segkd.engine.evaluate import evaluate
from segkd.engine.inference import make_predictor
from segkd.engine.optim_step import StepResult
from segkd.engine.state import RESUME_FILE
from segkd.errors import SegkdError
from segkd.models import deploy_state
from segkd.provenance import now, provenance
from segkd.shapes import size_from_options

if TYPE_CHECKING:
    from segkd.engine.trainer import Trainer

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
# what a validation contributes to metrics.jsonl and checkpoint metadata (the confusion matrix stays out)
VAL_KEYS = ("miou", "aacc", "macc", "fwiou", "mdice", "n_images", "per_class_iou", "per_class_acc")


class NonFiniteLoss(SegkdError):
    """A NaN/Inf loss, gradient or weight: the run stops, the last good checkpoint is kept untouched."""


def ckpt_name(model_name: str, kind: str) -> str:
    """``last.safetensors`` for the student; ``peer_last.safetensors`` for any other deploy model."""
    return f"{kind}.safetensors" if model_name == "student" else f"{model_name}_{kind}.safetensors"


def worker_init(workers: int) -> Callable[[int], None] | None:
    """DataLoader workers ignore Ctrl-C (it reaches the whole process group) so the main process stops cleanly."""
    return _ignore_sigint if workers > 0 else None


def _ignore_sigint(_: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def at_validation(trainer: Trainer, every: int) -> bool:
    """Whether this step validates (and checkpoints): every ``every`` steps and at the last one."""
    return trainer.iteration % every == 0 or trainer.last_step


class Hook:
    """A hook that does nothing; subclasses override what they need (see the module docstring)."""

    def start(self, trainer: Trainer) -> None:
        """The run (re)starts: after the resume state was loaded, before the first step."""

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        """One optimiser step was taken (``trainer.iteration`` counts it)."""

    def record(self, trainer: Trainer, rec: dict[str, Any]) -> None:
        """A record the trainer logged (``train``, ``val``, ``error``)."""

    def end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """The run finished: complete ``summary`` (hooks run in order; the last one sees everything)."""

    def close(self, trainer: Trainer) -> None:
        """Always called when ``fit`` leaves, finished or not."""

    def state_dict(self, trainer: Trainer) -> dict[str, Any]:
        """This hook's part of the resume state (collective under DDP: every rank calls it)."""
        return {}

    def load_state_dict(self, trainer: Trainer, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""


class CallbackHook(Hook):
    """A ``callback(trainer, iteration)`` function as a hook."""

    def __init__(self, fn: Callable[[Trainer, int], None]) -> None:
        self.fn = fn

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        self.fn(trainer, trainer.iteration)


class TrainLog(Hook):
    """The ``train`` records and the progress line (see the module docstring)."""

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

    def state_dict(self, trainer: Trainer) -> dict[str, Any]:
        return {"log_window": gather_objects([dict(self.window), self.iters], trainer.info)}

    def load_state_dict(self, trainer: Trainer, state: dict[str, Any]) -> None:
        windows = state.get("log_window") or [[{}, 0]]
        info = trainer.info
        window = windows[info.rank] if len(windows) == info.world_size else windows[0]
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


class Validation(Hook):
    """Evaluate each deploy model every ``val_every`` steps and at the last step, and log the results."""

    def __init__(self, val_every: int) -> None:
        self.val_every = val_every
        self.results: dict[str, dict[str, Any]] = {}

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        if not at_validation(trainer, self.val_every):
            return
        self.results = self.validate(trainer)
        for name, res in self.results.items():
            trainer.log({"type": "val", "iter": trainer.iteration, "model": name,
                         **{k: v for k, v in res.items() if k != "per_class_iou"},
                         "per_class_iou": res.get("per_class_iou")})
            trainer.note(f"val @ {trainer.iteration}: {trainer.label(name)} mIoU {100 * res['miou']:.2f}  "
                         f"aAcc {100 * res['aacc']:.2f}")

    def validate(self, trainer: Trainer) -> dict[str, dict[str, Any]]:
        """Evaluate every deploy model on the val set (confusion matrices all-reduced under DDP)."""
        loader = self._loader(trainer)
        results: dict[str, dict[str, Any]] = {}
        trainer.task.train(False)
        for name, model in trainer.task.deploy_models().items():
            broadcast_buffers(model, trainer.info)
            if loader is None:
                continue
            res = evaluate(make_predictor(model, mode="whole"), loader, trainer.data.num_classes,
                           trainer.data.ignore_index, trainer.device, distributed=trainer.info.enabled,
                           progress=False)
            full = res.to_dict()
            results[name] = {k: full[k] for k in VAL_KEYS if k in full}
        trainer.task.train(True)
        return results

    @staticmethod
    def _loader(trainer: Trainer) -> DataLoader | None:
        data, cfg, info = trainer.data, trainer.cfg, trainer.info
        if data.val is None:
            return None
        sampler = ShardSampler(len(data.val), info.rank, info.world_size)  # type: ignore[arg-type]
        return DataLoader(data.val, batch_size=cfg.val_batch, sampler=sampler, num_workers=cfg.workers,
                          generator=torch.Generator().manual_seed(0), worker_init_fn=worker_init(cfg.workers))

    def end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        summary["final"] = {n: dict(r) for n, r in self.results.items()}


class Checkpointing(Hook):
    """The checkpoint policy: after each validation, ``last`` (and ``best`` when the val mIoU improved) per deploy
    model, then the resume state, so a resume restarts from a validated step; weights are checked finite first
    (a diverged model never replaces a good checkpoint). At the end, what ``keep`` leaves out is deleted (a ResNet
    run's resume state alone is three times its checkpoint)."""

    def __init__(self, validation: Validation, keep: set[str]) -> None:
        self.validation, self.keep = validation, keep
        self.best: dict[str, dict[str, Any]] = {}

    def state_dict(self, trainer: Trainer) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, trainer: Trainer, state: dict[str, Any]) -> None:
        self.best = dict(state.get("best", {}))

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        if at_validation(trainer, self.validation.val_every):
            self.checkpoint(trainer, self.validation.results)

    def checkpoint(self, trainer: Trainer, results: dict[str, dict[str, Any]]) -> None:
        """Write last (+ best when improved) for each deploy model, then the resume state (files: rank 0 only)."""
        models = trainer.task.deploy_models()
        for name, model in models.items():
            bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
            if bad:
                raise NonFiniteLoss(f"non-finite weights in {name} ({bad[0]}) at iteration {trainer.iteration}; "
                                    "training stopped and the previous checkpoints are kept (try a lower --lr or "
                                    "--clip-grad)")
        for name, model in models.items():
            res = results.get(name, {})
            meta = _meta(trainer, name, model, {"iteration": trainer.iteration, **res})
            if trainer.info.is_main:
                save_checkpoint(trainer.out / ckpt_name(name, "last"), deploy_state(model), meta)
            miou = res.get("miou")
            if miou is not None and (name not in self.best or miou > self.best[name]["miou"]):
                self.best[name] = {"miou": float(miou), "iteration": trainer.iteration,
                                   "path": str(trainer.out / ckpt_name(name, "best"))}
                if trainer.info.is_main:
                    save_checkpoint(trainer.out / ckpt_name(name, "best"), deploy_state(model), meta)
        trainer.save_resume()

    def end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        out, names = trainer.out, list(trainer.task.deploy_models())
        if trainer.info.is_main:
            for kind in ("best", "last"):
                for name in names if kind not in self.keep else ():
                    (out / ckpt_name(name, kind)).unlink(missing_ok=True)
            if "resume" not in self.keep:
                (out / RESUME_FILE).unlink(missing_ok=True)
        files = [out / ckpt_name(n, k) for n in names for k in ("last", "best") if k in self.keep]
        files += [out / RESUME_FILE] * ("resume" in self.keep)
        summary["best"] = self.best
        summary["checkpoints"] = {n: {k: str(out / ckpt_name(n, k)) for k in ("last", "best") if k in self.keep}
                                  for n in names}
        summary.setdefault("files", {}).update({str(p): p.stat().st_size for p in files if p.is_file()})
        summary["resume"] = str(out / RESUME_FILE)


def _meta(trainer: Trainer, name: str, model: torch.nn.Module, metrics: dict[str, Any]) -> CheckpointMeta:
    """The metadata of a deploy model's checkpoint: the data's classes and normalisation, the run's options, and
    what the task adds (``checkpoint_meta``: a distillation's method, teacher, adapter parameters)."""
    task, data = trainer.task, trainer.data
    extra = dict(task.checkpoint_meta().get(name, {})) if hasattr(task, "checkpoint_meta") else {}
    return CheckpointMeta(
        model=getattr(model, "zoo_name", type(model).__name__), num_classes=data.num_classes,
        class_names=data.class_names, palette=data.palette, mean=data.mean, std=data.std,
        ignore_index=data.ignore_index, args=trainer.config_dict(), metrics={**extra.pop("metrics", {}), **metrics},
        input_size=size_from_options(trainer.config_dict()).record(), source=trainer.source, **extra)


class RunFiles(Hook):
    """``metrics.jsonl`` and ``run.json`` (rank 0). ``header`` adds top-level keys to run.json (the runs layer's
    run id and provenance); the rest describes the trainer: config, world size, classes, parameter counts, the
    initial weights' sha256 and, at the end, the summary."""

    def __init__(self, header: dict[str, Any] | None = None) -> None:
        self.header = dict(header or {})
        self._fh: Any = None

    def start(self, trainer: Trainer) -> None:
        if trainer.info.is_main:
            if "environment" not in self.header:  # the start of the run: kept when the summary is added at its end
                self.header.update(segkd_version=__version__, **provenance(trainer.device))
            trainer.out.mkdir(parents=True, exist_ok=True)
            self._open(trainer.out / METRICS_FILE, trainer.iteration)
            self.write_run_json(trainer)

    def _open(self, path: Path, iteration: int) -> None:
        """Open metrics.jsonl for appending; on resume, first drop records past the resumed iteration (and any
        torn last line from a crash), rewriting the file atomically, so the log reads as one uninterrupted run."""
        if path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and int(rec.get("iter", 0)) <= iteration:
                    kept.append(json.dumps(rec))
            atomic_write_text(path, "".join(k + "\n" for k in kept))
        self._fh = open(path, "a")  # noqa: SIM115 - closed in close()

    def record(self, trainer: Trainer, rec: dict[str, Any]) -> None:
        if self._fh is None:
            return
        stamped = {**rec, "time": now(), "unix_time": round(time.time(), 3)}  # when each line was logged
        self._fh.write(json.dumps(stamped, default=float) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        path = trainer.out / METRICS_FILE
        if path.is_file():
            summary.setdefault("files", {})[str(path)] = path.stat().st_size
        summary["metrics_log"] = str(path)
        self.close(trainer)
        self.write_run_json(trainer, summary)

    def close(self, trainer: Trainer) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def write_run_json(self, trainer: Trainer, summary: dict[str, Any] | None = None) -> None:
        if not trainer.info.is_main:
            return
        doc = {**self.header, **trainer.describe()}
        if summary is not None:
            doc["summary"] = summary
        atomic_write_text(trainer.out / RUN_FILE, json.dumps(doc, indent=2, default=str) + "\n")


def default_hooks(log_every: int, val_every: int, keep: set[str], callbacks: tuple[Callable[..., None], ...] = (),
                  header: dict[str, Any] | None = None) -> list[Hook]:
    """The hooks of every run, in order: user callbacks, the train log, validation, checkpoints, run files."""
    validation = Validation(val_every)
    return [*(CallbackHook(cb) for cb in callbacks), TrainLog(log_every), validation,
            Checkpointing(validation, keep), RunFiles(header)]
