"""An exclusive lock on a run directory, so two runs can never write into one ``--out`` at the same time.

The lock is ``fcntl.flock`` on ``<run dir>/.segkd.lock``, which holds the owner's pid and host for the message.
The kernel drops a flock when its process dies (even by ``kill -9``), so a lock file left by a dead run is stale by
construction and simply taken over. The lock is released (file removed) when the run ends; a run directory the lock
itself created is removed again if nothing else was written into it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from segkd.errors import SegkdError
from segkd.safeio import check_output

LOCK_FILE = ".segkd.lock"


class RunLock:
    """A held lock on ``folder``; :meth:`release` gives it back (idempotent)."""

    def __init__(self, folder: Path, fd: int | None, created: bool) -> None:
        self.folder, self.fd, self.created = folder, fd, created

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # unlinked while still held: a waiting opener re-checks the inode (see acquire)
        os.close(self.fd)
        self.fd = None
        if self.created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only succeeds when the run wrote nothing

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        text = path.read_text().split()
    except OSError:
        return "another process"
    return f"pid {text[0]} on {text[1]}" if len(text) >= 2 else "another process"


def acquire_run_lock(folder: str | Path, option: str = "--out", enabled: bool = True) -> RunLock:
    """Create ``folder`` if needed and lock it, or fail with one line naming the process that holds it.

    ``enabled=False`` (the other ranks under torchrun, which write nothing) returns a lock that holds nothing."""
    folder = check_output(folder, "dir", option)
    if not enabled:
        return RunLock(folder, None, False)
    created = not folder.exists()
    path = folder / LOCK_FILE
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # read-only or full file system: the run directory is named, not the lock file
            err = OSError(e.errno, e.strerror or str(e), str(folder))
            err.add_note("nothing was written")
            raise err from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SegkdError(f"{folder} is in use by another segkd run ({_holder(path)}); wait for it to end or "
                             f"choose another {option}") from None
        try:  # the previous holder may have unlinked the file between our open and our flock: lock the new one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
    return RunLock(folder, fd, created)
