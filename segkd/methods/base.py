"""What every distillation method shares: its spec, the registry, pair checks, options and logit alignment.

Calling convention (docs/architecture.md)
-----------------------------------------
A method is an ``nn.Module`` holding only its training-only adapters (projections, CSF, PEA, attention pool...).
``method(images, labels, outs)`` takes the batch and ``outs``, a dict mapping roles (``"student"``, ``"teacher"``,
``"peer"``) to :class:`~segkd.models.SegOutput` with the taps the spec declared, and returns a dict of **weighted**
loss terms, e.g. ``{"kd": 1.0 * L_kd, "ce": L_ce}``, as :class:`Terms`: a dict of the weighted terms whose ``raw``
attribute holds the unweighted values, detached (same keys). The caller (the task) sums the weighted terms into
``"loss"`` and logs both, as ``loss_<name>`` (weighted) and ``raw_<name>`` (raw); nothing is stashed on the method
between calls. Whether cross-entropy is part of the objective is the
method's choice (it is a term like any other).

Logit alignment
---------------
Teacher and student logits come at their own strides (SegFormer 4, DeepLabV3 8, DeepLabV3+ 4). By default both
are upsampled bilinearly (``align_corners=False``) to the **label size** (``align="label"``): the ground truth
then defines every pixel exactly once (needed by the per-pixel DKD/PDD/BSD terms that gather the GT class and
drop void pixels), this is what C2VKD's code does (both logits at crop size) and what ``seg_cross_entropy`` does.
``align="student"`` instead resizes the teacher logits to the student's grid and nearest-downsamples the labels:
cheaper (16x fewer pixels at stride 4), at the price of a coarser ignore mask.

Adding a method = one file defining an options dataclass and a builder ``build(opts, student, other) -> nn.Module``
decorated with ``@register_method(name, summary, options, ...)``, plus its import in ``segkd/methods/__init__.py``
(a method registered from anywhere else, e.g. a test or a plugin, works the same). The CLI help, the distill
command's docstring and the method tests are generated from ``METHODS``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkd.errors import SegkdError
from segkd.models import SegModel
from segkd.models.base import upsample_logits
from segkd.registry import Registry

ROLES = ("student", "teacher", "peer")


@dataclass(frozen=True)
class MethodSpec:
    """A method's contract: which roles it needs, which families, which taps, and how to build it.

    ``taps`` maps a role to the tap names it reads (``"stage1"``, ``"embed4"``, ``"layer4"`` ...); an entry
    ``"low"`` / ``"deep"`` means "the model's shallowest / deepest feature tap", resolved per model by
    :func:`resolve_tap`. ``online`` methods train the student and the peer together (no teacher).
    ``cache_refusal``: why ``--teacher-cache`` cannot serve the method (None: it can, when it has a teacher).
    ``taps_when``: the taps are read only when this is true of the options (cwd reads its ``deep`` taps only with
    ``feature``), so a logits-only run neither computes, caches nor asks an ONNX teacher for them (:meth:`taps_read`).
    What a method says about itself in distill.json beyond its options is :meth:`Method.report`.
    ``unused_params(opts, local_batch)``: whether a step with these options, at this many images per process, can
    leave a trainable parameter (the student's or an adapter's) out of the loss's graph: a term whose weight is 0
    (its adapter idles), a student head no term reads, a BatchNorm skipped at batch 1. It sets DDP's
    ``find_unused_parameters`` (None: never; the flag costs a graph traversal per step, and a parameter left out
    without it stops DDP at the next step). ``tests/test_ddp_hygiene.py`` checks each method's answer against a
    real backward.
    """

    name: str
    summary: str
    options: type
    build: Callable[..., nn.Module]
    teacher: bool = True
    peer: bool = False
    student_family: str | None = None
    other_family: str | None = None
    taps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    same_classes: bool = True
    reconstruction: bool = False
    pair_check: Callable[[SegModel, SegModel], str | None] | None = None
    cache_refusal: str | None = None
    taps_when: Callable[[Any], bool] | None = None
    unused_params: Callable[[Any, int], bool] | None = None

    def taps_read(self, opts: Any) -> dict[str, tuple[str, ...]]:
        """The taps the method reads with the options ``opts``: ``taps``, or none when ``taps_when(opts)`` is false."""
        return self.taps if self.taps_when is None or self.taps_when(opts) else {}

    def find_unused(self, opts: Any, local_batch: int) -> bool:
        """DDP's ``find_unused_parameters`` for ``opts`` at ``local_batch`` images per process (``unused_params``)."""
        return self.unused_params is not None and bool(self.unused_params(opts, local_batch))

    @property
    def online(self) -> bool:
        return self.peer

    @property
    def can_cache(self) -> bool:
        """Whether ``--teacher-cache`` can serve the method (a teacher, and no refusal)."""
        return self.teacher and self.cache_refusal is None

    @property
    def other_role(self) -> str:
        return "peer" if self.peer else "teacher"


