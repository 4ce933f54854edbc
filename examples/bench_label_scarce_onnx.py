"""The label-scarce timm student's exported latency beside SegFormer-B0's, in one ``segkd bench`` run (issue 20).

Exports each checkpoint with ``segkd export`` (fp32, dynamic H/W, verified against PyTorch at ``--size``) and times
both ONNX files in ONE ``segkd bench`` call on ONNX Runtime's CPU provider at ``--size`` (batch 1), the baseline
first so the table's "vs 1st" columns are the student's speed-up over it. The page says what each checkpoint is
(its run's command, iterations and val mIoU from its metadata, its sha256), and marks checkpoints that record no
training as **untrained weights**: their latency is still the model's (a forward's cost does not depend on the
weight values), but they carry no accuracy.

    python examples/bench_label_scarce_onnx.py \\
        --student runs/conv/quarter-mnv3-kd_unl_s0/last.safetensors \\
        --baseline runs/conv/quarter-b0_s0/last.safetensors --out docs/bench-label-scarce-onnx

writes ``STEM.json`` (the bench report, the export reports' figures, the checkpoints' provenance) and ``STEM.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from segkd.checkpoint import atomic_write_text, file_sha256, read_meta
from segkd.export.onnx_export import ExportConfig, export_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="The distilled student (quarter-mnv3-kd+unl) checkpoint.")
    p.add_argument("--baseline", required=True, help="The SegFormer-B0 checkpoint (quarter-b0 or b0).")
    p.add_argument("--out", default="docs/bench-label-scarce-onnx", help="Output stem: STEM.json and STEM.md.")
    p.add_argument("--size", default="180x240", help="Export verification and bench input size HxW.")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads.")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--work", default=None, help="Folder for the ONNX files (default: a temporary one).")
    return p.parse_args(argv)


def segkd(*args: str) -> None:
    """``segkd ARGS`` in a child process of this interpreter; its output passes through, a failure ends here."""
    cmd = [sys.executable, "-m", "segkd", *args]
    print("$ segkd " + " ".join(args), file=sys.stderr, flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"segkd {args[0]} failed (command above)")


def provenance(path: Path) -> dict[str, Any]:
    """What a checkpoint says of itself: model, the command that wrote it, its iteration and val mIoU, sha256."""
    meta = read_meta(path)
    it = meta.metrics.get("iteration")
    return {"checkpoint": str(path), "sha256": file_sha256(path), "model": meta.model, "source": meta.source,
            "iteration": it, "val_miou": meta.metrics.get("miou"), "trained": bool(it)}


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Export both checkpoints, then one bench run (a ``segkd bench`` process) over the two ONNX files."""
    models = {"baseline": Path(args.baseline), "student": Path(args.student)}
    onnx, exports = {}, {}
    for role, ckpt in models.items():  # `segkd export CKPT --out ONNX --size S --threads T`, in this process
        onnx[role] = work / f"{role}.onnx"
        print(f"$ segkd export {ckpt} --out {onnx[role]} --size {args.size} --threads {args.threads}", file=sys.stderr)
        report = export_checkpoint(ckpt, onnx[role], ExportConfig(size=args.size, threads=args.threads,
                                                                  progress=False))
        exports[role] = {k: v for k, v in report.items() if k in ("bytes", "seconds", "opset", "verification")}
    bench = work / "bench.json"
    segkd("bench", str(onnx["baseline"]), str(onnx["student"]), "--input", args.size, "--device", "cpu",
          "--providers", "cpu", "--threads", str(args.threads), "--warmup", str(args.warmup), "--iters",
          str(args.iters), "--json-out", str(bench))
    return {"models": {role: {**provenance(ckpt), "onnx_sha256": file_sha256(onnx[role]), "export": exports[role]}
                       for role, ckpt in models.items()},
            "bench": json.loads(bench.read_text()), "settings": {k: getattr(args, k) for k in
                                                                  ("size", "threads", "warmup", "iters")}}


def weights_cell(m: dict[str, Any]) -> str:
    if not m["trained"]:
        return "**untrained weights** (no training recorded: latency only)"
    miou = f", val mIoU {100 * m['val_miou']:.2f}" if m.get("val_miou") is not None else ""
    return f"`{m['source']}`, iteration {m['iteration']}{miou}"


def markdown(result: dict[str, Any]) -> str:
    b, s = result["bench"], result["settings"]
    env = b["environment"]
    lines = ["# The label-scarce timm student against SegFormer-B0: exported latency (ONNX Runtime, CPU)", "",
             "Generated by `examples/bench_label_scarce_onnx.py` (raw figures in the .json beside this page): both "
             f"checkpoints exported by `segkd export` (fp32, dynamic H/W, verified at {s['size']}), then one `segkd "
             f"bench` over the two ONNX files at 1x3x{s['size']} on ONNX Runtime's CPU provider, {s['threads']} "
             f"thread(s), {s['warmup']} warm-up and at least {s['iters']} timed calls each.", "",
             "| role | model | weights | params (M) | GMACs | ORT CPU ms p50 (p90) | speed-up vs baseline |",
             "|---|---|---|---:|---:|---:|---:|"]
    p50 = {}
    for role, bm in zip(("baseline", "student"), b["models"], strict=True):
        run = next(r for r in bm["runs"] if r["backend"] == "onnxruntime")
        p50[role] = run["latency_ms"]["p50"]
        m = result["models"][role]
        speed = "—" if role == "baseline" else f"{p50['baseline'] / p50[role]:.2f}x"
        lines.append(f"| {role} | {m['model']} | {weights_cell(m)} | {bm['params_m']:.2f} | "
                     f"{bm['complexity'][0]['gmacs']:.3f} | {run['latency_ms']['p50']:.2f} "
                     f"({run['latency_ms']['p90']:.2f}){' contended' if run.get('contended') else ''} | {speed} |")
    lines += ["", "Checkpoints (sha256): " + "; ".join(
        f"{role} `{Path(m['checkpoint']).name}` `{m['sha256'][:16]}…` (ONNX `{m['onnx_sha256'][:16]}…`)"
        for role, m in result["models"].items()) + ".", "",
        f"Machine: {env.get('cpu_model')}, {env.get('logical_cpus')} logical CPUs, load average "
        f"{', '.join(f'{v:.1f}' for v in env.get('load_avg') or [])} at the start; onnxruntime "
        f"{env.get('onnxruntime')}, torch {env.get('torch')}. A shared machine: compare the two rows of this run, "
        "not figures of other runs; `contended` marks a timed loop whose process got less CPU than its threads "
        "(another process shared the cores: that latency is too high).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="segkd-label-scarce-bench-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = measure(args, work)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(stem.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
