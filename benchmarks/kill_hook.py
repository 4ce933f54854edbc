"""Run the segkd CLI with a SIGKILL planted in it (the kill -9 faults of tests/test_faults.py and kill_resume.py).

    python benchmarks/kill_hook.py SPEC [segkd arguments...]

SPEC says where the process kills itself with SIGKILL (nothing is cleaned up, no handler runs, as with kill -9):

* ``none``: never (a reference run with the same process layout);
* ``step:N``: right after the N-th optimiser step (iteration N trained, its log line, validation and checkpoints
  not yet written);
* ``write:NAME:K``: inside the K-th atomic write of the file NAME (``last.safetensors``, ``resume.pt``...): its
  temp file is cut to half its size, as a write stopped midway leaves it, and the target is not touched;
* ``rename:NAME:K``: just before the K-th rename onto NAME (its temp file complete and fsynced).

The hooks sit on ``os.replace`` (every segkd write is temp file + fsync + rename) and on torch's global optimiser
step hook, not on segkd internals.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def plant(spec: str) -> None:
    """Install the kill described by ``spec`` (see the module docstring) in this process."""
    kind, *rest = spec.split(":")
    if kind == "none":
        return
    if kind == "step":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        target, seen = int(rest[0]), {"first": None, "steps": 0}

        def after_step(opt: Any, args: Any, kwargs: Any) -> None:
            if seen["first"] is None:
                seen["first"] = id(opt)
            if id(opt) == seen["first"]:  # online methods step two optimisers per iteration: count the first
                seen["steps"] += 1
                if seen["steps"] == target:
                    _die()

        register_optimizer_step_post_hook(after_step)
        return
    if kind in ("write", "rename"):
        name, target = rest[0], int(rest[1])
        real, count = os.replace, {"n": 0}

        def replace(src: Any, dst: Any, *a: Any, **k: Any) -> None:
            if Path(os.fspath(dst)).name == name:
                count["n"] += 1
                if count["n"] == target:
                    if kind == "write":
                        os.truncate(src, os.path.getsize(src) // 2)
                    _die()
            real(src, dst, *a, **k)

        os.replace = replace  # type: ignore[assignment]
        return
    raise SystemExit(f"kill_hook: unknown SPEC {spec!r} (none, step:N, write:NAME:K, rename:NAME:K)")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    plant(sys.argv[1])
    from segkd.cli import main as segkd_main

    sys.argv = ["segkd", *sys.argv[2:]]
    segkd_main()


if __name__ == "__main__":
    main()
