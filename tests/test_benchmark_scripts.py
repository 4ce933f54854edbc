"""Every benchmark script starts as its docstring says to run it, ``python benchmarks/<name>.py``: from another
working directory and without PYTHONPATH, so a script that imports a sibling (``benchmarks.cache_topk``) must find
the repository itself. (device_warp.py once failed that import only after its 8-minute run, losing the table.)

One interpreter runs every script's ``--help`` in turn (torch imported once), each as ``__main__`` from its path
with ``sys.path`` and the ``benchmarks`` modules reset to what a fresh ``python benchmarks/<name>.py`` has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if "argparse" in p.read_text())

DRIVER = r"""
import contextlib, io, json, runpy, sys
base, out = list(sys.path), {}
for script in sys.argv[1:]:
    sys.path[:] = [str(__import__("pathlib").Path(script).parent), *base[1:]]  # as `python script` sets it
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        del sys.modules[name]
    sys.argv = [script, "--help"]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(script, run_name="__main__")
        out[script] = "no exit"
    except SystemExit as e:
        out[script] = "ok" if e.code in (0, None) and "usage:" in buf.getvalue() else f"exit {e.code}"
    except Exception as e:
        out[script] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_the_scripts_are_found() -> None:
    assert {"device_warp.py", "c2vkd_floor.py", "onnx_cache_agreement.py", "dkd_loss_cost.py"} <= {
        p.name for p in SCRIPTS}


def test_every_benchmark_script_imports_as_documented(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", DRIVER, *map(str, SCRIPTS)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {str(p): "ok" for p in SCRIPTS}
