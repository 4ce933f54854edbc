"""Distillation tasks for the shared trainer (the ``segkd distill`` command itself is :mod:`segkd.runs.distill`).

* :class:`DistillTask` (teacher methods): one trainable part, ``student`` = the student plus the method's
  adapters under one optimiser; the teacher is frozen (``eval()``, ``requires_grad_(False)``), runs under
  ``torch.inference_mode()`` and its outputs are cloned so they can enter the loss.
* :class:`OnlineTask` (``collab``, ``dml``): two parts, ``student`` and ``peer``, each with its own adapters and
  optimiser settings (``--peer-optimizer``, ``--peer-lr``, ...).

Both return, per step, ``loss`` (sum of the weighted terms), ``loss_<term>`` (weighted) and ``raw_<term>``
(unweighted) so every term is logged, plus ``acc_<role>``: each network's pixel accuracy on the training batch
(is the teacher better than the student on what it distils?). Deploy models are the bare students: checkpoints
hold the student (and peer) alone; adapter parameter counts are reported separately (``distill.json`` and the
checkpoint metrics).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from segkd.engine.batch import Batch
from segkd.engine.seeding import build_seeded
from segkd.engine.task import NoExtraState, OptimConfig, Part
from segkd.errors import SegkdError
from segkd.methods.base import Method, MethodSpec, Terms, resize_to, resolve_tap, valid_mask
from segkd.methods.distill_data import pseudo_labels
from segkd.methods.targets import model_outputs, teacher_targets
from segkd.methods.teacher_cache import warp_stored
from segkd.models import SegModel, SegOutput, count_params, deploy_param_count


def _assemble(terms: Terms, labels: Tensor, ignore_index: int, **logits: Tensor) -> dict[str, Tensor]:
    if not terms:
        raise SegkdError("the method returned no loss term (every weight is 0?)")
    out: dict[str, Tensor] = {"loss": sum(terms.values())}  # type: ignore[dict-item]
    for k, v in terms.items():
        out[f"loss_{k}"] = v
        if k in terms.raw:
            out[f"raw_{k}"] = terms.raw[k]
    for role, z in logits.items():
        out[f"acc_{role}"] = pixel_accuracy(at_label_size(z, terms.aligned.get(role), labels), labels, ignore_index)
    return out


def at_label_size(z: Tensor, aligned: Tensor | None, labels: Tensor) -> Tensor:
    """``aligned`` when it is at the labels' size (the logits ``z`` as a method's ``align_logits`` upsampled them
    with ``align="label"``: the accuracy then skips its own upsampling), else ``z``."""
    return aligned if aligned is not None and aligned.shape[-2:] == labels.shape[-2:] else z


def pixel_accuracy(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Share of labelled pixels whose labelled class has the largest logit (logits upsampled bilinearly to the label
    size), detached.

    Logged per step as ``acc_teacher`` / ``acc_student`` / ``acc_peer``: a teacher barely better than the student
    *on the training crops it distils from* (smaller than the images it was trained or evaluated on) has little to
    teach. A batch with no labelled pixel counts as 0 rather than NaN (the trainer stops on a non-finite value).

    Cost: the metric is computed every step, so it must cost far less than the distillation term. It compares the
    labelled class's logit with ``amax`` over the class axis: 0.4-0.6 ms for 2 x 11 x 180 x 240 on one CPU thread,
    against 3 ms for ``max(1).indices`` and 15 ms for ``argmax(1)`` (the class axis is strided; ``amax`` vectorises
    across pixels). The one difference from ``argmax == label``: where the labelled class ties another class for
    the maximum exactly, it counts as right (``argmax`` returns the first maximal class). The step passes the
    logits its method already upsampled to the label size (``Terms.aligned``) where there are such, so the
    metric's own upsampling (about 4 ms of the 5 for a stride-4 student at that size) is not paid twice; the
    value is the same in float32 (the same bilinear resize of the same tensor); under ``--amp`` the method's
    upsampling ran in the autocast dtype, so the share can differ at pixels whose top two logits tie within
    that rounding.
    """
    with torch.no_grad():
        valid = valid_mask(labels, ignore_index)
        z = resize_to(logits.detach().float(), labels.shape[-2:])
        own = z.gather(1, labels.clamp(0, z.shape[1] - 1).long().unsqueeze(1)).squeeze(1)
        right = (own >= z.amax(1)) & valid
        return right.sum().float() / valid.sum().clamp(min=1).float()


