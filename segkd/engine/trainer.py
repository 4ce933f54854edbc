"""The one training loop, used by ``segkd train`` (a :class:`SupervisedTask`) and by ``distill``/``collab`` tasks.

Iteration-based: ``iters`` optimiser steps, each over ``accum`` micro-batches of ``batch`` images (summed over the
processes), poly LR after a linear warm-up, optional AMP (bf16 autocast on CPU; fp16 with a GradScaler on CUDA),
clipping, channels_last, DDP under torchrun. Every ``val_every`` iterations (and at the end) each deploy model is
evaluated and written as ``last`` and, when its val mIoU improved, ``best`` checkpoint, then the resume state.

Run directory::

    run.json          the TrainConfig, environment, and (at the end) the summary
    config.yaml       the resolved options: ``--config RUN/config.yaml --out NEW`` repeats the run
    metrics.jsonl     one JSON object per line: {"type": "train", "iter", "lr", "loss", <every term>, "img_s"},
                      {"type": "val", "iter", "model", "miou", ...}
    last.safetensors  best.safetensors        (peer_last / peer_best for a second deploy model)
    resume.pt         everything --resume needs for an exact continuation

Exactness: the data order is a seeded permutation per epoch plus the number of global batches already taken in
that epoch (:class:`~segkd.engine.distributed.StepSampler`), augmentation is seeded per (seed, epoch, index) by the
dataset, the LR is a function of the iteration, and the RNG states of every rank are saved; so on CPU an
interrupted-and-resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from segkd.checkpoint import IMAGENET_MEAN, IMAGENET_STD, CheckpointMeta, atomic_write_text, save_checkpoint
from segkd.data.transforms import collate_pairs
from segkd.engine.config import MACHINE_OPTIONS, TrainConfig, parse_scale, write_resolved_config
from segkd.engine.display import Display
from segkd.engine.distributed import (
    DistInfo,
    ShardSampler,
    StepSampler,
    any_rank,
    barrier,
    broadcast_buffers,
    cleanup_distributed,
    gather_objects,
    init_distributed,
)
from segkd.engine.hooks import CallbackHook, Checkpointing, Hook, TrainLog, Validation
from segkd.engine.optim_step import OptimizerStep, StepResult
from segkd.engine.schedule import lr_factor
from segkd.engine.seeding import weights_sha256
from segkd.engine.state import RESUME_FILE, capture_rng, load_resume, resolve_resume_path, restore_rng, save_resume
from segkd.engine.task import SupervisedTask, Task, build_optimizer, supports_aux
from segkd.errors import SegkdError
from segkd.shapes import parse_hw, size_from_options

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
# what a validation contributes to metrics.jsonl and checkpoint metadata (the confusion matrix stays out)
VAL_KEYS = ("miou", "aacc", "macc", "fwiou", "mdice", "n_images", "per_class_iou", "per_class_acc")


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


def prepare_data(cfg: TrainConfig, info: DistInfo | None = None) -> DataBundle:
    """Build and validate the train/val datasets of ``cfg`` (bad files fail here, naming the file)."""
    from segkd.data import (
        build_dataset,
        build_eval_transform,
        build_train_transform,
        resolve_data_root,
        validate_dataset,
    )

    root = resolve_data_root(cfg.data)
    crop = parse_hw(cfg.crop, "--crop") if cfg.crop else None
    resize = parse_hw(cfg.resize, "--resize") if cfg.resize else None
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    train_tf = build_train_transform(crop=crop, scale=parse_scale(cfg.scale), flip=cfg.flip, jitter=cfg.jitter,
                                     resize=resize, mean=mean, std=std, ignore_index=cfg.ignore_index)
    eval_tf = build_eval_transform(resize=resize, mean=mean, std=std, resize_labels=cfg.val_labels == "resized")
    common = {"fmt": cfg.data_format, "num_classes": cfg.num_classes, "ignore_index": cfg.ignore_index}
    train = build_dataset(root, cfg.train_split, transform=train_tf, seed=cfg.seed, **common)
    val = build_dataset(root, cfg.val_split, transform=eval_tf, seed=cfg.seed, **common)
    error: SegkdError | None = None
    if info is None or info.is_main:  # one scan is enough; the other ranks learn the outcome below
        try:
            validate_dataset(train, full=True, progress=cfg.progress)
            validate_dataset(val, full=True, progress=cfg.progress)
        except SegkdError as e:
            error = e
    if info is not None and any_rank(error is not None, info):
        raise error or SegkdError("the dataset failed validation (see rank 0)")
    if error is not None:
        raise error
    ds_info = train.info
    return DataBundle(train, val, ds_info.num_classes, list(ds_info.class_names),
                      [list(c) for c in ds_info.palette], ds_info.ignore_index, mean, std)


class TrainingInterrupted(SegkdError):
    """Ctrl-C / SIGTERM: the resumable state was saved; exit code 130 like an interrupted shell command."""

    exit_code = 130


class NonFiniteLoss(SegkdError):
    """A NaN/Inf loss or gradient: the run stops, the last good checkpoint is kept untouched."""


class _TaskModule(nn.Module):
    """All trainable parts under one module so one DDP wrapper covers them; forward = ``task.losses``."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({name: p.module for name, p in task.parts().items()})
        object.__setattr__(self, "_task", task)  # not a submodule: frozen teachers stay out of DDP

    def forward(self, images: Tensor, labels: Tensor, extras: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        if extras:
            return self._task.losses(images, labels, extras)  # type: ignore[call-arg]
        return self._task.losses(images, labels)


def _ignore_sigint_in_worker(_: int) -> None:
    # Ctrl-C reaches the whole process group; workers must survive it so the main process can stop cleanly
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ckpt_name(model_name: str, kind: str) -> str:
    """``last.safetensors`` for the student; ``peer_last.safetensors`` for any other deploy model."""
    return f"{kind}.safetensors" if model_name == "student" else f"{model_name}_{kind}.safetensors"


def deploy_state(model: nn.Module) -> dict[str, Tensor]:
    """The deployable weights: the training-only auxiliary head (DeepLabV3 ``aux_classifier``) is left out."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("aux_classifier.")}


def deploy_param_count(model: nn.Module) -> int:
    """Parameters of the deployable model: the one definition run.json, distill.json and ``segkd bench`` report
    (buffers such as BatchNorm statistics are not parameters; the training-only aux head is left out)."""
    return sum(p.numel() for k, p in model.named_parameters() if not k.startswith("aux_classifier."))


class Trainer:
    """Runs a :class:`~segkd.engine.task.Task` for ``cfg.iters`` iterations; see the module docstring.

    The loop (:meth:`fit`) is short: each iteration is one :class:`~segkd.engine.optim_step.OptimizerStep`, then the
    hooks of :mod:`segkd.engine.hooks` (user callbacks, the train log, validation, checkpoints) in that order.
    ``cfg`` is taken as checked (:func:`start_run` checks it once)."""

    def __init__(self, task: Task, cfg: TrainConfig, data: DataBundle, info: DistInfo | None = None,
                 callbacks: Sequence[Callable[[Trainer, int], None]] = (), source: str = "segkd train") -> None:
        self.task, self.cfg, self.data = task, cfg, data
        self.info = info or DistInfo(device=torch.device("cpu"))
        self.device = self.info.device
        self.source = source
        self.out = Path(cfg.out)
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
        self.train_log = TrainLog(cfg.log_every)
        self.hooks: list[Hook] = [*(CallbackHook(cb) for cb in callbacks), self.train_log, Validation(cfg.val_every),
                                  Checkpointing(cfg.val_every)]
        self.iteration = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []
        self.last_results: dict[str, dict[str, Any]] = {}
        self.display = Display(cfg.iters, 0, enabled=False, rich_ok=False)  # replaced when fit() starts
        self.run_images = 0
        self._stop_requested = False
        self._wrapped: nn.Module | None = None
        self._metrics_fh = None
        self._provenance: dict[str, Any] | None = None
        # sha256 of each deploy model's weights as built, before any step (run_task sets it; run.json records it)
        self.initial_weights: dict[str, str] = {}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self.optim_step.optimizers

    @property
    def last_step(self) -> bool:
        return self.iteration == self.cfg.iters

    # ------------------------------------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """The resume state (rank-local parts; RNG states of every rank gathered)."""
        rngs = gather_objects(capture_rng(), self.info)
        return {
            "iteration": self.iteration,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "world_size": self.info.world_size,
            "config": asdict(self.cfg),
            "parts": {n: p.module.state_dict() for n, p in self.parts.items()},
            **self.optim_step.state_dict(),
            "task": self.task.extra_state(),
            "rng": rngs,
            "best": self.best,
            "log_window": gather_objects(self.train_log.state(), self.info),
        }

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
        self.best = dict(state.get("best", {}))
        windows = state.get("log_window") or [[{}, 0]]
        self.train_log.load_state(windows[self.info.rank] if len(windows) == self.info.world_size else windows[0])
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            restore_rng(rngs[self.info.rank])
        else:
            restore_rng(rngs[0])
            torch.manual_seed(self.cfg.seed + 7919 * self.info.rank + self.iteration)
            self.note(f"warning: resuming a {len(rngs)}-process run on {self.info.world_size} processes: data order "
                      "is kept, dropout randomness is not (the result will not be bit-identical)")

    # ------------------------------------------------------------------------------------------------- data
    def _batches(self) -> Iterator[tuple[Tensor, Tensor, dict[str, Tensor]]]:
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
                                worker_init_fn=_ignore_sigint_in_worker if cfg.workers > 0 else None)
            for batch in loader:
                self.step_in_epoch += 1
                yield batch[0], batch[1], (batch[2] if len(batch) > 2 else {})
            self.epoch += 1
            self.step_in_epoch = 0

    def _val_loader(self) -> DataLoader | None:
        if self.data.val is None:
            return None
        n = len(self.data.val)  # type: ignore[arg-type]
        sampler = ShardSampler(n, self.info.rank, self.info.world_size)
        return DataLoader(self.data.val, batch_size=self.cfg.val_batch, sampler=sampler,
                          num_workers=self.cfg.workers, generator=torch.Generator().manual_seed(0),
                          worker_init_fn=_ignore_sigint_in_worker if self.cfg.workers > 0 else None)

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
        """Append a record to the history and (rank 0) to metrics.jsonl, fsynced."""
        self.history.append(record)
        if self.info.is_main and self._metrics_fh is not None:
            from segkd.provenance import now

            stamped = {**record, "time": now(), "unix_time": round(time.time(), 3)}  # when each line was logged
            self._metrics_fh.write(json.dumps(stamped, default=float) + "\n")
            self._metrics_fh.flush()
            os.fsync(self._metrics_fh.fileno())

    def _open_metrics_log(self) -> None:
        """Open metrics.jsonl for appending; on resume, first drop records past the resumed iteration (and any torn
        last line from a crash), rewriting the file atomically, so the log reads as one uninterrupted run."""
        path = self.out / METRICS_FILE
        if path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if int(rec.get("iter", 0)) <= self.iteration:
                    kept.append(json.dumps(rec))
            atomic_write_text(path, "".join(k + "\n" for k in kept))
        self._metrics_fh = open(path, "a")  # noqa: SIM115 - closed in fit()

    def write_run_json(self, summary: dict[str, Any] | None = None) -> None:
        if not self.info.is_main:
            return
        from segkd.provenance import provenance

        if self._provenance is None:  # the start of the run: kept when the summary is added at its end
            self._provenance = provenance(self.device)
        doc = {
            "command": self.source,
            "segkd_version": self._provenance["environment"]["segkd"],
            **self._provenance,
            "config": asdict(self.cfg),
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
        if summary is not None:
            doc["summary"] = summary
        atomic_write_text(self.out / RUN_FILE, json.dumps(doc, indent=2, default=str) + "\n")

    def _meta(self, name: str, model: nn.Module, metrics: dict[str, Any]) -> CheckpointMeta:
        extra = {}
        if hasattr(self.task, "checkpoint_meta"):
            extra = dict(self.task.checkpoint_meta().get(name, {}))  # type: ignore[attr-defined]
        merged_metrics = {**extra.pop("metrics", {}), **metrics}
        return CheckpointMeta(
            model=getattr(model, "zoo_name", type(model).__name__), num_classes=self.data.num_classes,
            class_names=self.data.class_names, palette=self.data.palette, mean=self.data.mean, std=self.data.std,
            ignore_index=self.data.ignore_index, args=asdict(self.cfg), metrics=merged_metrics,
            input_size=size_from_options(asdict(self.cfg)).record(), source=self.source, **extra,
        )

    # ----------------------------------------------------------------------------------------------- validate
    def validate(self) -> dict[str, dict[str, Any]]:
        """Evaluate every deploy model on the val set (confusion matrices all-reduced under DDP)."""
        from segkd.engine.evaluate import evaluate
        from segkd.engine.inference import make_predictor

        loader = self._val_loader()
        results: dict[str, dict[str, Any]] = {}
        self.task.train(False)
        for name, model in self.task.deploy_models().items():
            broadcast_buffers(model, self.info)
            if loader is None:
                continue
            res = evaluate(make_predictor(model, mode="whole"), loader, self.data.num_classes,
                           self.data.ignore_index, self.device, distributed=self.info.enabled, progress=False)
            full = res.to_dict()
            results[name] = {k: full[k] for k in VAL_KEYS if k in full}
        self.task.train(True)
        return results

    def checkpoint(self, results: dict[str, dict[str, Any]]) -> None:
        """Write last (+ best when improved) for each deploy model, then the resume state (files: rank 0 only).

        Weights are checked to be finite first: a diverged model never replaces a good checkpoint."""
        for name, model in self.task.deploy_models().items():
            bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
            if bad:
                raise NonFiniteLoss(f"non-finite weights in {name} ({bad[0]}) at iteration {self.iteration}; training "
                                    "stopped and the previous checkpoints are kept (try a lower --lr or --clip-grad)")
        for name, model in self.task.deploy_models().items():
            res = results.get(name, {})
            metrics = {"iteration": self.iteration, **res}
            if self.info.is_main:
                save_checkpoint(self.out / ckpt_name(name, "last"), deploy_state(model),
                                self._meta(name, model, metrics))
            miou = res.get("miou")
            if miou is not None and (name not in self.best or miou > self.best[name]["miou"]):
                self.best[name] = {"miou": float(miou), "iteration": self.iteration,
                                   "path": str(self.out / ckpt_name(name, "best"))}
                if self.info.is_main:
                    save_checkpoint(self.out / ckpt_name(name, "best"), deploy_state(model),
                                    self._meta(name, model, metrics))
        self.save_resume()

    def save_resume(self) -> Path:
        state = self.state()  # collective (RNG gather): every rank calls it
        path = self.out / RESUME_FILE
        if self.info.is_main:
            save_resume(path, state)
        return path

    # ------------------------------------------------------------------------------------------------- train
    def _forward_module(self) -> nn.Module:
        if self._wrapped is None:
            module = _TaskModule(self.task)
            if self.info.enabled:
                from torch.nn.parallel import DistributedDataParallel as DDP

                # Depthwise convs with one input channel get grads whose size-1 dim has another stride than the
                # bucket view; the reducer warns on every step although the layouts are equivalent (a plain copy).
                warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
                ids = [self.device.index] if self.device.type == "cuda" else None
                module = DDP(module, device_ids=ids,
                             find_unused_parameters=bool(getattr(self.task, "find_unused_parameters", False)),
                             gradient_as_bucket_view=True)
            self._wrapped = module
        return self._wrapped

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
        old: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop_requested = True

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no handlers, KeyboardInterrupt behaves as usual
            pass
        return old

    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.iters``; returns the summary (also written to run.json)."""
        self._begin()
        old_signals = self._install_signals()
        t_start = time.perf_counter()
        try:
            while self.iteration < self.cfg.iters:
                result = self.step()
                for hook in self.hooks:
                    hook.after_step(self, result)
                self._stop_if_requested()
        finally:
            self._end(old_signals)
        self._drop_unkept()
        summary = self.summary(time.perf_counter() - t_start, self.run_images)
        self.write_run_json(summary)
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
        """Run directory, metrics log, run.json, progress display, train mode, the batch stream, the hooks."""
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._open_metrics_log()
            self.write_run_json()
            write_resolved_config(self.cfg, self.out, self.source)
        # the bar only on a terminal and without --no-progress; plain periodic lines otherwise (never silence)
        self.display = Display(self.cfg.iters, self.iteration, self.info.is_main,
                               rich_ok=self.cfg.progress and sys.stderr.isatty())
        self._forward_module()
        self.task.train(True)
        self._batch_iter = self._batches()
        for hook in self.hooks:
            if hasattr(hook, "start"):
                hook.start(self)

    def _end(self, old_signals: dict[int, Any]) -> None:
        for sig, h in old_signals.items():
            signal.signal(sig, h)
        self.display.close()
        if self._metrics_fh is not None:
            self._metrics_fh.close()
            self._metrics_fh = None

    def _stop_if_requested(self) -> None:
        """After Ctrl-C / SIGTERM (on any rank): save the resume state and stop with the command that continues."""
        if any_rank(self._stop_requested, self.info) and not self.last_step:
            path = self.save_resume()
            raise TrainingInterrupted(
                f"interrupted at iteration {self.iteration}/{self.cfg.iters}; resumable state saved to {path}; "
                f"continue with: {self.source} --resume {self.out}")

    def _drop_unkept(self) -> None:
        """At the end of a finished run, delete what ``--keep`` leaves out (a ResNet run's resume state alone is
        three times its checkpoint)."""
        if not self.info.is_main:
            return
        keep = self.cfg.kept()
        for kind in ("best", "last"):
            if kind not in keep:
                for name in self.task.deploy_models():
                    (self.out / ckpt_name(name, kind)).unlink(missing_ok=True)
        if "resume" not in keep:
            (self.out / RESUME_FILE).unlink(missing_ok=True)

    def summary(self, wall: float, images: int) -> dict[str, Any]:
        results = self.last_results
        keep = self.cfg.kept()
        files = [self.out / ckpt_name(n, k) for n in self.task.deploy_models() for k in ("last", "best") if k in keep]
        files += [self.out / RESUME_FILE] * ("resume" in keep) + [self.out / METRICS_FILE]
        return {
            "out": str(self.out),
            "rank": self.info.rank,
            "world_size": self.info.world_size,
            "iterations": self.iteration,
            "wall_time_s": round(wall, 3),
            "img_s": round(images / max(wall, 1e-9), 3),
            "final": {n: {k: v for k, v in r.items()} for n, r in results.items()},
            "models": {n: getattr(m, "zoo_name", type(m).__name__) for n, m in self.task.deploy_models().items()},
            "best": self.best,
            "checkpoints": {n: {k: str(self.out / ckpt_name(n, k)) for k in ("last", "best") if k in keep}
                            for n in self.task.deploy_models()},
            "files": {str(p): p.stat().st_size for p in files if p.is_file()},  # what the run left, in bytes
            "resume": str(self.out / RESUME_FILE),
            "metrics_log": str(self.out / METRICS_FILE),
        }


# ------------------------------------------------------------------------------------------------ entry points
def finished_run(out: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` of a run directory whose run has finished (it then holds a ``summary``), else None."""
    path = Path(out) / RUN_FILE
    if path.exists():
        doc = json.loads(path.read_text())
        if "summary" in doc:
            return doc
    return None


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def start_run(cfg: TrainConfig, resume: str | Path | None) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The config to run with and the resume state: on ``--resume`` the saved config wins, except for the options
    that describe the machine (device, workers, progress, log interval, threads), which come from ``cfg``."""
    if resume is None:
        cfg.check()
        out = Path(cfg.out)
        # a run that saved a resume state is never overwritten; one that died before that is restarted
        _refuse_finished(out, "choose another --out")
        if (out / RESUME_FILE).exists():
            raise SegkdError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
        if any(out.glob("*.safetensors")):
            if not (out / RUN_FILE).is_file():
                raise SegkdError(f"{out} holds checkpoints that are not a segkd run; choose another --out")
            _start_note(f"note: {out} holds a run stopped before its first resume state was saved: starting it again "
                        "from iteration 0 (its checkpoints will be replaced)")
        return cfg, None
    if Path(resume).is_dir() and not (Path(resume) / RESUME_FILE).exists() and (Path(resume) / RUN_FILE).is_file():
        _refuse_finished(Path(resume), "it cannot be continued")
        return _restart_config(cfg, Path(resume)), None
    path = resolve_resume_path(resume)
    state = load_resume(path)
    saved = type(cfg).from_dict(state["config"])
    for name in MACHINE_OPTIONS:
        setattr(saved, name, getattr(cfg, name))
    saved.out = str(path.parent)
    saved.check()
    return saved, state


def _refuse_finished(run_dir: Path, advice: str) -> None:
    """A finished run is never restarted over its results (whether or not ``--keep`` kept its resume state)."""
    try:
        finished = "summary" in json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return
    if finished:
        kept = "" if (run_dir / RESUME_FILE).exists() else " (its resume state was not kept)"
        raise SegkdError(f"{run_dir} holds a finished run{kept}; {advice}")


def _start_note(text: str) -> None:
    """One line on stderr from the process that owns the run directory (rank 0 under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, file=sys.stderr, flush=True)


def _restart_config(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """``--resume`` of a run killed before its first resume state (e.g. during its first checkpoint): what it did
    cannot be continued exactly, so it restarts from iteration 0 with the settings its run.json recorded."""
    try:
        saved = type(cfg).from_dict(json.loads((run_dir / RUN_FILE).read_text())["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise SegkdError(f"{run_dir / RUN_FILE}: not a readable segkd run.json ({e})") from None
    for name in MACHINE_OPTIONS:
        setattr(saved, name, getattr(cfg, name))
    saved.out = str(run_dir)
    saved.check()
    _start_note(f"note: {run_dir} has no resume state (the run stopped before its first one was saved): restarting "
                "it from iteration 0 with the settings of its run.json")
    return saved


def run_dir_of(cfg: TrainConfig, resume: str | Path | None) -> Path:
    """The directory a run writes: ``--out``, or the ``--resume`` directory (the folder of a resume file)."""
    if resume is None:
        return Path(cfg.out)
    return Path(resume).parent if Path(resume).is_file() else Path(resume)


def check_input_sizes(cfg: TrainConfig, task: Task) -> None:
    """--crop (what is trained on) and --resize (what is validated on) against every model's stride, before
    anything is written: a SegFormer cannot take a side below 32."""
    from segkd.shapes import check_min_size, model_stride

    models = dict(task.deploy_models())
    teacher = getattr(task, "teacher", None)
    if isinstance(teacher, nn.Module):
        models["teacher"] = teacher
    for opt in ("crop", "resize"):
        if getattr(cfg, opt):
            for model in models.values():
                check_min_size(parse_hw(getattr(cfg, opt), f"--{opt}"), model_stride(model), f"--{opt}",
                               getattr(model, "zoo_name", type(model).__name__))


def _kept_state(run_dir: Path) -> str:
    """What a run stopped by an OSError leaves to continue from (for its one-line error)."""
    path = run_dir / RESUME_FILE
    try:
        iteration = load_resume(path)["iteration"] if path.is_file() else None
    except SegkdError:
        iteration = None
    if iteration is None:
        return "training stopped before any resume state was saved"
    return f"training stopped; {path} (iteration {iteration}) is intact: continue with --resume {run_dir}"


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The zoo model of ``cfg`` (with DeepLabV3's aux head when ``aux_weight > 0``)."""
    from segkd.models import create_model

    kwargs: dict[str, Any] = {}
    if cfg.aux_weight > 0 and supports_aux(cfg.model):
        kwargs["aux"] = True
    return create_model(cfg.model, num_classes=num_classes, pretrained=cfg.pretrained, **kwargs)


Callback = Callable[["Trainer", int], None]


class TaskBuilder(Protocol):
    """How a command turns its config into a task, in three steps :func:`run_task` calls once each:

    ``check(cfg)`` after the config's own checks and before any data is read (names, options, pairs: fail fast);
    ``prepare(cfg, info)`` the datasets (:func:`prepare_data`, or with distillation extras);
    ``build(cfg, data, info)`` the models and the task, under the run seed so every rank starts identical.
    A builder may keep what one step made for the next (the method options, a teacher loaded for its cache).
    ``source(cfg)`` names the command in run.json and the checkpoints (``segkd distill --method c2vkd``).
    """

    def source(self, cfg: TrainConfig) -> str: ...

    def check(self, cfg: TrainConfig) -> None: ...

    def prepare(self, cfg: TrainConfig, info: DistInfo) -> DataBundle: ...

    def build(self, cfg: TrainConfig, data: DataBundle, info: DistInfo) -> Task: ...


@dataclass
class Run:
    """What :func:`run_task` ran: the summary (also in run.json), the task with its trained models, the config as
    resolved (the saved one on ``--resume``) and the data."""

    summary: dict[str, Any]
    task: Task
    cfg: TrainConfig
    data: DataBundle


class SupervisedBuilder:
    """``segkd train``: one zoo model (with DeepLabV3's aux head when ``aux_weight > 0``) and pixel CE."""

    def source(self, cfg: TrainConfig) -> str:
        return "segkd train"

    def check(self, cfg: TrainConfig) -> None:
        from segkd.models import MODELS

        MODELS.canonical(cfg.model)  # unknown model: fail before any data is read

    def prepare(self, cfg: TrainConfig, info: DistInfo) -> DataBundle:
        return prepare_data(cfg, info)

    def build(self, cfg: TrainConfig, data: DataBundle, info: DistInfo) -> Task:
        from segkd.engine.seeding import build_student

        model = build_student(cfg.seed, lambda: build_model(cfg, data.num_classes))
        return SupervisedTask(model, data.ignore_index, cfg.aux_weight, cfg.optim())


def run_task(cfg: TrainConfig, builder: TaskBuilder, resume: str | Path | None = None,
             callbacks: Sequence[Callback] = (), data: DataBundle | None = None) -> Run:
    """Run any task on the shared engine: the entry point of ``train`` and ``distill``; returns what it built.

    The run directory is locked for the whole run (a second run on it is refused), temp files of writes killed
    earlier are removed, and an ``OSError`` (read-only, disk full) becomes one line saying what is kept.
    ``data`` may be given to train on in-memory datasets (tests, notebooks) instead of ``builder.prepare``.
    """
    from segkd.runlock import acquire_run_lock
    from segkd.safeio import os_error_message, remove_orphan_tmps

    run_dir = run_dir_of(cfg, resume)
    lock = acquire_run_lock(run_dir, "--out" if resume is None else "--resume",
                            enabled=int(os.environ.get("RANK", "0")) == 0)
    try:
        if lock.fd is not None:
            count, size = remove_orphan_tmps(run_dir)
            if count:
                _start_note(f"note: removed {count} temp file(s) ({size / 1e6:.1f} MB) left in {run_dir} by "
                            "interrupted writes")
        return _run_task_locked(cfg, builder, resume, callbacks, data)
    except OSError as e:
        raise SegkdError(f"{os_error_message(e)}; {_kept_state(run_dir)}") from None
    finally:
        lock.release()


def _run_task_locked(cfg: TrainConfig, builder: TaskBuilder, resume: str | Path | None,
                     callbacks: Sequence[Callback], data: DataBundle | None) -> Run:
    """:func:`run_task` once the run directory is locked.

    Order: config/resume checks (once, :func:`start_run`), ``builder.check``, process group (from torchrun's env),
    seeding, data (validated up front), ``builder.build``, optional SyncBatchNorm, rank-specific RNG streams,
    restored state on ``--resume``, then :meth:`Trainer.fit`. ``cfg`` may be a subclass of :class:`TrainConfig`
    holding a method's extra options.
    """
    cfg, state = start_run(cfg, resume)
    builder.check(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    try:
        if cfg.sync_bn and info.enabled and info.device.type != "cuda":
            raise SegkdError("--sync-bn needs CUDA: torch's SyncBatchNorm has no CPU implementation")
        seed_everything(cfg.seed)
        bundle = data if data is not None else builder.prepare(cfg, info)
        task = builder.build(cfg, bundle, info)
        check_input_sizes(cfg, task)
        if cfg.sync_bn and info.enabled:
            for part in task.parts().values():
                nn.SyncBatchNorm.convert_sync_batchnorm(part.module)  # converts the BN children in place
        torch.manual_seed(cfg.seed + 7919 * info.rank)  # rank-specific dropout / drop-path streams
        trainer = Trainer(task, cfg, bundle, info, callbacks, source=builder.source(cfg))
        trainer.initial_weights = {n: weights_sha256(m) for n, m in task.deploy_models().items()}
        if state is not None:
            if state["iteration"] >= cfg.iters:
                raise SegkdError(f"{cfg.out}: the run already finished ({state['iteration']}/{cfg.iters} iterations)")
            trainer.load_state(state)
        return Run(trainer.fit(), task, cfg, bundle)
    finally:
        cleanup_distributed(info)


def run_train(cfg: TrainConfig, resume: str | Path | None = None, callbacks: Sequence[Callback] = (),
              data: DataBundle | None = None) -> dict[str, Any]:
    """``segkd train``: supervised training of a zoo model (DDP when launched by torchrun); returns the summary.

    ``data`` may be given to train on in-memory datasets (tests, notebooks); otherwise ``cfg.data`` is read.
    """
    return run_task(cfg, SupervisedBuilder(), resume, callbacks, data).summary
