"""The measured facts of a report: each model's size, GMACs and CPU latency, the teacher's per-class IoU on the
run's validation split, and sample predictions. Everything reuses the engine (checkpoint loading, the evaluator,
the FLOP counter, the latency loop), so the page shows the numbers the other commands would."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segkd.errors import SegkdError
from segkd.report.runs import Run


@dataclass
class Entry:
    """One model on the page: a run's deploy model (``student``/``peer``) or a teacher."""

    label: str
    role: str
    zoo: str
    run: Run | None
    checkpoint: Path | None
    size: tuple[int, int]
    params: int | None = None
    gmacs: float | None = None
    latency_ms: float | None = None
    cpu_util: float | None = None  # process CPU time / wall time while timing (bench's contention measure)
    contended: bool | None = None  # as bench flags it: CPU util < 0.9 x threads (the figure is too slow)
    miou: float | None = None  # teachers: measured here; runs: read from the logs (see Run.best)
    per_class_iou: list[float | None] | None = None
    model: nn.Module | None = field(default=None, repr=False)
    meta: Any = field(default=None, repr=False)


@dataclass
class TeacherRef:
    """A teacher to show: its zoo name, its weights, and the run whose data/resize settings it is evaluated with."""

    name: str
    weights: Path
    run: Run


def resolve_teachers(runs: list[Run], teacher: Path | None) -> tuple[list[TeacherRef], list[str]]:
    """The teacher(s) of the page and notes on any that cannot be shown.

    ``teacher`` (``--teacher``) replaces the ones distill runs name in distill.json. Its model name comes from its
    segkd metadata, else from a distill run's teacher name (a foreign .pth does not say what it is)."""
    from segkd.checkpoint import META_KEY, CheckpointMeta, read_safetensors

    named = [(r, r.distill["teacher"]) for r in runs if r.distill and isinstance(r.distill.get("teacher"), dict)]
    if teacher is not None:
        if not teacher.is_file():
            raise SegkdError(f"--teacher {teacher}: file not found")
        name = None
        if teacher.suffix == ".safetensors":
            raw = read_safetensors(teacher, tensors=False)[1]
            if META_KEY in raw:
                name = CheckpointMeta.from_json(raw[META_KEY], source=str(teacher)).model
        if name is None:
            if not named:
                raise SegkdError(f"--teacher {teacher}: not a segkd checkpoint and no distill run names its model; "
                                 "import it first with `segkd convert`")
            name = named[0][1]["name"]
        home = named[0][0] if named else runs[0]
        return [TeacherRef(name, teacher, home)], []
    refs: list[TeacherRef] = []
    notes: list[str] = []
    for run, t in named:
        if not t.get("weights"):
            continue
        path = Path(t["weights"])
        if any(ref.weights == path and ref.name == t["name"] for ref in refs):
            continue
        if not path.is_file():
            notes.append(f"teacher of {run.name} not shown: {path} not found (pass --teacher CKPT)")
            continue
        refs.append(TeacherRef(str(t["name"]), path, run))
    return refs, notes


VAL_SETTINGS = ("data", "data_format", "img_suffix", "seg_suffix", "resize", "val_labels", "val_split")


def shown_as_run(ref: TeacherRef, runs: list[Run]) -> str | None:
    """The label of the run model whose checkpoint *is* this teacher and that validated like the run naming it
    (then its own logged figures are the teacher's, and evaluating it again would only repeat a row)."""
    target = ref.weights.resolve()
    for run in runs:
        if any(run.config.get(k) != ref.run.config.get(k) for k in VAL_SETTINGS):
            continue
        for model in run.models:
            for kind in ("best", "last"):
                ckpt = run.checkpoint(model, kind)
                if ckpt is not None and ckpt.resolve() == target:
                    return run.label(model)
    return None


def run_entries(run: Run) -> list[Entry]:
    """One entry per deploy model of ``run``, its best checkpoint loaded when there is one."""
    from segkd.models.loading import load_model

    entries = []
    for name in run.models:
        ckpt = run.checkpoint(name, "best") or run.checkpoint(name, "last")
        model = load_model(ckpt) if ckpt is not None else None
        zoo = run.config.get("model") if name == "student" else run.config.get(name)
        best = run.best(name)
        entries.append(Entry(label=run.label(name), role=name, zoo=str(zoo or getattr(model, "zoo_name", "?")),
                             run=run, checkpoint=ckpt, size=run.size(), params=run.deploy_params.get(name),
                             miou=best["miou"] if best else None,
                             per_class_iou=best["per_class_iou"] if best else None, model=model,
                             meta=getattr(model, "segkd_meta", None)))
    return entries


def teacher_entry(ref: TeacherRef, num_classes: int) -> Entry:
    """The teacher loaded as distillation loads it (every weight, or a one-line refusal)."""
    from segkd.models import deploy_state
    from segkd.models.loading import load_teacher

    model = load_teacher(ref.name, ref.weights, num_classes)
    return Entry(label=f"teacher {ref.name}", role="teacher", zoo=ref.name, run=ref.run, checkpoint=ref.weights,
                 size=ref.run.size(), params=sum(v.numel() for v in deploy_state(model).values()), model=model)


