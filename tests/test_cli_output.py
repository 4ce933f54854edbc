"""Issue 14: what the CLI prints (plain lines, no wrapping when piped, a closed pipe), file modes and flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TRAIN = ["train", "--model", "segformer-b0", "--data", "synth", "--crop", "32x32", "--batch", "2", "--workers", "0",
         "--device", "cpu", "--val-every", "100"]


def _env(**kw: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **kw}


def _segkd(*args: str, **kw: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segkd", *args], capture_output=True, text=True, env=_env(**kw),
                          timeout=300)


def test_no_progress_prints_plain_lines_and_a_closed_pipe_does_not_end_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # `segkd train ... 2>&1 | head -1`: the reader goes away after the first line
    p = subprocess.Popen([sys.executable, "-m", "segkd", *TRAIN, "--iters", "4", "--log-every", "1", "--no-progress",
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    assert p.stdout is not None
    first = p.stdout.readline().decode()
    p.stdout.close()
    assert p.wait(timeout=300) == 0
    assert first.startswith("iter 1/4"), first  # --no-progress: plain lines, not silence
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["iterations"] == 4 and (out / "last.safetensors").is_file()
