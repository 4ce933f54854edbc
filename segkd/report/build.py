"""Assemble a report: read the runs, measure the models, draw the figures, lay out the tables.

The result is format-free (:class:`Report`: tables of strings and PNG figures); :mod:`segkd.report.render` turns it
into the self-contained HTML page and the markdown file, so both always show the same numbers."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segkd import __version__
from segkd.errors import SegkdError
from segkd.report import figures
from segkd.report.measure import (
    Entry,
    evaluate_teacher,
    measure_cost,
    predict_samples,
    resolve_teachers,
    run_entries,
    shown_as_run,
    teacher_entry,
)
from segkd.report.runs import Run, read_runs


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Figure:
    key: str
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Report:
    title: str
    created: str
    tables: list[Table]
    figures: list[Figure]
    samples: list[Figure]
    notes: list[str] = field(default_factory=list)


def pct(v: float | None) -> str:
    return "-" if v is None or v != v else f"{100 * v:.2f}"


def _status(run: Run) -> str:
    total = run.config.get("iters")
    return "finished" if run.finished else f"unfinished: iteration {run.last_iter} of {total}"


def _schedule(cfg: dict[str, Any]) -> str:
    lr = cfg.get("lr")
    parts = [f"{cfg.get('iters')} it x batch {cfg.get('batch')}",
             f"{cfg.get('optimizer')} lr {'default' if lr is None else lr}"]
    if cfg.get("warmup"):
        parts.append(f"warm-up {cfg['warmup']}")
    for key in ("crop", "resize"):
        if cfg.get(key):
            parts.append(f"{key} {cfg[key]}")
    parts.append(f"val every {cfg.get('val_every')}")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _teacher_of(run: Run) -> str:
    t = (run.distill or {}).get("teacher") or {}
    name = t.get("name") or run.config.get("teacher")
    return str(name) if name else "-"


def runs_table(runs: list[Run]) -> Table:
    rows = []
    for r in runs:
        wall = _duration(r.summary["wall_time_s"]) if r.summary and "wall_time_s" in r.summary else "-"
        rows.append([r.name, _status(r), str(r.config.get("model")), r.method, _teacher_of(r),
                     str(r.config.get("data")), _schedule(r.config), wall])
    return Table("Runs", ["run", "status", "model", "method", "teacher", "data", "schedule", "wall time"], rows)


def results_table(entries: list[Entry]) -> Table:
    rows = []
    for e in entries:
        if e.role == "teacher":
            at = e.run.config.get("resize") if e.run is not None else None
            rows.append([e.label, e.zoo, pct(e.miou), pct(e.miou), f"evaluated now (input {at or 'as stored'})",
                         "-", "-"])
            continue
        assert e.run is not None
        final = e.run.final(e.role) or {}
        best = e.run.best(e.role) or {}
        it = str(best.get("iteration", "-"))
        rows.append([e.label, e.zoo, pct(final.get("miou")), pct(best.get("miou")), it, pct(final.get("aacc")),
                     pct(final.get("macc"))])
    return Table("Validation (%)", ["model", "architecture", "final mIoU", "best mIoU", "best at iteration",
                                    "final aAcc", "final mAcc"], rows,
                 "final = the last validation (the summary's for finished runs); the teacher is evaluated on the "
                 "validation split of the run that names it, as the trainer validates.")


def _util_cell(e: Entry) -> str:
    """bench's CPU-util column: process CPU time / wall time while timed, marked when contended."""
    if e.latency_ms is None or e.cpu_util is None:
        return "-"
    return f"{e.cpu_util:.2f}" + (" contended" if e.contended else "")


def cost_table(entries: list[Entry], latency: bool) -> Table:
    rows = []
    for e in entries:
        rows.append([e.label, "-" if e.params is None else f"{e.params / 1e6:.3f}",
                     "-" if e.gmacs is None else f"{e.gmacs:.3f}", f"1x3x{e.size[0]}x{e.size[1]}",
                     "-" if e.latency_ms is None else f"{e.latency_ms:.1f}", _util_cell(e)])
    how = (f"latency: median of 5 batch-1 forwards on CPU (torch threads: {torch.get_num_threads()}) after one warm-up"
           if latency else "latency not measured (--no-latency)")
    if any(e.contended for e in entries):
        how += ("; contended = the process got less than 0.9 x its threads of CPU while timed (another process "
                "shared the cores, as segkd bench flags it): that latency is too high, rerun on an idle machine")
    return Table("Size and cost", ["model", "params (M)", "GMACs", "input", "latency (ms)", "CPU util"], rows,
                 f"params: deploy weights (run.json; training-only adapters excluded); GMACs at the run's crop "
                 f"(else resize, else 512x512); {how}.")


def per_class_table(class_names: Sequence[str], series: list[tuple[str, Sequence[float | None]]]) -> Table:
    rows = [[name] + [pct(vals[i]) if i < len(vals) else "-" for _, vals in series]
            for i, name in enumerate(class_names)]
    return Table("Per-class IoU (%)", ["class"] + [label for label, _ in series], rows,
                 "runs: the validation at their best checkpoint's iteration; - = absent from labels and predictions.")


def _present(masks: list[np.ndarray]) -> set[int]:
    present: set[int] = set()
    for m in masks:
        present |= {int(v) for v in np.unique(m)}
    return present


