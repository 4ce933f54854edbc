"""``segkd distill``: distillation tasks for the shared trainer, and the command's entry point.

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

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from segkd.checkpoint import META_KEY, CheckpointMeta, atomic_write_text, read_safetensors
from segkd.engine.config import TrainConfig, option
from segkd.engine.distributed import DistInfo
from segkd.engine.seeding import build_seeded, build_student
from segkd.engine.task import NoExtraState, OptimConfig, Part
from segkd.engine.trainer import Callback, DataBundle, deploy_param_count, parse_hw, run_task
from segkd.errors import SegkdError
from segkd.methods.base import METHODS, Method, MethodSpec, Terms, check_pair, make_options, resize_to, valid_mask
from segkd.models import MODELS, SegModel, SegOutput, count_params, create_model
from segkd.models.loading import model_from_state


def _outputs(model: nn.Module, images: Tensor, taps: bool) -> SegOutput:
    out = model(images, taps=True) if taps else model(images)
    return out if isinstance(out, SegOutput) else SegOutput(out)


def _assemble(terms: Terms, labels: Tensor, ignore_index: int, **logits: Tensor) -> dict[str, Tensor]:
    if not terms:
        raise SegkdError("the method returned no loss term (every weight is 0?)")
    out: dict[str, Tensor] = {"loss": sum(terms.values())}  # type: ignore[dict-item]
    for k, v in terms.items():
        out[f"loss_{k}"] = v
        if k in terms.raw:
            out[f"raw_{k}"] = terms.raw[k]
    for role, z in logits.items():
        out[f"acc_{role}"] = pixel_accuracy(z, labels, ignore_index)
    return out


def pixel_accuracy(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Share of labelled pixels whose argmax (logits upsampled bilinearly to the label size) is right, detached.

    Logged per step as ``acc_teacher`` / ``acc_student`` / ``acc_peer``: a teacher barely better than the student
    *on the training crops it distils from* (smaller than the images it was trained or evaluated on) has little to
    teach. A batch with no labelled pixel counts as 0 rather than NaN (the trainer stops on a non-finite value).
    """
    with torch.no_grad():
        valid = valid_mask(labels, ignore_index)
        right = (resize_to(logits.detach().float(), labels.shape[-2:]).argmax(1) == labels) & valid
        return right.sum().float() / valid.sum().clamp(min=1).float()


