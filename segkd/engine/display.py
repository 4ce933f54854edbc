"""The trainer's progress display: a rich bar on a terminal, plain periodic lines otherwise (never silence)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Display:
    """A rich progress bar on a TTY; plain periodic lines otherwise (or with ``--no-progress``)."""

    def __init__(self, total: int, start: int, enabled: bool, rich_ok: bool) -> None:
        self.total, self.enabled = total, enabled
        self.bar = None
        if enabled and rich_ok:

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=False)
            self.task_id = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, it: int, text: str, eta_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task_id, completed=it, info=text)
        else:
            eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0)))
            print(f"iter {it}/{self.total}  {text}  eta {eta}", file=sys.stderr, flush=True)

    def advance(self, it: int) -> None:
        """Move the bar without a new text (plain mode prints only at log intervals)."""
        if self.bar is not None:
            self.bar.update(self.task_id, completed=it)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
