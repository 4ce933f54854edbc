"""Where a result came from: one block for run.json, the eval JSON and the bench report.

``created`` (local time, ISO 8601, as bench always wrote it), ``argv`` (the command line that produced the file)
and ``environment`` (versions, machine, threads, device: :func:`segkd.bench.run.environment`, the block bench
reports) so any two files can be compared on the same terms.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch


def now() -> str:
    """The local time, ISO 8601 with its UTC offset (e.g. ``2026-12-02T13:52:12+0000``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def command_line() -> list[str]:
    """``sys.argv`` with the program shown as ``segkd`` (``python -m segkd`` and the console script alike)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("segkd", "__main__.py", "-m"):
        argv[0] = "segkd"
    return argv


def provenance(device: torch.device | str, threads: int | None = None) -> dict[str, Any]:
    """``{"created", "argv", "environment"}`` for a file written now on ``device``."""
    from segkd.bench.run import environment

    return {"created": now(), "argv": command_line(),
            "environment": environment(torch.device(device), threads or torch.get_num_threads())}
