"""What a distillation step costs with the teacher cache against the student alone, and without it.

Runs ``segkd bench --train-step`` for each method twice: with ``--teacher-cache`` (teacher targets come with the
batch; bound = the student alone) and with the teacher online (bound = teacher forward without grad + the student
alone). Reports wall p50 ratios and, because a shared machine makes wall time noisy, CPU-time ratios (mean wall x
the process's CPU utilisation over the timed loop). One JSON per (method, mode) under ``--out`` (resumable), a
markdown table on stdout and in ``--docs``.

    python benchmarks/cached_steps.py --methods kd,cwd,dkd,c2vkd --teacher deeplabv3-resnet50 --input 2x3x256x512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from segkd.checkpoint import atomic_write_text


def run(method: str, cached: bool, args: argparse.Namespace) -> dict:
    path = Path(args.out) / f"step_{method}_{'cached' if cached else 'online'}.json"
    if not path.exists():
        cmd = [sys.executable, "-m", "segkd.cli", "bench", "--train-step", "--method", method, "--teacher",
               args.teacher, "--student", args.student, "--input", args.input, "--iters", str(args.iters),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", "cpu",
               "--json-out", str(path)] + (["--teacher-cache"] if cached else [])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS":
                                                                          str(args.threads)})
    return json.loads(path.read_text())["train_step"][0]


def cpu_ms(entry: dict) -> float:
    return entry["latency_ms"]["mean"] * entry["cpu_util"]


def render(rows: list[tuple[str, dict, dict]], args: argparse.Namespace) -> str:
    lines = [f"Teacher {args.teacher}, student {args.student}, input {args.input}, {args.threads} thread(s), AdamW; "
             "step / bound as `segkd bench --train-step` defines them (with the cache the bound is the student "
             "alone). CPU time = mean wall x CPU utilisation of the timed loop.", "",
             "| method | cached: step / student alone (wall p50) | cached (CPU time) | + warp per batch (ms) | "
             "online: step / its bound (wall p50) | online (CPU time) | cached step CPU / online step CPU |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m, c, o in rows:
        cc = cpu_ms(c["method_step"]) / cpu_ms(c["lower_bound"])
        oc = cpu_ms(o["method_step"]) / cpu_ms(o["lower_bound"])
        share = cpu_ms(c["method_step"]) / cpu_ms(o["method_step"])
        lines.append(f"| {m} | {c['overhead_ratio']:.2f}x | {cc:.2f}x | {c['warp']['latency_ms']['p50']:.0f} | "
                     f"{o['overhead_ratio']:.2f}x | {oc:.2f}x | {share:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="kd,cwd,dkd,c2vkd")
    p.add_argument("--teacher", default="deeplabv3-resnet50")
    p.add_argument("--student", default="segformer-b0")
    p.add_argument("--input", default="2x3x256x512")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/cached-steps")
    p.add_argument("--docs", default="benchmarks/results/cached-steps.md")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = [(m, run(m, True, args), run(m, False, args)) for m in args.methods.split(",")]
    text = render(rows, args)
    atomic_write_text(Path(args.docs), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
