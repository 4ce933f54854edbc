"""Training tasks: what the trainer optimises, described without any training loop.

The Task protocol (how ``distill``/``collab`` plug into the one trainer)
-------------------------------------------------------------------------
A task is any object with:

``parts() -> dict[str, Part]``
    The trainable parts, by name (``"student"``; ``"peer"`` for online methods). A :class:`Part` holds one
    ``nn.Module`` with every trainable parameter of that part (e.g. ``nn.ModuleDict(student=..., adapters=...)``)
    and its :class:`OptimConfig`; each part gets its own optimiser. ``head_params`` (optional) are put in a group
    with ``lr * head_lr_mult``. A frozen teacher is *not* a part: keep it on the task, in eval mode, and run it
    under ``torch.inference_mode()``.
``losses(batch) -> dict[str, Tensor]``
    Named scalar loss terms for one micro-batch (a :class:`~segkd.engine.batch.Batch`: images, labels and what
    the data brought for a teacher); ``"loss"`` is their weighted sum, the one back-propagated. Every
    term is logged. It runs inside the trainer's autocast; it must only use the modules of ``parts()`` (plus frozen
    ones), because under DDP the trainer calls it through one ``DistributedDataParallel`` wrapping all parts.
``deploy_models() -> dict[str, SegModel]``
    What is evaluated and written as checkpoints (``"student"``; ``"peer"`` too for online methods): the bare zoo
    models, never the adapters.
``train(mode: bool)``
    Put the trainable parts in train/eval mode (frozen modules stay in eval mode).
``extra_state() -> dict`` / ``load_extra_state(state)``
    Non-parameter state to resume exactly (memory banks, counters), as plain tensors/numbers/lists/dicts.
    Parameters and buffers of the parts are saved by the trainer already.
``checkpoint_meta() -> dict[str, dict]`` (optional)
    Extra :class:`~segkd.checkpoint.CheckpointMeta` fields per deploy model (e.g. ``{"student": {"metrics":
    {"adapter_params": 123}}}``).
``find_unused_parameters(local_batch: int) -> bool`` (optional)
    Whether a step at ``local_batch`` images per process can leave a trainable parameter out of the loss's graph;
    passed to DDP (without it, such a parameter stops DDP at the next step; with it, every step pays a graph
    traversal, so answer True only when it can happen). Absent: False.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from segkd.engine.batch import Batch
from segkd.engine.losses import seg_cross_entropy
from segkd.errors import SegkdError
from segkd.models import MODELS, SegModel

OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    # AdamW: SegFormer's recipe (wd 0.01, head LR x10) with a higher base LR than its 6e-5, because segkd trains
    # from ImageNet-free initialisation on small data unless --pretrained is given. SGD: the DeepLab recipe.
    "adamw": {"lr": 2e-4, "weight_decay": 0.01, "head_lr_mult": 10.0},
    "sgd": {"lr": 0.01, "weight_decay": 5e-4, "head_lr_mult": 1.0},
}


@dataclass
class OptimConfig:
    """One part's optimiser. ``no_decay_1d`` exempts biases and norm weights (1-d tensors) from weight decay, as
    mmseg's SegFormer recipe does for norms (and as most ViT recipes do for biases too)."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = OPTIMIZER_DEFAULTS["adamw"]["lr"]  # the defaults are AdamW's, as OptimConfig.make("adamw") gives
    weight_decay: float = OPTIMIZER_DEFAULTS["adamw"]["weight_decay"]
    head_lr_mult: float = OPTIMIZER_DEFAULTS["adamw"]["head_lr_mult"]
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    no_decay_1d: bool = True

    @classmethod
    def make(cls, name: str, lr: float | None = None, weight_decay: float | None = None,
             head_lr_mult: float | None = None, **kw: Any) -> OptimConfig:
        """Defaults of the named optimiser, overridden by whatever is not None."""
        name = name.strip().lower()
        if name not in OPTIMIZER_DEFAULTS:
            raise SegkdError(f"--optimizer must be one of {', '.join(OPTIMIZER_DEFAULTS)}, got {name!r}")
        d = OPTIMIZER_DEFAULTS[name]
        return cls(name=name,  # type: ignore[arg-type]
                   lr=d["lr"] if lr is None else lr,
                   weight_decay=d["weight_decay"] if weight_decay is None else weight_decay,
                   head_lr_mult=d["head_lr_mult"] if head_lr_mult is None else head_lr_mult, **kw)


