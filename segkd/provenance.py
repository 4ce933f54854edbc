"""Where a result came from: one block for run.json, the eval JSON and the bench report.

``created`` (local time, ISO 8601, as bench always wrote it), ``argv`` (the command line that produced the file)
and ``environment`` (versions, machine, threads, device: :func:`environment`, the block bench reports) so any two
files can be compared on the same terms.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from segkd import __version__


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
    return {"created": now(), "argv": command_line(),
            "environment": environment(torch.device(device), threads or torch.get_num_threads())}


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    """Versions, machine, thread count and load: what a reader needs to judge the figures."""
    try:
        import onnxruntime as ort  # optional here: run.json says null without it; heavy to import

        ort_version: str | None = ort.__version__
    except ImportError:
        ort_version = None
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "segkd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "load_avg": load,
    }