METHODS: Registry[MethodSpec] = Registry("method")

Builder = Callable[..., nn.Module]


def register_method(name: str, summary: str, options: type, **spec: Any) -> Callable[[Builder], Builder]:
    """Decorate a method's builder to register it: ``@register_method("kd", "pixel-wise KD", KDOptions)``; the
    other :class:`MethodSpec` fields (``teacher``, ``peer``, ``taps``...) are keywords. The name is typed once."""

    def deco(build: Builder) -> Builder:
        METHODS.add(name, MethodSpec(name, summary, options, build, **spec))
        return build

    return deco


def resolve_tap(model: SegModel, tap: str) -> str:
    """A concrete tap name of ``model``: ``low`` = shallowest feature tap, ``deep`` = deepest backbone stage."""
    feats = [s for s in model.feature_info if s.kind == "feature" and s.name != "aspp"]
    if tap == "low":
        return min(feats, key=lambda s: s.stride).name
    if tap == "deep":
        return feats[-1].name
    return tap


def _describe(model: SegModel) -> str:
    return getattr(model, "zoo_name", type(model).__name__)


def check_pair(spec: MethodSpec, student: SegModel, other: SegModel | None) -> None:
    """Raise a one-line :class:`SegkdError` when ``spec`` cannot run on this pair; called before any training."""
    role = spec.other_role
    if other is None:
        raise SegkdError(f"{spec.name} needs a {role} (--{role})")
    for model, r, fam in ((student, "student", spec.student_family), (other, role, spec.other_family)):
        if fam is not None and model.family != fam:
            raise SegkdError(f"{spec.name} needs a {fam} {r}; {_describe(model)} is a {model.family}")
    for model, r in ((student, "student"), (other, role)):
        have = {s.name for s in model.feature_info}
        for tap in spec.taps.get(r, ()):
            name = resolve_tap(model, tap)
            if name not in have:
                if name.startswith("embed"):
                    raise SegkdError(f"{spec.name} needs transformer stages with patch embeddings on both sides; "
                                     f"{_describe(model)} ({r}) has none")
                raise SegkdError(f"{spec.name} needs tap {name!r} on the {r}; {_describe(model)} has none "
                                 f"(taps: {', '.join(sorted(have))})")
    if spec.same_classes and student.num_classes != other.num_classes:
        raise SegkdError(f"{spec.name}: the student has {student.num_classes} classes but the {role} "
                         f"{_describe(other)} has {other.num_classes}")
    if spec.pair_check is not None:
        why = spec.pair_check(student, other)
        if why:
            raise SegkdError(f"{spec.name}: {why}")


def _logits_only(spec: MethodSpec) -> bool:
    """Whether the method, with its default options, learns from teacher logits alone."""
    return spec.teacher and spec.other_family is None and not spec.taps_read(make_options(spec)).get("teacher")


def logits_only_refusal(spec: MethodSpec, opts: Any) -> str | None:
    """Why ``spec`` with ``opts`` cannot learn from a teacher that gives logits only (an ONNX teacher), or None."""
    taps = spec.taps_read(opts).get("teacher", ())
    if not taps and spec.other_family is None:
        return None
    able = [n for n in METHODS.names() if _logits_only(METHODS.get(n))]
    why = (f"it reads the teacher's feature taps ({', '.join(taps)})" if taps
           else f"it needs a {spec.other_family} teacher")
    return f"{spec.name}: {why}, and an ONNX teacher gives logits only (methods that can use one: {', '.join(able)})"


