"""Filesystem helpers every command shares: output-path checks, one-line ``OSError`` messages, orphan temp files.

A command that writes checks its output paths up front (:func:`check_output`), so a file where a directory is
expected (or the reverse) fails before any work, naming the option. Any ``OSError`` that still escapes (read-only
file system, disk full, permissions) is turned into one line by :func:`os_error_message`, the single formatter the
CLI and the trainer use. :func:`remove_orphan_tmps` deletes the temp files of atomic writes killed mid-write.
:func:`guard_broken_pipes` keeps a run going when the reader of its stdout/stderr goes away (``| head``).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any, Literal, TextIO

from segkd.errors import SegkdError

# temp files of segkd.checkpoint.atomic_write: ".<target name>.<random>.tmp" beside the target
TMP_GLOB = ".*.tmp"


def os_error_message(e: OSError) -> str:
    """``"<path>: <cause> (<ERRNO>)"`` plus any notes attached with ``add_note`` (what was kept), one line."""
    code = errno.errorcode.get(e.errno or 0, "")
    cause = e.strerror or str(e) or type(e).__name__
    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    text = f"{where}: {cause}" if where else cause
    if code:
        text += f" ({code})"
    notes = [n for n in getattr(e, "__notes__", ()) if n]
    return "; ".join([text, *notes]).replace("\n", " ")


def _file_ancestor(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is not a directory (so nothing can be created below it)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output(path: str | Path, kind: Literal["file", "dir"], option: str) -> Path:
    """Fail with one line if ``path`` cannot be the output ``kind`` asked by ``option`` (checked before any work)."""
    path = Path(path)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise SegkdError(f"{option} {path}: is a file, but a directory is expected here")
    if kind == "file" and path.is_dir():
        raise SegkdError(f"{option} {path}: is a directory, but a file path is expected here")
    blocker = _file_ancestor(path)
    if blocker is not None:
        raise SegkdError(f"{option} {path}: {blocker} is a file, not a directory")
    return path


def remove_orphan_tmps(folder: str | Path) -> tuple[int, int]:
    """Delete the atomic-write temp files in ``folder`` (left by a killed write); returns (files, bytes).

    Only call it while no other process writes there (the trainer holds the run-directory lock)."""
    folder = Path(folder)
    count = size = 0
    if not folder.is_dir():
        return 0, 0
    for tmp in folder.glob(TMP_GLOB):
        if not tmp.is_file() or tmp.is_symlink():
            continue
        n = tmp.stat().st_size
        tmp.unlink()
        count, size = count + 1, size + n
    return count, size


def write_generated(path: str | Path, text: str, marker: str) -> Path:
    """Write a generated page atomically, keeping whatever follows ``marker`` in the existing file (hand-written
    findings below a regenerated table)."""
    from segkd.checkpoint import atomic_write_text  # lazy CLI start: checkpoint imports torch; the CLI imports safeio

    path = Path(path)
    kept = ""
    if path.exists() and marker in (old := path.read_text()):
        kept = old[old.index(marker):]
    return atomic_write_text(path, text + ("\n" + kept if kept else ""))


class _PipeSafeStream:
    """A text stream whose writes stop silently once its reader has gone (``BrokenPipeError``).

    Progress and log lines are for a reader; when ``segkd train ... | head`` closes the pipe the run must still
    finish and write its files. After the first broken write the descriptor is pointed at /dev/null, so the
    interpreter's final flush of the real stream does not fail either. Everything else is the real stream's."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def _guard(self, call: Any, *args: Any) -> Any:
        if self.broken:
            return None
        try:
            return call(*args)
        except BrokenPipeError:
            self.broken = True
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._stream.fileno())
                os.close(devnull)
            except (OSError, ValueError):  # no descriptor (e.g. captured by a test runner): writes just stop
                pass
            return None

    def write(self, text: str) -> int:
        self._guard(self._stream.write, text)
        return len(text)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard_broken_pipes() -> None:
    """Wrap ``sys.stdout`` and ``sys.stderr`` in :class:`_PipeSafeStream` (once; the CLI's entry point does it)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _PipeSafeStream):
            setattr(sys, name, _PipeSafeStream(stream))