def _legend(names: Sequence[str], palette: Sequence[Sequence[int]], present: set[int]) -> list[tuple[str, Any]]:
    return [(n, palette[i]) for i, n in enumerate(names) if i in present and i < len(palette)]


def sample_figures(entries: list[Entry], data: str | None, n: int, class_names: list[str]) -> list[Figure]:
    """image | ground truth | each model's prediction, blended over the image in the checkpoint's palette."""
    from segkd.engine.visualize import colorize, overlay

    meta = next((e.meta for e in entries if e.meta is not None), None)
    if meta is None or n <= 0:
        return []
    samples = predict_samples(entries, data, n, meta.mean, meta.std)
    shown = _present([m for s in samples for m in (s.label, *s.preds.values())]) - {meta.ignore_index}
    palette, changed = figures.overlay_palette(meta.palette, sorted(shown))  # one palette for every sample
    caption = ("overlay colours differ from the dataset palette for " + ", ".join(class_names[i] for i in changed)
               + " (too close to another class shown to tell apart once blended)" if changed else "")
    out = []
    for k, s in enumerate(samples):
        panels = [("image", s.image), ("ground truth", overlay(s.image, colorize(s.label, palette,
                                                                                    meta.ignore_index), 0.6))]
        panels += [(label, overlay(s.image, colorize(p, palette, None), 0.6)) for label, p in s.preds.items()]
        legend = _legend(class_names, palette, _present([s.label, *s.preds.values()]))
        out.append(Figure(f"sample{k + 1}-{s.stem}", f"sample {s.stem}",
                          figures.sample_figure(f"{s.stem} (ground truth ignore pixels in black)", panels, legend),
                          caption))
    return out


def _teacher_entries(runs: list[Any], teacher: Path | None, data: str | None, n_classes: int,
                     say: Callable[[str], None]) -> tuple[list[Any], list[str]]:
    """The teachers to show next to the runs (each evaluated on ``data`` or its run's own set), and notes for a
    teacher that is already a run on the page or could not be evaluated (``--data`` given: an error instead)."""
    refs, notes = resolve_teachers(runs, teacher)
    entries = []
    for ref in refs:
        same = shown_as_run(ref, runs)
        if same is not None:
            notes.append(f"the teacher of {ref.run.name} ({ref.weights.name}) is {same} on this page: its rows are "
                         "the teacher's")
            continue
        say(f"evaluating teacher {ref.name}")
        entry = teacher_entry(ref, n_classes or int(ref.run.config.get("num_classes") or 0))
        try:
            evaluate_teacher(entry, data)
        except SegkdError as e:
            if data is not None:
                raise
            notes.append(f"{entry.label}: not evaluated ({e})")
        entries.append(entry)
    return entries, list(notes)


def build_report(run_dirs: Sequence[str | Path], teacher: Path | None = None, data: str | None = None,
                 samples: int = 4, latency: bool = True,
                 progress: Callable[[str], None] | None = None) -> Report:
    """Everything ``segkd report`` shows for ``run_dirs`` (see docs/report.md)."""
    say = progress or (lambda _text: None)
    if not run_dirs:
        raise SegkdError("give at least one run directory")
    if samples < 0:
        raise SegkdError(f"--samples must be >= 0, got {samples}")
    if data is not None:
        from segkd.data import resolve_data_root

        resolve_data_root(data)
    runs = read_runs(list(run_dirs))
    notes = [f"{r.name} is unfinished ({_status(r)}): shown with what it has logged" for r in runs if not r.finished]
    say("loading checkpoints")
    entries = [e for r in runs for e in run_entries(r)]
    notes += [f"{e.label}: no checkpoint yet, so no GMACs, latency or samples" for e in entries if e.model is None]
    class_names = next((r.classes for r in runs if r.classes), [])
    teacher_rows, teacher_notes = _teacher_entries(runs, teacher, data, len(class_names), say)
    entries += teacher_rows
    notes += teacher_notes
    for e in entries:
        say(f"measuring {e.label}")
        measure_cost(e, latency)

    colour = figures.colours([e.label for e in entries])
    teachers = {e.label: e.miou for e in entries if e.role == "teacher" and e.miou is not None}
    series = [(e.label, e.per_class_iou) for e in entries if e.per_class_iou]
    figs = []
    for key, title, png in (("loss", "Training loss", figures.loss_figure(runs, colour)),
                            ("miou", "Validation mIoU", figures.miou_figure(runs, colour, teachers)),
                            ("per-class", "Per-class IoU", figures.per_class_figure(class_names, series, colour))):
        if png is not None:
            figs.append(Figure(key, title, png))
    say("predicting samples")
    try:
        sample_figs = sample_figures(entries, data, samples, class_names)
    except SegkdError as e:
        if data is not None:
            raise
        sample_figs = []
        notes.append(f"no sample overlays: {e} (pass --data ROOT)")
    tables = [runs_table(runs), results_table(entries), cost_table(entries, latency)]
    if series:
        tables.append(per_class_table(class_names, series))
    title = "segkd report: " + ", ".join(r.name for r in runs)
    created = f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, segkd {__version__}"
    return Report(title, created, tables, figs, sample_figs, notes)