# ------------------------------------------------------------------------------------------------- options
def _convert(value: str, typ: Any, key: str, method: str) -> Any:
    origin = typing.get_origin(typ)
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if origin is typing.Union or (origin is not None and type(None) in typing.get_args(typ)):
        if value.lower() in ("none", "null", ""):
            return None
        return _convert(value, args[0], key, method)
    if origin is typing.Literal:
        if value not in typing.get_args(typ):
            raise SegkdError(f"{method} option {key} must be one of {', '.join(map(str, typing.get_args(typ)))}, "
                             f"got {value!r}")
        return value
    if origin is tuple:
        parts = [p for p in value.replace(";", ",").split(",") if p.strip()]
        return tuple(_convert(p.strip(), args[0], key, method) for p in parts)
    try:
        if typ is bool:
            low = value.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return low in ("1", "true", "yes", "on")
        if typ is int:
            return int(value)
        if typ is float:
            number = float(value)
            if not math.isfinite(number):  # nan/inf would only surface as a NaN loss at iteration 1
                raise SegkdError(f"{method} option {key} must be a finite number, got {value!r}")
            return number
    except ValueError:
        raise SegkdError(f"{method} option {key} expects a {typ.__name__}, got {value!r}") from None
    return value


def _as_text(value: Any) -> str:
    """A value given through the Python API (or a saved run) as the text the command line would give, so that it
    is type-checked like one: ``2.0`` -> ``"2.0"``, ``(1, 2)`` -> ``"1,2"``, ``None`` -> ``"none"``."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(_as_text(v) for v in value)
    return str(value)


def make_options(spec: MethodSpec, overrides: dict[str, Any] | None = None) -> Any:
    """The method's options dataclass with ``overrides`` applied (converted to the field types; a non-string value
    is checked as its text, so nan, a list for a number or a float for an int fail as on the command line).

    Unknown keys fail with the method's option names; each options class may define ``check()`` for ranges."""
    overrides = dict(overrides or {})
    hints = typing.get_type_hints(spec.options)
    names = [f.name for f in dataclasses.fields(spec.options)]
    values: dict[str, Any] = {}
    for key, value in overrides.items():
        k = str(key).replace("-", "_")
        if k not in names:
            close = difflib.get_close_matches(k, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; options: {', '.join(names)}"
            raise SegkdError(f"{spec.name} has no option {key!r}{hint}")
        values[k] = _convert(value if isinstance(value, str) else _as_text(value), hints[k], k, spec.name)
    opts = spec.options(**values)
    if hasattr(opts, "check"):
        opts.check()
    return opts


def parse_method_opts(items: list[str] | None) -> dict[str, str]:
    """``["temperature=2", "weight=0.5"]`` -> dict, one-line error for an item without ``=``."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise SegkdError(f"--method-opt expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def check_positive(opts: Any, *names: str, allow_zero: bool = True) -> None:
    """One-line errors for negative (or zero, when not allowed) weights/temperatures."""
    for n in names:
        v = getattr(opts, n)
        if v < 0 or (not allow_zero and v == 0):
            raise SegkdError(f"option {n} must be {'>= 0' if allow_zero else '> 0'}, got {v}")


MIN_TEMPERATURE = 0.01


def check_temperature(opts: Any, *names: str) -> None:
    """Softmax temperatures must be >= 0.01: below that the softened distributions are one-hot to float precision
    (nothing is softened), and far below it ``logits / T`` overflows to inf and the loss turns NaN at step 1."""
    for n in names:
        v = getattr(opts, n)
        if not v >= MIN_TEMPERATURE:
            raise SegkdError(f"option {n} must be >= {MIN_TEMPERATURE} (a softmax temperature), got {v}")


# ---------------------------------------------------------------------------------------------- alignment
def nearest_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Labels resized by nearest neighbour (void stays void)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def align_logits(student: Tensor, other: Tensor, labels: Tensor, align: str = "label") -> tuple[Tensor, Tensor,
                                                                                                 Tensor]:
    """Student and teacher/peer logits (and labels) on one grid; see the module docstring for the two modes."""
    if align == "label":
        size = tuple(labels.shape[-2:])
    elif align == "student":
        size = tuple(student.shape[-2:])
        labels = nearest_labels(labels, size)  # type: ignore[arg-type]
    else:
        raise SegkdError(f"logit alignment must be 'label' or 'student', got {align!r}")

    return resize_to(student, size), resize_to(other, size), labels  # type: ignore[arg-type]


def ce_input(student: Tensor, aligned: Tensor, align: str) -> Tensor:
    """What a method's cross-entropy term reads: with ``align="label"`` the student's logits already upsampled to the
    label size by :func:`align_logits` (the tensor ``seg_cross_entropy`` would compute again, so its value is the
    same; the backward then runs one upsampling instead of two), else the student's own logits."""
    return aligned if align == "label" else student


def resize_to(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize of a feature map or logits (no-op when the size already matches): the one resizer,
    :func:`segkd.models.base.upsample_logits`, under the name the methods read best."""
    return upsample_logits(x, size)


def distill_labels(labels: Tensor, kd_labels: Tensor | None) -> Tensor:
    """The labels a distillation term reads: ``kd_labels`` when the task gives them (images without ground truth
    carry the teacher's argmax there, see :mod:`segkd.methods.distill_data`), else the ground truth.
    Cross-entropy terms always read the ground truth (void on unlabelled images)."""
    return labels if kd_labels is None else kd_labels


def valid_mask(labels: Tensor, ignore_index: int) -> Tensor:
    return (labels != ignore_index) & (labels >= 0)


class Terms(dict):  # dict[str, Tensor]
    """A method's loss terms: the weighted values (what is summed into ``loss``) as the dict, the unweighted ones,
    detached, in :attr:`raw` (same keys), and in :attr:`aligned` the logits per role (``student``, ``teacher``,
    ``peer``) as :func:`align_logits` returned them, so the task's per-step accuracy reads the upsampled maps the
    terms already computed instead of upsampling again (see :func:`segkd.methods.task.pixel_accuracy`)."""

    def __init__(self, weighted: dict[str, Tensor] | None = None, raw: dict[str, Tensor] | None = None,
                 aligned: dict[str, Tensor] | None = None) -> None:
        super().__init__(weighted or {})
        self.raw: dict[str, Tensor] = dict(raw or {})
        self.aligned: dict[str, Tensor] = dict(aligned or {})


def weigh(weighted: dict[str, tuple[float, Tensor]], aligned: dict[str, Tensor] | None = None) -> Terms:
    """``{name: (weight, raw)}`` -> :class:`Terms` ``{name: weight * raw}`` with ``raw`` kept (weight 0 skipped)
    and ``aligned`` passed on."""
    live = {name: (w, raw) for name, (w, raw) in weighted.items() if w != 0}
    return Terms({n: raw * w for n, (w, raw) in live.items()}, {n: raw.detach() for n, (_, raw) in live.items()},
                 aligned)


class Method(nn.Module):
    """Small shared base: the options, the ignore index and the parameter counts; ``forward`` returns
    :class:`Terms`."""

    def __init__(self, opts: Any, ignore_index: int = 255) -> None:
        super().__init__()
        self.opts = opts
        self.ignore_index = ignore_index

    @staticmethod
    def record(weighted: dict[str, tuple[float, Tensor]], **aligned: Tensor) -> Terms:
        """:func:`weigh`, where a method's ``forward`` reads it best; ``aligned``: the logits per role from
        :func:`align_logits` (``student=zs, teacher=zt``)."""
        return weigh(weighted, aligned)

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def frozen_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if not p.requires_grad)

    def student_modules(self) -> nn.Module:
        """The adapters trained with the student (online methods split adapters per role)."""
        return self

    def peer_modules(self) -> nn.Module | None:
        return None

    def report(self) -> dict[str, Any]:
        """What the run's distill.json records about this method beyond its options (e.g. which CLIP pool C2VKD
        used); nothing by default."""
        return {}
