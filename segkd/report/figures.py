"""The report's figures as PNG bytes, drawn with matplotlib's object API (no pyplot state, no display needed)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from segkd.report.runs import Run

TEACHER_COLOUR = "#444444"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def colours(labels: Sequence[str]) -> dict[str, str]:
    """One colour per label, the same in every figure; teachers grey."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    out, k = {}, 0
    for label in labels:
        if label.startswith("teacher"):
            out[label] = TEACHER_COLOUR
        else:
            out[label] = cmap(k % 10)
            k += 1
    return out


def _line(ax, pts: list[tuple[float, float]], **kw) -> None:
    if pts:
        ax.plot(*zip(*pts), marker="o" if len(pts) < 20 else None, ms=3, **kw)


def _ce(rec: dict) -> float | None:
    """The student's unweighted cross-entropy of a train record (``raw_ce`` in distill runs, ``loss_ce`` else)."""
    return rec.get("raw_ce", rec.get("loss_ce"))


def loss_figure(runs: list[Run], colour: dict[str, str]) -> bytes | None:
    """Training loss against iteration. Left: every run's total loss (what it minimised). Right: with one run its
    weighted terms; with several, each student's unweighted cross-entropy, the one term every method shares."""
    drawn = [r for r in runs if any("loss" in rec for rec in r.train)]
    if not drawn:
        return None
    fig = _figure(11, 3.6)
    total, parts = fig.subplots(1, 2)
    for r in drawn:
        c = colour.get(r.label(r.models[0]))
        _line(total, [(rec["iter"], rec["loss"]) for rec in r.train if rec.get("loss") is not None], label=r.name,
              color=c, lw=1.5)
        if len(drawn) > 1:
            _line(parts, [(rec["iter"], _ce(rec)) for rec in r.train if _ce(rec) is not None], label=r.name,
                  color=c, lw=1.5)
    if len(drawn) == 1:
        r = drawn[0]
        for term in sorted({k for rec in r.train for k in rec if k.startswith("loss_")}):
            _line(parts, [(rec["iter"], rec[term]) for rec in r.train if rec.get(term) is not None], label=term,
                  lw=1.2)
        parts.set_title(f"{r.name}: loss terms (weighted)")
    else:
        parts.set_title("Student cross-entropy (unweighted)")
    total.set_title("Training loss (total)")
    for ax in (total, parts):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
    total.set_ylabel("logged mean over the last steps")
    return to_png(fig)


def miou_figure(runs: list[Run], colour: dict[str, str], teachers: dict[str, float]) -> bytes | None:
    """Validation mIoU (%) against iteration for every deploy model; teachers as horizontal reference lines."""
    series = [(r.label(m), r.val_of(m)) for r in runs for m in r.models]
    series = [(label, [v for v in recs if v.get("miou") is not None]) for label, recs in series]
    series = [(label, recs) for label, recs in series if recs]
    if not series:
        return None
    fig = _figure(9, 3.6)
    ax = fig.add_subplot()
    for label, recs in series:
        ax.plot([v["iter"] for v in recs], [100 * v["miou"] for v in recs], marker="o", ms=3, lw=1.6,
                label=label, color=colour.get(label))
    for label, miou in teachers.items():
        ax.axhline(100 * miou, color=TEACHER_COLOUR, ls=":", lw=1.4, label=f"{label} ({100 * miou:.1f})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("val mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Validation mIoU")
    return to_png(fig)


def per_class_figure(class_names: Sequence[str], series: list[tuple[str, Sequence[float | None]]],
                     colour: dict[str, str]) -> bytes | None:
    """Grouped bars of per-class IoU (%), one group per class, one bar per model (missing values left out)."""
    series = [(label, vals) for label, vals in series if vals]
    if not series or not class_names:
        return None
    k, m = len(class_names), len(series)
    fig = _figure(max(9.0, 0.22 * k * m + 2), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / m
    x = np.arange(k)
    for j, (label, vals) in enumerate(series):
        y = [np.nan if v is None else 100 * v for v in list(vals)[:k]]
        ax.bar(x - 0.4 + width * (j + 0.5), y, width, label=label, color=colour.get(label))
    ax.set_xticks(x, list(class_names), rotation=35 if k > 6 else 0, ha="right" if k > 6 else "center", fontsize=9)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(m, 4), loc="upper right")
    ax.set_title("Per-class IoU")
    return to_png(fig)


def sample_figure(title: str, panels: list[tuple[str, np.ndarray]],
                  legend: list[tuple[str, Sequence[int]]]) -> bytes:
    """One validation image: a row of panels (image | ground truth | each prediction) and a class legend."""
    from matplotlib.patches import Patch

    h, w = panels[0][1].shape[:2]
    n = len(panels)
    cols = n if n <= 4 else min(4, math.ceil(n / 2))
    rows = math.ceil(n / cols)
    tile = min(3.6, 11.0 / cols)
    fig = _figure(tile * cols, rows * (tile * h / w + 0.3) + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, (name, rgb) in zip(axes, panels):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(name, fontsize=10)
    handles = [Patch(facecolor=np.asarray(c) / 255, edgecolor="#888888", label=n) for n, c in legend]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8), fontsize=9,
                   frameon=False)
    fig.suptitle(title, fontsize=10)
    return to_png(fig)
