"""Terminal output rules every command shares: piped output is never wrapped, tables are never truncated.

rich assumes 80 columns when stdout is a file or pipe and wraps or squeezes to fit, so scripts reading ``segkd ...
| grep`` saw broken lines and ``3…`` cells. Here text printed to a pipe soft-wraps (one logical line stays one
line) and a table is printed at its natural width there; on a terminal a table too wide for it is narrowed by
wrapping cells at spaces, never below a column's longest word (if even that does not fit, the terminal folds the
lines rather than segkd cutting cells short).
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


def make_console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr) that does not wrap lines when that stream is not a terminal, and never
    colours text by guessing (rich's highlighter coloured "1x3x60x80" half as numbers); colour is only what segkd
    marks up itself (errors, warnings)."""
    stream = sys.stderr if stderr else sys.stdout
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return Console(stderr=stderr, soft_wrap=not tty, highlight=False)


def human_size(n: float) -> str:
    """A file size for people: ``512 B``, ``12.3 kB``, ``7.4 MB``, ``1.2 GB`` (never ``0.0 MB`` for a small file)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def print_table(console: Console, renderable: Any) -> None:
    """Print ``renderable`` without truncating a cell: natural width when piped, narrowed to the terminal (but
    never below the longest words) on a terminal."""
    wide = console.options.update_width(10_000)
    need = Measurement.get(console, wide, renderable).maximum
    if isinstance(renderable, Table) and console.is_terminal and need > console.width:
        need = _fit_columns(console, renderable, console.width)
    if need <= console.width:
        console.print(renderable)
        return
    old = console.width
    console.width = need
    try:
        console.print(renderable)
    finally:
        console.width = old


def _fit_columns(console: Console, table: Table, width: int) -> int:
    """Fix the column widths of ``table`` so it fits ``width`` if it can: the widest columns give way first, none
    below its longest word (header included), and a ``no_wrap`` column (a name users copy) not at all. Returns the
    table's resulting width."""
    wide = console.options.update_width(10_000)
    ranges = []
    for column in table.columns:
        cells = [c for c in (column.header, *column.cells) if c != ""]
        sizes = [Measurement.get(console, wide, c) for c in cells] or [Measurement(1, 1)]
        hi = max(m.maximum for m in sizes)
        ranges.append((hi if column.no_wrap else max(m.minimum for m in sizes), hi))
    widths = [hi for _, hi in ranges]
    extra = Measurement.get(console, wide, table).maximum - sum(widths)  # borders and padding
    while sum(widths) + extra > width:
        shrinkable = [i for i, w in enumerate(widths) if w > ranges[i][0]]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
    for column, w in zip(table.columns, widths, strict=True):
        column.width = w
    return sum(widths) + extra