class DistillTask(NoExtraState):
    """A frozen teacher distilled into a student by ``method`` (see the module docstring)."""

    kind = "distillation"

    def __init__(self, spec: MethodSpec, method: Method, student: SegModel, teacher: SegModel,
                 optim: OptimConfig) -> None:
        self.spec, self.method, self.student, self.teacher = spec, method, student, teacher
        self.module = nn.ModuleDict({"student": student, "method": method})
        self.optim = optim
        teacher.eval().requires_grad_(False)

    def parts(self) -> dict[str, Part]:
        return {"student": Part(self.module, self.optim, list(self.student.classifier_parameters()))}

    def teacher_taps(self) -> list[str]:
        """The teacher's concrete taps the method reads."""
        return [resolve_tap(self.teacher, n) for n in self.spec.taps_read(self.method.opts).get("teacher", ())]

    def teacher_outputs(self, images: Tensor) -> SegOutput:
        """The teacher's logits and the taps the method needs (:func:`~segkd.methods.targets.teacher_targets`)."""
        targets = teacher_targets(self.teacher, self.teacher_taps(), images)
        return SegOutput(targets.logits, targets.features)

    def targets(self, batch: Batch) -> SegOutput:
        """What the teacher says about this batch: the cache's stored maps warped onto the crops here, on the
        batch's device (``--teacher-cache``; :func:`~segkd.methods.teacher_cache.warp_stored`), ready targets the
        batch carries, else a forward on the clean teacher view (``--teacher-view clean``) or on the student's own
        input (``same``)."""
        ready = warp_stored(batch.stored) if batch.stored is not None else batch.teacher
        if ready is not None:
            return SegOutput(ready.logits, {n: ready.features[n] for n in self.teacher_taps()})
        return self.teacher_outputs(batch.teacher_images if batch.teacher_images is not None else batch.images)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        s_out = model_outputs(self.student, batch.images, bool(self.spec.taps_read(self.method.opts).get("student")))
        t_out = self.targets(batch)
        kw = {}
        if batch.labeled is not None:
            kw["kd_labels"] = pseudo_labels(batch.labels, t_out.logits, batch.labeled, batch.inside,
                                            self.method.ignore_index)
        terms = self.method(batch.images, batch.labels, {"student": s_out, "teacher": t_out}, **kw)
        return _assemble(terms, batch.labels, self.method.ignore_index, student=s_out.logits,
                         teacher=t_out.logits)

    def deploy_models(self) -> dict[str, SegModel]:
        return {"student": self.student}

    def find_unused_parameters(self, local_batch: int) -> bool:
        """What the method's spec says of its options (:meth:`~segkd.methods.base.MethodSpec.find_unused`)."""
        return self.spec.find_unused(self.method.opts, local_batch)

    def train(self, mode: bool = True) -> DistillTask:
        self.student.train(mode)
        self.method.train(mode)
        self.teacher.eval()
        return self

    def param_report(self) -> dict[str, Any]:
        return {"deploy_params": {"student": deploy_param_count(self.student)},
                "adapter_params": {"student": self.method.trainable_parameter_count()},
                "frozen_params": {"teacher": count_params(self.teacher),
                                  "method": self.method.frozen_parameter_count()}}

    def checkpoint_meta(self) -> dict[str, dict]:
        rep = self.param_report()
        return {"student": {"metrics": {"distill_method": self.spec.name, "teacher": self.teacher.zoo_name,
                                        "adapter_params": rep["adapter_params"]["student"]}}}


class OnlineTask(NoExtraState):
    """Two students trained together by an online method; each part has its own adapters and optimiser."""

    kind = "online distillation"

    def __init__(self, spec: MethodSpec, method: Method, student: SegModel, peer: SegModel, optim: OptimConfig,
                 peer_optim: OptimConfig) -> None:
        self.spec, self.method, self.student, self.peer = spec, method, student, peer
        self.optim, self.peer_optim = optim, peer_optim
        a = nn.ModuleDict({"model": student})
        b = nn.ModuleDict({"model": peer})
        if any(True for _ in method.student_modules().parameters()):
            a["adapters"] = method.student_modules()
        peer_mods = method.peer_modules()
        if peer_mods is not None and any(True for _ in peer_mods.parameters()):
            b["adapters"] = peer_mods
        self.a, self.b = a, b

    def parts(self) -> dict[str, Part]:
        return {"student": Part(self.a, self.optim, list(self.student.classifier_parameters())),
                "peer": Part(self.b, self.peer_optim, list(self.peer.classifier_parameters()))}

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        images, labels = batch.images, batch.labels
        outs = {"student": model_outputs(self.student, images, bool(self.spec.taps.get("student"))),
                "peer": model_outputs(self.peer, images, bool(self.spec.taps.get("peer")))}
        return _assemble(self.method(images, labels, outs), labels, self.method.ignore_index,
                         student=outs["student"].logits, peer=outs["peer"].logits)

    def deploy_models(self) -> dict[str, SegModel]:
        return {"student": self.student, "peer": self.peer}

    def find_unused_parameters(self, local_batch: int) -> bool:
        return self.spec.find_unused(self.method.opts, local_batch)

    def train(self, mode: bool = True) -> OnlineTask:
        self.student.train(mode)
        self.peer.train(mode)
        self.method.train(mode)
        return self

    def param_report(self) -> dict[str, Any]:
        peer_mods = self.method.peer_modules()
        return {"deploy_params": {"student": deploy_param_count(self.student), "peer": deploy_param_count(self.peer)},
                "adapter_params": {"student": count_params(self.method.student_modules()),
                                   "peer": count_params(peer_mods) if peer_mods is not None else 0},
                "frozen_params": {}}

    def checkpoint_meta(self) -> dict[str, dict]:
        rep = self.param_report()
        return {role: {"metrics": {"distill_method": self.spec.name, "adapter_params": rep["adapter_params"][role],
                                   "partner": (self.peer if role == "student" else self.student).zoo_name}}
                for role in ("student", "peer")}


def assemble_task(spec: MethodSpec, opts: Any, student: SegModel, other: SegModel, optim: OptimConfig,
                  peer_optim: OptimConfig | None = None, ignore_index: int = 255, seed: int = 0,
                  ) -> DistillTask | OnlineTask:
    """The method's adapters built on a checked pair and the task around them: the one constructor ``segkd
    distill`` and ``segkd bench --train-step`` share (``other`` is the teacher, or the peer of online methods).
    The adapters draw from their own stream of ``seed`` (:func:`~segkd.engine.seeding.build_seeded`), so they start
    the same whether the teacher was built before them (cache) or not."""
    method = build_seeded(seed, "method", lambda: spec.build(opts, student, other, ignore_index=ignore_index))
    if spec.peer:
        return OnlineTask(spec, method, student, other, optim, peer_optim or optim)
    return DistillTask(spec, method, student, other, optim)