@dataclass
class Part:
    """A trainable part: its module (all of its trainable parameters) and optimiser settings."""

    module: nn.Module
    optim: OptimConfig
    head_params: list[nn.Parameter] = field(default_factory=list)


@runtime_checkable
class Task(Protocol):
    def parts(self) -> dict[str, Part]: ...

    def losses(self, batch: Batch) -> dict[str, Tensor]: ...

    def deploy_models(self) -> dict[str, SegModel]: ...

    def train(self, mode: bool = True) -> Any: ...

    def extra_state(self) -> dict[str, Any]: ...

    def load_extra_state(self, state: dict[str, Any]) -> None: ...


def build_optimizer(part: Part) -> torch.optim.Optimizer:
    """AdamW or SGD over the part's trainable parameters, in up to four groups (head/body x decay/no-decay).

    Every group carries ``initial_lr`` (its peak LR) so the schedule sets ``lr = initial_lr * factor``.
    """
    cfg = part.optim
    if cfg.lr <= 0:
        raise SegkdError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.weight_decay < 0:
        raise SegkdError(f"--wd must be >= 0, got {cfg.weight_decay}")
    head_ids = {id(p) for p in part.head_params} if cfg.head_lr_mult != 1.0 else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in part.module.parameters():
        if not p.requires_grad:
            continue
        key = (id(p) in head_ids, cfg.no_decay_1d and p.ndim <= 1)
        groups.setdefault(key, []).append(p)
    if not groups:
        raise SegkdError("the task has a part with no trainable parameters")
    param_groups = []
    for (is_head, no_decay), params in sorted(groups.items()):
        lr = cfg.lr * (cfg.head_lr_mult if is_head else 1.0)
        param_groups.append({"params": params, "lr": lr, "initial_lr": lr,
                             "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise SegkdError(f"--optimizer must be adamw or sgd, got {cfg.name!r}")


def supports_aux(model_name: str) -> bool:
    """Whether the zoo builder takes ``aux`` (DeepLabV3's FCN auxiliary head on layer3)."""
    build = MODELS.get(model_name).build
    return "aux" in inspect.signature(build).parameters


class NoExtraState:
    """For tasks whose whole state lives in their trainable parts (adapters included): nothing extra to save."""

    kind = "this task"

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            raise SegkdError(f"unexpected task state keys for {self.kind}: {sorted(state)}")


class SupervisedTask(NoExtraState):
    """Plain supervised training: pixel cross-entropy, plus ``aux_weight`` x CE of the auxiliary head when the
    model has one (DeepLabV3 built with ``aux=True``; torchvision and mmseg weight it 0.5 and 0.4)."""

    kind = "supervised training"

    def __init__(self, model: SegModel, ignore_index: int = 255, aux_weight: float = 0.4,
                 optim: OptimConfig | None = None) -> None:
        self.model = model
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        self.optim = optim or OptimConfig()
        self.has_aux = getattr(model, "aux_classifier", None) is not None and hasattr(model, "forward_aux")

    def parts(self) -> dict[str, Part]:
        return {"student": Part(self.model, self.optim, list(self.model.classifier_parameters()))}

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        images, labels = batch.images, batch.labels
        if self.has_aux and self.aux_weight > 0:
            logits, aux = self.model.forward_aux(images)  # type: ignore[operator]
            ce = seg_cross_entropy(logits, labels, self.ignore_index)
            aux_ce = self.aux_weight * seg_cross_entropy(aux, labels, self.ignore_index)
            return {"loss": ce + aux_ce, "loss_ce": ce, "loss_aux": aux_ce}
        ce = seg_cross_entropy(self.model(images), labels, self.ignore_index)
        return {"loss": ce, "loss_ce": ce}

    def deploy_models(self) -> dict[str, SegModel]:
        return {"student": self.model}

    def find_unused_parameters(self, local_batch: int) -> bool:
        """An auxiliary head built but weighted 0 gets no gradient."""
        return self.has_aux and self.aux_weight <= 0

    def train(self, mode: bool = True) -> SupervisedTask:
        self.model.train(mode)
        return self

