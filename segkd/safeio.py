"""Filesystem helpers every command shares: output-path checks, one-line ``OSError`` messages, orphan temp files.

A command that writes checks its output paths up front (:func:`check_output`), so a file where a directory is
expected (or the reverse) fails before any work, naming the option. Any ``OSError`` that still escapes (read-only
file system, disk full, permissions) is turned into one line by :func:`os_error_message`, the single formatter the
CLI and the trainer use. :func:`remove_orphan_tmps` deletes the temp files of atomic writes killed mid-write;
:func:`remove_dead_tmps` and :func:`segkd_tempdir` do the same where no lock says who writes (export, report, the
scratch folders in the system temp dir), by the writer's pid in the temp name.
:func:`guard_broken_pipes` keeps a run going when the reader of its stdout/stderr goes away (``| head``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TextIO

from segkd.errors import SegkdError

# temp files of segkd.checkpoint.atomic_write: ".<target name>.<pid>-<random>.tmp" beside the target (older
# versions wrote ".<target name>.<random>.tmp"; a run directory's lock removes both)
TMP_GLOB = ".*.tmp"
_PID_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[^.]*\.tmp$")
_PID_SCRATCH = re.compile(r"^segkd-[a-z0-9]+-(?P<pid>\d+)-")


def tmp_prefix(name: str) -> str:
    """The prefix of a temp file or folder standing in for ``name`` while it is written: ``.NAME.PID-`` (the
    writer's pid tells a later command an orphan of a killed writer from the temp of a live one)."""
    return f".{name}.{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**31  # another user's live process (or a pid no system has)
    return True


def _remove(path: Path) -> int:
    """Delete a file or a folder tree (never following a link out); its size in bytes, 0 if it was gone."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(path)
            return size
        size = path.lstat().st_size
        path.unlink()
        return size
    return 0


def remove_dead_tmps(folder: str | Path, name: str | None = None) -> tuple[int, int]:
    """Delete the temp files and folders (``.NAME.PID-*.tmp``, of ``name`` only when given) in ``folder`` whose
    writing process is gone (killed mid-write); the temps of live writers stay. Returns (entries, bytes)."""
    folder, count, size = Path(folder), 0, 0
    if not folder.is_dir():
        return 0, 0
    for entry in folder.iterdir():
        m = _PID_TMP.match(entry.name)
        if m and (name is None or m["name"] == name) and not _alive(int(m["pid"])):
            size += _remove(entry)
            count += 1
    return count, size


@contextlib.contextmanager
def segkd_tempdir(kind: str) -> Iterator[Path]:
    """A scratch folder ``segkd-KIND-PID-*`` in the system temp dir, removed on exit; the folders of segkd
    processes that were killed (their pid gone) are removed first, so ``kill -9`` leaves nothing for good."""
    root = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            m = _PID_SCRATCH.match(entry.name)
            if m and entry.is_dir() and entry.stat().st_uid == os.getuid() and not _alive(int(m["pid"])):
                _remove(entry)
    with tempfile.TemporaryDirectory(prefix=f"segkd-{kind}-{os.getpid()}-") as tmp:
        yield Path(tmp)


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
