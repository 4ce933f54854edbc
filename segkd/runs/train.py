"""``segkd train`` and the run of any task: the runs layer composes the data, a task builder and the engine's loop.

One run, one build: :func:`run_task` opens the run directory (:mod:`segkd.runs.rundir`: lock, refusals, resume
binding), then calls the builder's ``check(cfg)`` (names, method options, the pair: before any data is read),
``prepare(cfg, info)`` (datasets) and ``build(cfg, data, info)`` (models and task) once each, writes config.yaml,
runs :meth:`~segkd.engine.trainer.Trainer.fit` and returns a :class:`Run`. :class:`SupervisedBuilder` is
``segkd train``'s; :class:`segkd.runs.distill.DistillBuilder` is ``segkd distill``'s.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from segkd.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from segkd.data import (
    build_dataset,
    build_eval_transform,
    build_train_transform,
    resolve_data_root,
    validate_dataset,
)
from segkd.engine.config import TrainConfig, parse_scale
from segkd.engine.distributed import DistInfo, any_rank, check_shared_dir, cleanup_distributed, init_distributed
from segkd.engine.seeding import build_student, weights_sha256
from segkd.engine.task import SupervisedTask, Task, supports_aux
from segkd.engine.trainer import Callback, DataBundle, Trainer
from segkd.errors import SegkdError
from segkd.models import MODELS, SegModel, create_model
from segkd.runs.rundir import RunStart, locked, open_run, run_dir_of, write_resolved_config
from segkd.shapes import check_min_size, model_stride, parse_hw


def prepare_data(cfg: TrainConfig, info: DistInfo | None = None) -> DataBundle:
    """Build and validate the train/val datasets of ``cfg`` (bad files fail here, naming the file)."""
    root = resolve_data_root(cfg.data)
    crop = parse_hw(cfg.crop, "--crop") if cfg.crop else None
    resize = parse_hw(cfg.resize, "--resize") if cfg.resize else None
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    train_tf = build_train_transform(crop=crop, scale=parse_scale(cfg.scale), flip=cfg.flip, jitter=cfg.jitter,
                                     resize=resize, mean=mean, std=std, ignore_index=cfg.ignore_index)
    eval_tf = build_eval_transform(resize=resize, mean=mean, std=std, resize_labels=cfg.val_labels == "resized")
    common = {"fmt": cfg.data_format, "num_classes": cfg.num_classes, "ignore_index": cfg.ignore_index,
              "img_suffix": cfg.img_suffix, "seg_suffix": cfg.seg_suffix}
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def check_input_sizes(cfg: TrainConfig, task: Task) -> None:
    """--crop (what is trained on) and --resize (what is validated on) against every model's stride, before
    anything is written: a SegFormer cannot take a side below 32."""
    models = dict(task.deploy_models())
    teacher = getattr(task, "teacher", None)
    if isinstance(teacher, nn.Module):
        models["teacher"] = teacher
    for opt in ("crop", "resize"):
        if getattr(cfg, opt):
            for model in models.values():
                check_min_size(parse_hw(getattr(cfg, opt), f"--{opt}"), model_stride(model), f"--{opt}",
                               getattr(model, "zoo_name", type(model).__name__))


def build_model(cfg: TrainConfig, num_classes: int) -> SegModel:
    """The zoo model of ``cfg`` (with DeepLabV3's aux head when ``aux_weight > 0``)."""
    kwargs: dict[str, Any] = {}
    if cfg.aux_weight > 0 and supports_aux(cfg.model):
        kwargs["aux"] = True
    return create_model(cfg.model, num_classes=num_classes, pretrained=cfg.pretrained, **kwargs)


class TaskBuilder(Protocol):
    """How a command turns its config into a task, in three steps :func:`run_task` calls once each:

    ``check(cfg)`` after the config's own checks and before any data is read (names, options, pairs: fail fast);
    ``prepare(cfg, info)`` the datasets (:func:`prepare_data`, or with distillation extras);
    ``build(cfg, data, info)`` the models and the task, under the run seed so every rank starts identical.
    A builder may keep what one step made for the next (the method options, a teacher loaded for its cache).
    ``command`` is ``segkd train`` or ``segkd distill`` (what a run directory belongs to); ``source(cfg)`` names
    the command in run.json and the checkpoints (``segkd distill --method c2vkd``).
    """

    command: str

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

    command = "segkd train"

    def source(self, cfg: TrainConfig) -> str:
        return self.command

    def check(self, cfg: TrainConfig) -> None:
        MODELS.canonical(cfg.model)  # unknown model: fail before any data is read

    def prepare(self, cfg: TrainConfig, info: DistInfo) -> DataBundle:
        return prepare_data(cfg, info)

    def build(self, cfg: TrainConfig, data: DataBundle, info: DistInfo) -> Task:
        model = build_student(cfg.seed, lambda: build_model(cfg, data.num_classes))
        return SupervisedTask(model, data.ignore_index, cfg.aux_weight, cfg.optim())


def run_task(cfg: TrainConfig, builder: TaskBuilder, resume: str | Path | None = None,
             callbacks: Sequence[Callback] = (), data: DataBundle | None = None, *,
             config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Run:
    """Run any task on the shared engine: the entry point of ``train`` and ``distill``; returns what it built.

    The run directory is locked for the whole run (a second run on it is refused), temp files of writes killed
    earlier are removed, and an ``OSError`` (read-only, disk full) becomes one line saying what is kept.
    ``data`` may be given to train on in-memory datasets (tests, notebooks) instead of ``builder.prepare``;
    ``config_file`` (the ``--config`` given) is never overwritten; ``overrides`` are the options typed with
    ``--resume`` (:func:`~segkd.runs.rundir.open_run`).
    """
    with locked(run_dir_of(cfg, resume), "--out" if resume is None else "--resume"):
        start = open_run(cfg, resume, builder.command, config_file, overrides)
        return _run_locked(start, builder, callbacks, data)


def _run_locked(start: RunStart, builder: TaskBuilder, callbacks: Sequence[Callback],
                data: DataBundle | None) -> Run:
    """:func:`run_task` once the run directory is locked and the start checked.

    Order: ``builder.check``, process group (from torchrun's env), seeding, data (validated up front),
    ``builder.build``, optional SyncBatchNorm, rank-specific RNG streams, restored state on ``--resume``,
    config.yaml, then :meth:`Trainer.fit`. ``cfg`` may be a subclass of :class:`TrainConfig` holding a method's
    extra options.
    """
    cfg, state = start.cfg, start.state
    builder.check(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    try:
        if cfg.sync_bn and info.enabled and info.device.type != "cuda":
            raise SegkdError("--sync-bn needs CUDA: torch's SyncBatchNorm has no CPU implementation")
        check_shared_dir(Path(cfg.out), info, "--out")
        seed_everything(cfg.seed)
        bundle = data if data is not None else builder.prepare(cfg, info)
        task = builder.build(cfg, bundle, info)
        check_input_sizes(cfg, task)
        if cfg.sync_bn and info.enabled:
            for part in task.parts().values():
                nn.SyncBatchNorm.convert_sync_batchnorm(part.module)  # converts the BN children in place
        torch.manual_seed(cfg.seed + 7919 * info.rank)  # rank-specific dropout / drop-path streams
        trainer = Trainer(task, cfg, bundle, info, callbacks, source=builder.source(cfg), run_info=start.run_info)
        trainer.initial_weights = {n: weights_sha256(m) for n, m in task.deploy_models().items()}
        if state is not None:
            trainer.load_state(state)
        if info.is_main:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            write_resolved_config(cfg, cfg.out, trainer.source, start.run_info.get("run_id"))
        return Run(trainer.fit(), task, cfg, bundle)
    finally:
        cleanup_distributed(info)


def run_train(cfg: TrainConfig, resume: str | Path | None = None, callbacks: Sequence[Callback] = (),
              data: DataBundle | None = None, **run_options: Any) -> dict[str, Any]:
    """``segkd train``: supervised training of a zoo model (DDP when launched by torchrun); returns the summary.

    ``data`` may be given to train on in-memory datasets (tests, notebooks); otherwise ``cfg.data`` is read.
    ``run_options``: ``config_file`` and ``overrides`` of :func:`run_task`.
    """
    return run_task(cfg, SupervisedBuilder(), resume, callbacks, data, **run_options).summary