class DistillTask(NoExtraState):
    """A frozen teacher distilled into a student by ``method`` (see the module docstring)."""

    kind = "distillation"

    find_unused_parameters = True  # e.g. TransKD's SK BN is skipped at batch 1; some adapters idle in ablations

    def __init__(self, spec: MethodSpec, method: Method, student: SegModel, teacher: SegModel,
                 optim: OptimConfig) -> None:
        self.spec, self.method, self.student, self.teacher = spec, method, student, teacher
        self.module = nn.ModuleDict({"student": student, "method": method})
        self.optim = optim
        teacher.eval().requires_grad_(False)

    def parts(self) -> dict[str, Part]:
        return {"student": Part(self.module, self.optim, list(self.student.classifier_parameters()))}

    def teacher_outputs(self, images: Tensor) -> SegOutput:
        """The teacher's logits and the taps the method needs, computed without autograd, then cloned."""
        first = next(self.teacher.parameters())
        if first.device != images.device:
            self.teacher.to(images.device)
        self.teacher.eval()
        need = set(self.spec.taps.get("teacher", ()))
        with torch.inference_mode():
            out = _outputs(self.teacher, images, bool(need))
        keep = {self.method_tap(n) for n in need}
        return SegOutput(out.logits.clone(), {k: v.clone() for k, v in out.features.items() if k in keep},
                         {k: v.clone() for k, v in out.embeds.items() if k in keep})

    def method_tap(self, name: str) -> str:
        from segkd.methods.base import resolve_tap

        return resolve_tap(self.teacher, name)

    def teacher_targets(self, images: Tensor, extras: dict[str, Tensor]) -> SegOutput:
        """What the teacher says about this batch: the cached, warped outputs when the dataset carries them
        (``--teacher-cache``), else a forward on the clean teacher view (``--teacher-view clean``) or on the
        student's own input (``same``)."""
        if "teacher_logits" in extras:
            need = {self.method_tap(n) for n in self.spec.taps.get("teacher", ())}
            feats = {n: extras[f"teacher_{n}"] for n in need}
            return SegOutput(extras["teacher_logits"], feats, {})
        return self.teacher_outputs(extras.get("teacher_images", images))

    def losses(self, images: Tensor, labels: Tensor, extras: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        extras = extras or {}
        s_out = _outputs(self.student, images, bool(self.spec.taps.get("student")))
        t_out = self.teacher_targets(images, extras)
        kw = {}
        if "labeled" in extras:
            from segkd.methods.distill_data import pseudo_labels

            kw["kd_labels"] = pseudo_labels(labels, t_out.logits, extras["labeled"], extras["inside"],
                                            self.method.ignore_index)
        terms = self.method(images, labels, {"student": s_out, "teacher": t_out}, **kw)
        return _assemble(terms, labels, self.method.ignore_index, student=s_out.logits,
                         teacher=t_out.logits)

    def deploy_models(self) -> dict[str, SegModel]:
        return {"student": self.student}

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

    find_unused_parameters = True  # region/pixel masks can leave a projection without a gradient

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

    def losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        outs = {"student": _outputs(self.student, images, bool(self.spec.taps.get("student"))),
                "peer": _outputs(self.peer, images, bool(self.spec.taps.get("peer")))}
        return _assemble(self.method(images, labels, outs), labels, self.method.ignore_index,
                         student=outs["student"].logits, peer=outs["peer"].logits)

    def deploy_models(self) -> dict[str, SegModel]:
        return {"student": self.student, "peer": self.peer}

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


# ------------------------------------------------------------------------------------------------- config
@dataclass
class DistillConfig(TrainConfig):
    """:class:`TrainConfig` (``model`` = the student) plus the method's choices; saved with the run for resume."""

    model: str = option("segformer-b0", "Student zoo model (what is trained and saved).", "--student",
                        required=True)
    method: str = option("kd", "Method: kd, cwd, dkd, c2vkd, transkd, collab, dml.", required=True)
    teacher: str | None = option(None, "Teacher zoo model (teacher methods; default: the model a segkd "
                                 "--teacher-weights checkpoint names).")
    teacher_weights: str | None = option(None, "Teacher weights: a segkd checkpoint, or a foreign one `segkd "
                                         "convert` reads; must load with no key missing.")
    peer: str | None = option(None, "Second student of online methods (collab, dml).")
    peer_pretrained: str | None = option(None, "Local backbone weights for the peer.")
    peer_optimizer: str | None = option(None, "Peer optimiser, adamw or sgd (default: --optimizer).")
    peer_lr: float | None = option(None, "Peer peak LR (default: the student's, or the peer optimiser's default).")
    peer_wd: float | None = option(None, "Peer weight decay.")
    peer_head_lr_mult: float | None = option(None, "Peer decode-head LR multiplier.")
    method_opts: dict[str, Any] = option(help="The method's options (docs/methods.md); on the command line "
                                         "--method-opt KEY=VALUE and the method's own flags.", cli=False,
                                         default_factory=dict)
    out: str = option("runs/distill", "Run directory for checkpoints and logs.", "--out", "-o")
    aux_weight: float = option(0.0, "Unused by distillation (the student has no aux head).", cli=False)
    teacher_view: str = option("clean", "What the teacher sees: clean = the student's crop without photometric "
                               "jitter; same = the student's jittered input.")
    teacher_cache: str | None = option(None, "Folder of cached whole-image teacher outputs, built (or continued) "
                                       "on first use and warped onto every crop: no teacher forward per step.")
    cache_topk: int = option(0, "With --teacher-cache: store per pixel only the K largest teacher logits, their "
                             "classes and the rest's mass (0: every class, full logits); part of the cache's key.")
    unlabeled: str | None = option(None, "Folder of images without labels: they get only the distillation terms.")
    unlabeled_ratio: int = option(1, "With --unlabeled: unlabeled images added to the batch per labelled one (the "
                                  "labelled batch stays --batch).")

    def check(self) -> None:
        super().check()
        spec = METHODS.get(self.method)
        MODELS.canonical(self.model)
        if spec.teacher:
            if not self.teacher and self.teacher_weights and Path(self.teacher_weights).is_file():
                self.teacher = teacher_named_by(self.teacher_weights)
            if not self.teacher:
                why = (f" (--teacher-weights {self.teacher_weights} is a foreign checkpoint that does not name its "
                       "model)" if self.teacher_weights else "")
                raise SegkdError(f"{spec.name} needs --teacher NAME{why}")
            MODELS.canonical(self.teacher)
            if not self.teacher_weights:
                raise SegkdError(f"{spec.name} needs --teacher-weights CKPT (a segkd checkpoint or a convertible "
                                 "foreign one); a randomly initialised teacher teaches nothing")
            if not Path(self.teacher_weights).is_file():
                raise SegkdError(f"--teacher-weights {self.teacher_weights}: file not found")
        elif self.teacher or self.teacher_weights:
            raise SegkdError(f"{spec.name} is an online method (two students, no teacher); use --peer, not --teacher")
        if spec.peer:
            if not self.peer:
                raise SegkdError(f"{spec.name} needs --peer NAME (the second student)")
            MODELS.canonical(self.peer)
        elif self.peer:
            raise SegkdError(f"{spec.name} takes a teacher, not a --peer")
        from segkd.methods.distill_data import TEACHER_VIEWS
        from segkd.methods.teacher_cache import REFUSED_METHODS

        if self.teacher_view not in TEACHER_VIEWS:
            raise SegkdError(f"--teacher-view must be one of {', '.join(TEACHER_VIEWS)}, got {self.teacher_view!r}")
        if not spec.teacher and (self.teacher_cache or self.unlabeled):
            flag = "--teacher-cache" if self.teacher_cache else "--unlabeled"
            raise SegkdError(f"{flag} needs a teacher method; {spec.name} trains two students online")
        if self.teacher_cache and spec.name in REFUSED_METHODS:
            raise SegkdError(f"--teacher-cache cannot serve {spec.name}: {REFUSED_METHODS[spec.name]}")
        if self.teacher_cache and Path(self.teacher_cache).exists() and not Path(self.teacher_cache).is_dir():
            raise SegkdError(f"--teacher-cache {self.teacher_cache}: exists and is not a directory")
        if self.cache_topk < 0 or (self.cache_topk and not self.teacher_cache):
            raise SegkdError(f"--cache-topk {self.cache_topk}: needs --teacher-cache and K >= 1 (0: full logits)")
        if self.unlabeled and not Path(self.unlabeled).is_dir():
            raise SegkdError(f"--unlabeled {self.unlabeled}: folder not found")
        if self.unlabeled_ratio < 1:
            raise SegkdError(f"--unlabeled-ratio must be >= 1, got {self.unlabeled_ratio}")

    def peer_optim(self) -> OptimConfig:
        return OptimConfig.make(self.peer_optimizer or self.optimizer,
                                self.peer_lr if self.peer_lr is not None else (self.lr if not self.peer_optimizer
                                                                                else None),
                                self.peer_wd if self.peer_wd is not None else (self.wd if not self.peer_optimizer
                                                                                else None),
                                self.peer_head_lr_mult, momentum=self.momentum)


# ------------------------------------------------------------------------------------------------- teacher
def teacher_named_by(path: str | Path) -> str | None:
    """The zoo model a segkd checkpoint's metadata names (so ``--teacher`` may be left out), or ``None`` for a
    foreign checkpoint."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    raw = read_safetensors(path, tensors=False)[1]
    return CheckpointMeta.from_json(raw[META_KEY], source=str(path)).model if META_KEY in raw else None


def load_teacher(name: str, path: str | Path, num_classes: int, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> SegModel:
    """A teacher with every weight loaded: a segkd checkpoint of ``name`` (strict), or a foreign checkpoint that
    ``segkd convert`` understands with no key missing or left over. Anything else is refused in one line."""
    path = Path(path)
    canonical = MODELS.canonical(name)
    meta: CheckpointMeta | None = None
    if path.suffix == ".safetensors":
        state, raw = read_safetensors(path)
        if META_KEY in raw:
            meta = CheckpointMeta.from_json(raw[META_KEY], source=str(path))
    if meta is not None:
        if MODELS.canonical(meta.model) != canonical:
            raise SegkdError(f"--teacher-weights {path}: a {meta.model} checkpoint, but --teacher is {name}")
        model = model_from_state(state, meta, f"--teacher-weights {path}")
        if mean is not None and std is not None and (
                any(abs(a - b) > 1e-6 for a, b in zip(meta.mean, mean, strict=True))
                or any(abs(a - b) > 1e-6 for a, b in zip(meta.std, std, strict=True))):
            raise SegkdError(f"--teacher-weights {path}: trained with mean/std {meta.mean}/{meta.std}, but the run "
                             f"normalises with {list(mean)}/{list(std)}")
    else:
        from segkd.models.convert import convert_checkpoint

        model, _, report = convert_checkpoint(path, canonical, num_classes=None)
        bad = [(label, keys) for label, keys in (("missing", report.missing), ("unexpected", report.unplaced))
               if keys]
        if bad:
            label, keys = bad[0]
            raise SegkdError(f"--teacher-weights {path}: {len(keys)} {label} key(s) for {canonical} (first "
                             f"{keys[0]!r}); refusing a partially loaded teacher")
    if model.num_classes != num_classes:
        raise SegkdError(f"--teacher-weights {path}: the teacher predicts {model.num_classes} classes, the dataset "
                         f"has {num_classes}")
    return model.eval().requires_grad_(False)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- build
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


class DistillBuilder:
    """How ``segkd distill`` builds its task (the :class:`~segkd.engine.trainer.TaskBuilder` steps), each thing once:
    the method's options and the pair check in :meth:`check` (on throw-away 2-class models, before any data is
    read: the class counts are checked when the teacher loads); the teacher loaded once, by :meth:`prepare` when
    the teacher cache needs it, else by :meth:`build`."""

    def __init__(self) -> None:
        self.spec: MethodSpec | None = None
        self.opts: Any = None
        self.teacher: SegModel | None = None

    def source(self, cfg: DistillConfig) -> str:  # type: ignore[override]
        return f"segkd distill --method {METHODS.canonical(cfg.method)}"

    def check(self, cfg: DistillConfig) -> None:  # type: ignore[override]
        self.spec = spec = METHODS.get(cfg.method)
        self.opts = make_options(spec, cfg.method_opts)
        student = create_model(cfg.model, num_classes=2)
        other = create_model(cfg.teacher if spec.teacher else cfg.peer, num_classes=2)  # type: ignore[arg-type]
        check_pair(spec, student, other)

    def load_teacher(self, cfg: DistillConfig, data: DataBundle) -> SegModel:
        if self.teacher is None:
            self.teacher = load_teacher(cfg.teacher, cfg.teacher_weights, data.num_classes, data.mean,  # type: ignore[arg-type]
                                        data.std)
        return self.teacher

    def prepare(self, cfg: DistillConfig, info: DistInfo) -> DataBundle:  # type: ignore[override]
        return prepare_distill_data(cfg, info, self)

    def build(self, cfg: DistillConfig, data: DataBundle, info: DistInfo) -> DistillTask | OnlineTask:  # type: ignore[override]
        if self.spec is None:
            self.check(cfg)
        spec = self.spec
        assert spec is not None
        # the student from the run seed, whatever was built before it (a teacher for the cache): paired starts
        student = build_student(cfg.seed, lambda: create_model(cfg.model, num_classes=data.num_classes,
                                                               pretrained=cfg.pretrained))
        if spec.peer:
            peer = create_model(cfg.peer, num_classes=data.num_classes, pretrained=cfg.peer_pretrained)  # type: ignore[arg-type]
            return assemble_task(spec, self.opts, student, peer, cfg.optim(), cfg.peer_optim(), data.ignore_index,
                                 cfg.seed)
        return assemble_task(spec, self.opts, student, self.load_teacher(cfg, data), cfg.optim(),
                             ignore_index=data.ignore_index, seed=cfg.seed)


def cache_key(cfg: DistillConfig, teacher: SegModel, data: DataBundle) -> Any:
    """The :class:`~segkd.methods.teacher_cache.CacheKey` of this run's teacher: model, sha256 of its weights,
    classes, normalisation, and the taps (with strides) the method reads."""
    from segkd.checkpoint import file_sha256
    from segkd.methods.base import resolve_tap
    from segkd.methods.teacher_cache import CacheKey

    taps = {resolve_tap(teacher, t): teacher.feature_spec(resolve_tap(teacher, t)).stride
            for t in METHODS.get(cfg.method).taps.get("teacher", ())}
    if cfg.cache_topk > data.num_classes:
        raise SegkdError(f"--cache-topk {cfg.cache_topk}: more than the dataset's {data.num_classes} classes")
    return CacheKey(teacher.zoo_name, file_sha256(Path(cfg.teacher_weights)), data.num_classes,  # type: ignore[arg-type]
                    list(data.mean), list(data.std), taps, int(teacher.output_stride), topk=cfg.cache_topk)


def prepare_distill_data(cfg: DistillConfig, info: DistInfo | None = None,
                         builder: DistillBuilder | None = None) -> DataBundle:
    """:func:`~segkd.engine.trainer.prepare_data`, then the distillation extras: the clean teacher view, the
    unlabelled images and the teacher cache (built or continued here, by every rank, before any training step)."""
    from segkd.engine.trainer import prepare_data
    from segkd.methods.distill_data import DistillDataset, UnlabeledImages
    from segkd.methods.teacher_cache import build_cache, topk_note

    bundle = prepare_data(cfg, info)
    view = cfg.teacher_view if cfg.jitter else "same"
    if not METHODS.get(cfg.method).teacher or not (view == "clean" or cfg.teacher_cache or cfg.unlabeled):
        return bundle
    main = info is None or info.is_main
    unl = None
    if cfg.unlabeled:
        unl = UnlabeledImages(cfg.unlabeled, bundle.train.info, bundle.train.transform, cfg.seed)  # type: ignore
        if main:
            unl.validate()
    ds = DistillDataset(bundle.train, unl, view, unlabeled_ratio=cfg.unlabeled_ratio)  # type: ignore[arg-type]
    if cfg.teacher_cache:
        teacher = (builder or DistillBuilder()).load_teacher(cfg, bundle)
        key = cache_key(cfg, teacher, bundle)
        ds.taps = list(key.taps)
        device = info.device if info is not None else "cpu"
        # every rank builds a slice and waits by polling, never at a long barrier (segkd.methods.cache_ranks)
        ds.cache = build_cache(cfg.teacher_cache, key, ds.cache_images(), teacher, bundle.mean, bundle.std,
                               device, progress=cfg.progress, dist=info)
        note = topk_note(METHODS.canonical(cfg.method), key.topk, key.num_classes)
        if note and main:
            print(note, file=sys.stderr, flush=True)
    bundle.train = ds
    return bundle


def deploy_gmacs(model: SegModel, size: tuple[int, int]) -> float:
    from segkd.bench.flops import count_flops

    return round(count_flops(model, (1, 3, *size)).gmacs, 3)


def run_distill(cfg: DistillConfig, resume: str | Path | None = None, callbacks: Sequence[Callback] = (),
                data: DataBundle | None = None) -> dict[str, Any]:
    """``segkd distill``: run the task :class:`DistillBuilder` builds on the shared trainer; writes ``distill.json``
    (method, options, deploy/adapter/frozen parameter counts, deploy GMACs) beside run.json."""
    run = run_task(cfg, DistillBuilder(), resume, callbacks, data)
    task, c = run.task, run.cfg
    assert isinstance(task, (DistillTask, OnlineTask))
    size = parse_hw(c.crop or c.resize or "512x512", "--crop")  # type: ignore[attr-defined]
    report = {"method": task.spec.name, "options": asdict(task.method.opts),
              "reconstruction": task.spec.reconstruction, **task.param_report(),
              "deploy_gmacs": {n: deploy_gmacs(m, size) for n, m in task.deploy_models().items()},
              "gmacs_input": f"1x3x{size[0]}x{size[1]}"}
    if isinstance(task, DistillTask):
        report["teacher"] = {"name": task.teacher.zoo_name, "weights": c.teacher_weights}  # type: ignore[attr-defined]
        if hasattr(task.method, "pool_source"):
            report["pool_source"] = task.method.pool_source
    summary = {**run.summary, "distill": report}
    if summary.get("rank", 0) == 0:
        import json

        atomic_write_text(Path(c.out) / "distill.json", json.dumps(report, indent=2, default=str) + "\n")
    return summary