def measure_cost(entry: Entry, latency: bool, calls: int = 5) -> None:
    """GMACs at the entry's input size (as distill.json counts them) and, with ``latency``, the median CPU time
    of ``calls`` batch-1 forwards after one warm-up."""
    from segkd.bench.latency import time_loop
    from segkd.runs.distill import deploy_gmacs

    if entry.model is None:
        return
    entry.gmacs = deploy_gmacs(entry.model, entry.size)  # type: ignore[arg-type]
    if latency:
        x = torch.randn(1, 3, *entry.size)
        model = entry.model.eval()
        with torch.inference_mode():
            timing = time_loop(lambda: model(x), lambda: None, warmup=1, iters=calls,
                               threads=torch.get_num_threads())
        entry.latency_ms, entry.cpu_util, entry.contended = timing.p50_ms, timing.cpu_util, timing.contended


def val_dataset(run: Run, data: str | None, resize: bool = True, mean: Any = None, std: Any = None) -> Any:
    """The run's validation split (``data`` replaces its root) transformed as its validation was; with
    ``resize=False``, at the stored size (for display). Labels stay at their stored size unless the run scored
    against resized labels."""
    from segkd.checkpoint import IMAGENET_MEAN, IMAGENET_STD
    from segkd.data import build_dataset, build_eval_transform, resolve_data_root
    from segkd.shapes import parse_hw

    cfg = run.config
    root = resolve_data_root(data or cfg.get("data") or "synth")
    size = parse_hw(cfg["resize"], "--resize") if resize and cfg.get("resize") else None
    tf = build_eval_transform(resize=size, mean=list(mean or IMAGENET_MEAN), std=list(std or IMAGENET_STD),
                              resize_labels=resize and cfg.get("val_labels", "resized") == "resized")
    return build_dataset(root, cfg.get("val_split", "val"), fmt=cfg.get("data_format"),
                         num_classes=cfg.get("num_classes"), ignore_index=int(cfg.get("ignore_index", 255)),
                         transform=tf, img_suffix=cfg.get("img_suffix"), seg_suffix=cfg.get("seg_suffix"))


def evaluate_teacher(entry: Entry, data: str | None) -> None:
    """The teacher's mIoU and per-class IoU on its run's validation split, as the trainer validates."""
    from torch.utils.data import DataLoader

    from segkd.engine.evaluate import evaluate
    from segkd.engine.inference import make_predictor

    assert entry.run is not None and entry.model is not None
    ds = val_dataset(entry.run, data)
    if ds.info.num_classes != entry.model.num_classes:  # type: ignore[union-attr]
        raise SegkdError(f"{entry.checkpoint}: the teacher predicts {entry.model.num_classes} classes, the "
                         f"validation data has {ds.info.num_classes}")
    loader = DataLoader(ds, batch_size=1, shuffle=False, num_workers=0)
    res = evaluate(make_predictor(entry.model, mode="whole"), loader, ds.info.num_classes, ds.info.ignore_index,
                   progress=False)
    entry.miou = float(res.miou)
    entry.per_class_iou = [None if v != v else float(v) for v in res.per_class_iou]


@dataclass
class Sample:
    """One validation image: the picture, its ground truth and every model's prediction (at the label size)."""

    stem: str
    image: np.ndarray
    label: np.ndarray
    preds: dict[str, np.ndarray]


def sample_indices(total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``total`` items (all of them when fewer)."""
    if n <= 0 or total <= 0:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, min(n, total))})


def predict_samples(entries: list[Entry], data: str | None, n: int, mean: Any, std: Any) -> list[Sample]:
    """The first entry's run gives the images; each model sees them preprocessed as its own run validated."""
    from segkd.engine.evaluate import sample_stem
    from segkd.engine.inference import make_predictor
    from segkd.engine.visualize import denormalize
    from segkd.models.base import upsample_logits

    shown = [e for e in entries if e.model is not None and e.run is not None]
    if not shown or n <= 0:
        return []
    plain = val_dataset(shown[0].run, data, resize=False, mean=mean, std=std)  # type: ignore[arg-type]
    indices = sample_indices(len(plain), n)
    samples = []
    for i in indices:
        image, label = plain[i]
        samples.append(Sample(sample_stem(plain, i), denormalize(image, mean, std), label.numpy(), {}))
    for e in shown:
        ds = val_dataset(e.run, data, resize=True, mean=mean, std=std)  # type: ignore[arg-type]
        predict = make_predictor(e.model, mode="whole")  # type: ignore[arg-type]
        for s, i in zip(samples, indices):
            x: Tensor = ds[i][0][None]
            scores = upsample_logits(predict(x).float(), tuple(s.label.shape[-2:]))
            s.preds[e.label] = scores.argmax(1)[0].numpy()
    return samples
