"""``segkd distill``: its config, how its task is built (:class:`DistillBuilder`), its data, and ``distill.json``.

The tasks themselves (:class:`~segkd.methods.task.DistillTask`, :class:`~segkd.methods.task.OnlineTask`) and the
methods are :mod:`segkd.methods`; the loop is :mod:`segkd.engine`; the run directory is :mod:`segkd.runs.rundir`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from segkd.checkpoint import atomic_write_text, file_sha256
from segkd.engine.config import TrainConfig
from segkd.engine.distributed import DistInfo, check_shared_dir
from segkd.engine.seeding import build_student
from segkd.engine.task import OptimConfig
from segkd.engine.trainer import Callback, DataBundle
from segkd.errors import SegkdError
from segkd.methods import METHODS, MethodSpec, check_pair, make_options, resolve_tap
from segkd.methods.base import logits_only_refusal
from segkd.methods.distill_data import TEACHER_VIEWS, DistillDataset, UnlabeledImages
from segkd.methods.task import DistillTask, OnlineTask, assemble_task
from segkd.methods.teacher_cache import CACHE_DTYPES, CacheKey, build_cache, topk_note
from segkd.models import MODELS, SegModel, create_model
from segkd.models.flops import count_flops
from segkd.models.loading import load_teacher, teacher_named_by
from segkd.models.onnx_teacher import OnnxTeacher, is_onnx_path, load_onnx_teacher, parse_triple
from segkd.onnxrt import parse_providers
from segkd.options import option
from segkd.runs.train import prepare_data, run_task
from segkd.shapes import parse_hw

DISTILL_FILE = "distill.json"


def _method_help() -> str:
    """``--method``'s help, generated from the registry (a method registered later is listed too)."""
    return "Method: " + ", ".join(METHODS.names()) + " (segkd distill --help lists what each does)."


