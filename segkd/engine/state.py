"""Resume state: one file, written atomically, holding only plain tensors, numbers, strings, lists and dicts.

Such a file loads with ``torch.load(weights_only=True)`` (no pickled code is ever executed). The numpy and Python
RNG states, which are tuples holding an ndarray, are converted to lists here and back on restore.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segkd.checkpoint import atomic_write_bytes, load_refusal
from segkd.errors import SegkdError

RESUME_FILE = "resume.pt"
STATE_VERSION = 1


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (CPU) and CUDA RNG states as plain data."""
    py_version, py_state, py_gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((int(py_version), tuple(int(v) for v in py_state), py_gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_cpu(obj: Any) -> Any:
    """Recursively move tensors to the CPU (a resume file must load on any machine)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_cpu(v) for v in obj]
    return obj


def save_resume(path: str | Path, state: dict[str, Any]) -> Path:
    """Write the resume state atomically (temp file, fsync, rename): a crash leaves the previous file intact."""
    payload = {"version": STATE_VERSION, **to_cpu(state)}
    buf = io.BytesIO()  # in memory: torch's own file writer reports ENOSPC as a RuntimeError, Python's as OSError
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def resolve_resume_path(path: str | Path) -> Path:
    """A run directory or a resume file -> the resume file, or a one-line error."""
    path = Path(path)
    if path.is_dir():
        path = path / RESUME_FILE
    if not path.is_file():
        raise SegkdError(f"{path}: no resume state here (expected a run directory holding {RESUME_FILE} or the file)")
    return path


def load_resume(path: str | Path) -> dict[str, Any]:
    """Read a resume file safely (``weights_only=True``)."""
    path = resolve_resume_path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a crafted pickle gets the refusal in one clause (torch's own text is a page of ANSI)
        reason = load_refusal(e, fix="segkd writes resume files of tensors and plain values only")
        raise SegkdError(f"{path}: not a readable segkd resume file ({reason})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "iteration" not in state:
        raise SegkdError(f"{path}: not a segkd resume file (version {STATE_VERSION} expected)")
    return state
