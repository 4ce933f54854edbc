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


def _legend_outside(ax) -> None:
    """The legend to the right of the axes (constrained layout makes room), never over the curves or bars."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _totals(r: Run, relative: bool) -> list[tuple[float, float]]:
    pts = [(rec["iter"], rec["loss"]) for rec in r.train if rec.get("loss") is not None]
    if relative and pts and pts[0][1]:
        return [(i, v / pts[0][1]) for i, v in pts]
    return pts


def loss_figure(runs: list[Run], colour: dict[str, str]) -> bytes | None:
    """Training loss against iteration. Left: the total loss each run minimised; with several runs each relative to
    its own first logged value (the totals of different methods sum different terms, so their scales differ; on
    one absolute axis the largest flattened the others). Right: with one run its weighted terms; with several, each
    student's unweighted cross-entropy, the one term most methods share; a run that logs none is named there."""
    drawn = [r for r in runs if any("loss" in rec for rec in r.train)]
    if not drawn:
        return None
    several = len(drawn) > 1
    fig = _figure(12, 3.6)
    total, parts = fig.subplots(1, 2)
    for r in drawn:
        c = colour.get(r.label(r.models[0]))
        _line(total, _totals(r, several), label=r.name, color=c, lw=1.5)
        if several:
            _line(parts, [(rec["iter"], _ce(rec)) for rec in r.train if _ce(rec) is not None], label=r.name,
                  color=c, lw=1.5)
    if not several:
        r = drawn[0]
        for term in sorted({k for rec in r.train for k in rec if k.startswith("loss_")}):
            _line(parts, [(rec["iter"], rec[term]) for rec in r.train if rec.get(term) is not None], label=term,
                  lw=1.2)
        parts.set_title(f"{r.name}: loss terms (weighted)")
    else:
        parts.set_title("Student cross-entropy (unweighted)")
        missing = [r.name for r in drawn if not any(_ce(rec) is not None for rec in r.train)]
        if missing:  # said on the panel, not left out silently (c2vkd's published objective has no CE term)
            parts.text(0.5, 0.02, f"not shown (no cross-entropy logged): {', '.join(missing)}", fontsize=8,
                       ha="center", va="bottom", transform=parts.transAxes, color="#8a4b00")
    total.set_title("Training loss (total" + (", relative to its first log)" if several else ")"))
    for ax in (total, parts):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        _legend_outside(ax)
    total.set_ylabel("loss / its first logged value" if several else "logged mean over the last steps")
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
    _legend_outside(ax)
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
    if m:
        fig.legend(fontsize=8, ncols=min(m, 4), loc="outside upper center", frameon=False)
    ax.set_title("Per-class IoU")
    return to_png(fig)


# Kelly's colours of maximum contrast (white and black left out: the ignore colour and the background of overlays)
KELLY = [(255, 179, 0), (128, 62, 117), (255, 104, 0), (166, 189, 215), (193, 0, 32), (206, 162, 98), (129, 112, 102),
         (0, 125, 52), (246, 118, 142), (0, 83, 138), (255, 122, 92), (83, 55, 122), (255, 142, 0), (179, 40, 81),
         (244, 200, 0), (127, 24, 13), (147, 170, 0), (89, 51, 21), (241, 58, 19), (35, 44, 22)]
MIN_DELTA_E = 40.0  # CIE76; overlays blend at alpha 0.6, which shrinks every colour difference to about 0.6 of it


def _lab(rgb: Sequence[Sequence[int]]) -> np.ndarray:
    """sRGB (0..255) -> CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64).reshape(-1, 3) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def overlay_palette(palette: Sequence[Sequence[int]], present: Sequence[int]) -> tuple[list[list[int]], list[int]]:
    """The colours the sample overlays use: the dataset's palette, except that a class shown whose colour lies
    within :data:`MIN_DELTA_E` of an earlier shown class's gets the Kelly colour farthest from all kept ones (CamVid's
    Road, Pavement and Car are three purples, indistinguishable once blended over the image). Returns the palette
    and the classes recoloured (the legend shows the colours used; a report note names them)."""
    out = [list(map(int, c)) for c in palette]
    kept: list[list[int]] = []
    changed = []
    for i in sorted(set(present)):
        if i >= len(out):
            continue
        if kept and np.linalg.norm(_lab(kept) - _lab([out[i]]), axis=1).min() < MIN_DELTA_E:
            free = [c for c in KELLY if list(c) not in kept]
            if free:
                dist = np.linalg.norm(_lab(free)[:, None] - _lab(kept)[None], axis=2).min(axis=1)
                out[i] = list(free[int(dist.argmax())])
                changed.append(i)
        kept.append(out[i])
    return out, changed


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