@dataclass
class DistillConfig(TrainConfig):
    """:class:`TrainConfig` (``model`` = the student) plus the method's choices; saved with the run for resume."""

    model: str = option("segformer-b0", "Student zoo model (what is trained and saved).", "--student",
                        required=True)
    method: str = option("kd", _method_help, required=True)
    teacher: str | None = option(None, "Teacher zoo model (teacher methods; default: the model a segkd "
                                 "--teacher-weights checkpoint names).")
    teacher_weights: str | None = option(None, "Teacher weights: a segkd checkpoint, or a foreign one `segkd "
                                         "convert` reads (must load with no key missing), or an ONNX model (.onnx, "
                                         "run by ONNX Runtime; logit methods only).", path="file")
    teacher_mean: str | None = option(None, "An ONNX teacher segkd did not export: its input mean, RGB in [0, 1] "
                                      "units (e.g. 0.485,0.456,0.406; a 0..255 model: 0,0,0).")
    teacher_std: str | None = option(None, "An ONNX teacher segkd did not export: its input std, RGB in [0, 1] "
                                     "units (a 0..255 model: 0.00392156862745098 = 1/255 for each channel).")
    teacher_providers: str | None = option(None, "ONNX Runtime providers of an ONNX teacher, e.g. cuda or cpu "
                                           "(default: the run's device; no silent CPU fallback).", machine=True)
    peer: str | None = option(None, "Second student of online methods (collab, dml).")
    peer_pretrained: str | None = option(None, "Local backbone weights for the peer.", path="file")
    peer_optimizer: str | None = option(None, "Peer optimiser, adamw or sgd (default: --optimizer).")
    peer_lr: float | None = option(None, "Peer peak LR (default: the student's, or the peer optimiser's default).")
    peer_wd: float | None = option(None, "Peer weight decay.")
    peer_head_lr_mult: float | None = option(None, "Peer decode-head LR multiplier.")
    method_opts: dict[str, Any] = option(help="The method's options (docs/methods.md); on the command line "
                                         "--method-opt KEY=VALUE and the method's own flags.", cli=False,
                                         default_factory=dict)
    out: str = option("runs/distill", "Run directory for checkpoints and logs.", "--out", "-o", path="out")
    aux_weight: float = option(0.0, "Unused by distillation (the student has no aux head).", cli=False)
    teacher_view: str = option("clean", "What the teacher sees: clean = the student's crop without photometric "
                               "jitter; same = the student's jittered input.")
    teacher_cache: str | None = option(None, "Folder of cached whole-image teacher outputs, built (or continued) "
                                       "on first use and warped onto every crop: no teacher forward per step.",
                                       path="out")
    cache_topk: int = option(0, "With --teacher-cache: store per pixel only the K largest teacher logits, their "
                             "classes and the rest's mass (0: every class, full logits); part of the cache's key.")
    cache_dtype: str = option("float16", "With --teacher-cache: how logits and taps are stored, float16 (half the "
                              "bytes, values rounded to 2^-11 of their size) or float32 (the teacher's values "
                              "exactly); part of the cache's key.")
    unlabeled: str | None = option(None, "Folder of images without labels: they get only the distillation terms.",
                                   path="dir")
    unlabeled_ratio: int = option(1, "With --unlabeled: unlabeled images added to the batch per labelled one (the "
                                  "labelled batch stays --batch).")

    def check(self) -> None:
        super().check()
        spec = METHODS.get(self.method)
        MODELS.canonical(self.model)
        if spec.teacher:
            self._check_teacher(spec)
        elif self.teacher or self.teacher_weights:
            raise SegkdError(f"{spec.name} is an online method (two students, no teacher); use --peer, not --teacher")
        if spec.peer:
            if not self.peer:
                raise SegkdError(f"{spec.name} needs --peer NAME (the second student)")
            MODELS.canonical(self.peer)
        elif self.peer:
            raise SegkdError(f"{spec.name} takes a teacher, not a --peer")
        if self.teacher_view not in TEACHER_VIEWS:
            raise SegkdError(f"--teacher-view must be one of {', '.join(TEACHER_VIEWS)}, got {self.teacher_view!r}")
        if not spec.teacher and (self.teacher_cache or self.unlabeled):
            flag = "--teacher-cache" if self.teacher_cache else "--unlabeled"
            raise SegkdError(f"{flag} needs a teacher method; {spec.name} trains two students online")
        if self.teacher_cache and spec.cache_refusal:
            raise SegkdError(f"--teacher-cache cannot serve {spec.name}: {spec.cache_refusal}")
        if self.teacher_cache and Path(self.teacher_cache).exists() and not Path(self.teacher_cache).is_dir():
            raise SegkdError(f"--teacher-cache {self.teacher_cache}{self.origin('teacher_cache')}: exists and is "
                             "not a directory")
        if self.cache_topk < 0 or (self.cache_topk and not self.teacher_cache):
            raise SegkdError(f"--cache-topk {self.cache_topk}: needs --teacher-cache and K >= 1 (0: full logits)")
        if self.cache_dtype not in CACHE_DTYPES or (self.cache_dtype != "float16" and not self.teacher_cache):
            raise SegkdError(f"--cache-dtype {self.cache_dtype}: one of {', '.join(CACHE_DTYPES)}, with "
                             "--teacher-cache")
        if self.unlabeled_ratio < 1:
            raise SegkdError(f"--unlabeled-ratio must be >= 1, got {self.unlabeled_ratio}")

    def _check_teacher(self, spec: MethodSpec) -> None:
        """A teacher method needs a teacher model (named, or named by a segkd checkpoint) and its weights; an ONNX
        teacher is its own model (:meth:`_check_onnx_teacher`)."""
        if is_onnx_path(self.teacher_weights):
            self._check_onnx_teacher()
            return
        if self.teacher_mean or self.teacher_std or self.teacher_providers:
            raise SegkdError("--teacher-mean/--teacher-std/--teacher-providers describe an ONNX teacher; "
                             f"--teacher-weights {self.teacher_weights} is a checkpoint")
        if not self.teacher and self.teacher_weights:
            self.teacher = teacher_named_by(self.teacher_weights)
        if not self.teacher:
            why = (f" (--teacher-weights {self.teacher_weights} is a foreign checkpoint that does not name its "
                   "model)" if self.teacher_weights else "")
            raise SegkdError(f"{spec.name} needs --teacher NAME{why}")
        MODELS.canonical(self.teacher)
        if not self.teacher_weights:
            raise SegkdError(f"{spec.name} needs --teacher-weights CKPT (a segkd checkpoint or a convertible "
                             "foreign one); a randomly initialised teacher teaches nothing")

    def _check_onnx_teacher(self) -> None:
        """``--teacher`` is refused (the file is the model); mean/std come as a pair of three numbers each."""
        if self.teacher:
            raise SegkdError(f"--teacher {self.teacher}: --teacher-weights {self.teacher_weights} is an ONNX model, "
                             "which is its own teacher; leave --teacher out")
        if (self.teacher_mean is None) != (self.teacher_std is None):
            raise SegkdError("--teacher-mean and --teacher-std go together (an ONNX teacher's input normalisation)")
        if self.teacher_mean is not None:
            parse_triple(self.teacher_mean, "--teacher-mean")
            parse_triple(self.teacher_std, "--teacher-std", positive=True)  # type: ignore[arg-type]
        if self.teacher_providers:
            parse_providers(self.teacher_providers)

    def onnx_teacher_input(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """``(--teacher-mean, --teacher-std)`` parsed (``None``: not given)."""
        if self.teacher_mean is None or self.teacher_std is None:
            return None, None
        return (parse_triple(self.teacher_mean, "--teacher-mean"),
                parse_triple(self.teacher_std, "--teacher-std", positive=True))

    def peer_optim(self) -> OptimConfig:
        return OptimConfig.make(self.peer_optimizer or self.optimizer,
                                self.peer_lr if self.peer_lr is not None else (self.lr if not self.peer_optimizer
                                                                                else None),
                                self.peer_wd if self.peer_wd is not None else (self.wd if not self.peer_optimizer
                                                                                else None),
                                self.peer_head_lr_mult, momentum=self.momentum)


class DistillBuilder:
    """How ``segkd distill`` builds its task (the :class:`~segkd.runs.train.TaskBuilder` steps), each thing once:
    the method's options and the pair check in :meth:`check` (on throw-away 2-class models, before any data is
    read: the class counts are checked when the teacher loads); the teacher loaded once, by :meth:`prepare` when
    the teacher cache needs it, else by :meth:`build`."""

    command = "segkd distill"

    def __init__(self) -> None:
        self.spec: MethodSpec | None = None
        self.opts: Any = None
        self.teacher: SegModel | None = None

    def source(self, cfg: DistillConfig) -> str:  # type: ignore[override]
        return f"segkd distill --method {METHODS.canonical(cfg.method)}"

    def check(self, cfg: DistillConfig) -> None:  # type: ignore[override]
        self.spec = spec = METHODS.get(cfg.method)
        self.opts = make_options(spec, cfg.method_opts)
        if spec.teacher and is_onnx_path(cfg.teacher_weights):
            why = logits_only_refusal(spec, self.opts)
            if why:
                raise SegkdError(f"--teacher-weights {cfg.teacher_weights}: {why}")
            return  # the class count is checked when the teacher loads
        student = create_model(cfg.model, num_classes=2)
        other = create_model(cfg.teacher if spec.teacher else cfg.peer, num_classes=2)  # type: ignore[arg-type]
        check_pair(spec, student, other)

    def load_teacher(self, cfg: DistillConfig, data: DataBundle, device: torch.device | None = None) -> SegModel:
        """The teacher, loaded once: a zoo model, or an :class:`~segkd.models.onnx_teacher.OnnxTeacher` whose ONNX
        Runtime providers default to the run's ``device`` (its CUDA index for a DDP rank)."""
        if self.teacher is None and is_onnx_path(cfg.teacher_weights):
            cuda = device is not None and device.type == "cuda"
            mean, std = cfg.onnx_teacher_input()
            self.teacher = load_onnx_teacher(cfg.teacher_weights, data.num_classes, data.mean, data.std,  # type: ignore[arg-type]
                                             mean, std, cfg.teacher_providers or ("cuda" if cuda else "cpu"),
                                             gpu=device.index if cuda else None,  # type: ignore[union-attr]
                                             threads=cfg.threads or 0)
        elif self.teacher is None:
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
        return assemble_task(spec, self.opts, student, self.load_teacher(cfg, data, info.device), cfg.optim(),
                             ignore_index=data.ignore_index, seed=cfg.seed)


def cache_key(cfg: DistillConfig, teacher: SegModel, data: DataBundle) -> CacheKey:
    """The :class:`~segkd.methods.teacher_cache.CacheKey` of this run's teacher: model (an ONNX teacher's
    ``cache_name``), sha256 of its weights, classes, normalisation, and the taps (with strides) the method reads."""
    spec = METHODS.get(cfg.method)
    taps = {resolve_tap(teacher, t): teacher.feature_spec(resolve_tap(teacher, t)).stride
            for t in spec.taps_read(make_options(spec, cfg.method_opts)).get("teacher", ())}
    if cfg.cache_topk > data.num_classes:
        raise SegkdError(f"--cache-topk {cfg.cache_topk}: more than the dataset's {data.num_classes} classes")
    name = teacher.cache_name if isinstance(teacher, OnnxTeacher) else teacher.zoo_name
    return CacheKey(name, file_sha256(Path(cfg.teacher_weights)), data.num_classes,  # type: ignore[arg-type]
                    list(data.mean), list(data.std), taps, int(teacher.output_stride), topk=cfg.cache_topk,
                    dtype=cfg.cache_dtype)


def prepare_distill_data(cfg: DistillConfig, info: DistInfo | None = None,
                         builder: DistillBuilder | None = None) -> DataBundle:
    """:func:`~segkd.runs.train.prepare_data`, then the distillation extras: the clean teacher view, the
    unlabelled images and the teacher cache (built or continued here, by every rank, before any training step)."""
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
        if info is not None:
            check_shared_dir(Path(cfg.teacher_cache), info, "--teacher-cache")
        device = info.device if info is not None else torch.device("cpu")
        teacher = (builder or DistillBuilder()).load_teacher(cfg, bundle, device)
        key = cache_key(cfg, teacher, bundle)
        ds.taps = list(key.taps)
        # every rank builds a slice and waits by polling, never at a long barrier (segkd.methods.cache_ranks)
        ds.cache = build_cache(cfg.teacher_cache, key, ds.cache_images(), teacher, bundle.mean, bundle.std,
                               device, progress=cfg.progress, dist=info)
        note = topk_note(METHODS.canonical(cfg.method), key.topk, key.num_classes)
        if note and main:
            print(note, file=sys.stderr, flush=True)
    bundle.train = ds
    return bundle


def deploy_gmacs(model: SegModel, size: tuple[int, int]) -> float:
    """A deploy model's GMACs at batch 1 and ``size`` (distill.json's figure)."""
    return round(count_flops(model, (1, 3, *size)).gmacs, 3)


def distill_report(task: DistillTask | OnlineTask, cfg: DistillConfig) -> dict[str, Any]:
    """distill.json: method, options, deploy/adapter/frozen parameter counts, deploy GMACs, what the method
    reports about itself (:meth:`~segkd.methods.base.Method.report`) and the teacher."""
    size = parse_hw(cfg.crop or cfg.resize or "512x512", "--crop")
    report = {"method": task.spec.name, "options": asdict(task.method.opts),
              "reconstruction": task.spec.reconstruction, **task.param_report(),
              "deploy_gmacs": {n: deploy_gmacs(m, size) for n, m in task.deploy_models().items()},
              "gmacs_input": f"1x3x{size[0]}x{size[1]}", **task.method.report()}
    if isinstance(task, DistillTask):
        report["teacher"] = {"name": task.teacher.zoo_name, "weights": cfg.teacher_weights}
    return report


def run_distill(cfg: DistillConfig, resume: str | Path | None = None, callbacks: Sequence[Callback] = (),
                data: DataBundle | None = None, **run_options: Any) -> dict[str, Any]:
    """``segkd distill``: run the task :class:`DistillBuilder` builds on the shared trainer; writes ``distill.json``
    beside run.json. ``run_options``: ``config_file`` and ``overrides`` of :func:`~segkd.runs.train.run_task`."""
    run = run_task(cfg, DistillBuilder(), resume, callbacks, data, **run_options)
    assert isinstance(run.task, (DistillTask, OnlineTask))
    report = distill_report(run.task, run.cfg)  # type: ignore[arg-type]
    summary = {**run.summary, "distill": report}
    if summary.get("rank", 0) == 0:
        atomic_write_text(Path(run.cfg.out) / DISTILL_FILE, json.dumps(report, indent=2, default=str) + "\n")
    return summary
