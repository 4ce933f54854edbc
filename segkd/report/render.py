"""A :class:`~segkd.report.build.Report` as one self-contained HTML page (figures inlined as base64 PNG, inline
CSS, no external reference) and as markdown whose figures are PNG files in a folder beside it."""

from __future__ import annotations

import base64
import html
import os
import shutil
import tempfile
from pathlib import Path

from segkd.checkpoint import atomic_write_bytes, atomic_write_text
from segkd.errors import SegkdError
from segkd.report.build import Figure, Report, Table
from segkd.safeio import remove_dead_tmps, tmp_prefix

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1b1b1b; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.meta { color: #666; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; white-space: nowrap; }
th { background: #f3f3f3; } .num { text-align: right; } td.wrap { white-space: normal; min-width: 260px; }
.note { color: #555; font-size: 12px; margin: 2px 0 10px; }
.notes li { color: #8a4b00; font-size: 13px; }
img { max-width: 100%; height: auto; display: block; margin: 6px 0 14px; }
"""


WRAP = ' class="wrap"'  # long text cells (the schedule) wrap; every other cell stays on one line


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "-"
    return True


def numeric_columns(t: Table) -> list[bool]:
    """Columns (after the first) whose every cell is a number or '-': right-aligned in both formats."""
    return [i > 0 and all(_is_number(row[i]) for row in t.rows) for i in range(len(t.header))]


def html_table(t: Table) -> str:
    align = [' class="num"' if n else "" for n in numeric_columns(t)]
    head = "".join(f"<th{a}>{html.escape(h)}</th>" for a, h in zip(align, t.header))
    body = []
    for row in t.rows:
        cells = "".join(f"<td{WRAP if len(c) > 40 else a}>{html.escape(c)}</td>" for a, c in zip(align, row))
        body.append(f"<tr>{cells}</tr>")
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return f"<h2>{html.escape(t.title)}</h2>\n<table><tr>{head}</tr>\n" + "\n".join(body) + f"\n</table>{note}\n"


def html_figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    caption = f'<p class="note">{html.escape(f.caption)}</p>\n' if f.caption else ""
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(f.title)}">\n' + caption


def render_html(report: Report) -> str:
    """The whole page as one string; every image is a ``data:`` URI, so the file stands alone."""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(report.title)}"
             f"</title>\n<style>{CSS}</style></head><body>\n<h1>{html.escape(report.title)}</h1>\n"
             f'<p class="meta">{html.escape(report.created)}</p>\n']
    if report.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>\n")
    tables = {t.title: t for t in report.tables}
    for t in report.tables[:3]:
        parts.append(html_table(t))
    if report.figures:
        parts.append("<h2>Curves and per-class IoU</h2>\n")
        parts += [html_figure(f) for f in report.figures]
    if "Per-class IoU (%)" in tables:
        parts.append(html_table(tables["Per-class IoU (%)"]))
    if report.samples:
        parts.append("<h2>Validation samples</h2>\n")
        parts += [html_figure(f) for f in report.samples]
    parts.append("</body></html>\n")
    return "".join(parts)


def md_table(t: Table) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    numeric = numeric_columns(t)
    lines = [f"## {t.title}", "", "| " + " | ".join(map(cell, t.header)) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in t.rows]
    if t.note:
        lines += ["", f"*{t.note}*"]
    return "\n".join(lines) + "\n"


def render_markdown(report: Report, figure_dir: str) -> str:
    """Markdown with the same tables; figures linked as ``figure_dir/<key>.png`` (relative to the .md file)."""
    parts = [f"# {report.title}", "", report.created, ""]
    parts += [f"- {n}" for n in report.notes] + ([""] if report.notes else [])
    tables = {t.title: t for t in report.tables}
    parts += [md_table(t) for t in report.tables[:3]]
    if report.figures:
        parts += ["## Curves and per-class IoU", ""]
        parts += [f"![{f.title}]({figure_dir}/{f.key}.png)\n" for f in report.figures]
    if "Per-class IoU (%)" in tables:
        parts.append(md_table(tables["Per-class IoU (%)"]))
    if report.samples:
        parts += ["## Validation samples", ""]
        parts += [f"![{f.title}]({figure_dir}/{f.key}.png)\n" + (f"\n{f.caption}\n" if f.caption else "")
                  for f in report.samples]
    return "\n".join(parts)


def write_report(report: Report, out_html: str | Path) -> tuple[Path, Path, Path]:
    """Write ``out_html``, the markdown beside it (``.md``) and its figures (``<stem>_figures/*.png``), atomically."""
    out_html = Path(out_html)
    md_path = out_html.with_suffix(".md")
    if md_path == out_html:
        raise SegkdError(f"--out {out_html}: give the HTML page's path (the markdown is written beside it as .md)")
    fig_dir = out_html.with_name(f"{out_html.stem}_figures")
    for name in (out_html.name, md_path.name, fig_dir.name):  # what a report killed mid-write left
        remove_dead_tmps(out_html.parent, name)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=tmp_prefix(out_html.name), suffix=".tmp", dir=out_html.parent))
    try:
        (stage / fig_dir.name).mkdir()
        for f in report.figures + report.samples:
            atomic_write_bytes(stage / fig_dir.name / f"{f.key}.png", f.png)
        atomic_write_text(stage / md_path.name, render_markdown(report, fig_dir.name))
        atomic_write_text(stage / out_html.name, render_html(report))
        _swap_in(stage, fig_dir, md_path, out_html)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_html, md_path, fig_dir


def _swap_in(stage: Path, fig_dir: Path, md_path: Path, out_html: Path) -> None:
    """Put a staged report in place: the whole figures folder (an earlier report's figures go with the stage, so no
    stale figure stays), then the markdown, then the page, each by a rename. Choice: three renames, not one (the
    page, its markdown and its folder are three names the user asked for); a kill can only land between renames
    (microseconds), not while seconds of figures are written, and the next report removes what it left."""
    if fig_dir.is_dir() and not fig_dir.is_symlink():
        os.rename(fig_dir, stage / ".earlier_figures")
    os.rename(stage / fig_dir.name, fig_dir)
    os.replace(stage / md_path.name, md_path)
    os.replace(stage / out_html.name, out_html)
