"""Params, GMACs and CPU ONNX latency of timm students against SegFormer-B0 at CamVid's sizes (issue 20).

Every model is built with 11 classes (CamVid), put in its deploy form (reparameterisable encoders fused), exported
with ``segkd bench``'s ONNX pipeline (:func:`segkd.bench.run.export_temp_onnx`: opset 17, dynamic H/W) and timed in
ONNX Runtime on the CPU with one intra-op thread. Timing is interleaved: each round times every model x size once
(``--calls`` calls after ``--warmup``, the median call kept), and the table reports the median over ``--rounds``
rounds, so a burst of load from other processes on a shared machine hits every model alike rather than one row.

    python examples/bench_timm_students.py --out docs/bench-timm-students   # writes .json and .md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODELS = ["segformer-b0", "lraspp-mobilenetv3_large_100", "lraspp-mobilenetv4_conv_small", "mlp-mobileone_s0",
          "mlp-efficientvit_b0"]
SIZES = [(60, 80), (180, 240)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/bench-timm-students", help="Output stem: STEM.json and STEM.md.")
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--classes", type=int, default=11)
    return p.parse_args(argv)


def prepare(names: list[str], classes: int, tmp: Path) -> dict[str, dict[str, Any]]:
    """Per model: deploy params, GMACs per size, and an ONNX Runtime session (1 thread)."""
    from segkd.bench.run import export_temp_onnx
    from segkd.export.runtime import create_session
    from segkd.models import count_params, create_model
    from segkd.models.flops import count_flops

    out = {}
    for name in names:
        torch.manual_seed(0)
        model = create_model(name, num_classes=classes).eval().deploy_form()
        path = tmp / f"{name}.onnx"
        export_temp_onnx(model, (1, 3, *SIZES[0]), path)
        out[name] = {"params_m": count_params(model) / 1e6,
                     "gmacs": {f"{h}x{w}": count_flops(model, (1, 3, h, w)).gmacs for h, w in SIZES},
                     "session": create_session(path, ("cpu",), threads=1)}
    return out


def time_once(session: Any, hw: tuple[int, int], calls: int, warmup: int) -> float:
    """Median wall time (ms) of ``calls`` runs on one random image."""
    x = np.random.default_rng(0).standard_normal((1, 3, *hw)).astype(np.float32)
    name = session.get_inputs()[0].name
    for _ in range(warmup):
        session.run(None, {name: x})
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="segkd-timm-bench-") as tmp:
        models = prepare(args.models, args.classes, Path(tmp))
        rounds: dict[str, dict[str, list[float]]] = {n: {f"{h}x{w}": [] for h, w in SIZES} for n in models}
        for _ in range(args.rounds):
            for hw in SIZES:
                for name, m in models.items():
                    rounds[name][f"{hw[0]}x{hw[1]}"].append(time_once(m["session"], hw, args.calls, args.warmup))
    rows = [{"model": n, "params_m": m["params_m"], "gmacs": m["gmacs"],
             "latency_ms": {k: statistics.median(v) for k, v in rounds[n].items()},
             "latency_min_ms": {k: min(v) for k, v in rounds[n].items()}, "rounds_ms": rounds[n]}
            for n, m in models.items()]
    import onnxruntime

    from segkd.bench.run import cpu_model

    return {"rows": rows, "settings": {"rounds": args.rounds, "calls": args.calls, "warmup": args.warmup,
                                       "classes": args.classes, "threads": 1, "sizes": [list(s) for s in SIZES]},
            "environment": {"cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
                            "onnxruntime": onnxruntime.__version__, "load_avg": list(__import__("os").getloadavg()),
                            "argv": sys.argv}}


def markdown(result: dict[str, Any]) -> str:
    s, env = result["settings"], result["environment"]
    head = ["| model | params (M) | " + " | ".join(f"GMACs {h}x{w}" for h, w in SIZES) + " | "
            + " | ".join(f"ORT CPU ms {h}x{w} median (best round)" for h, w in SIZES) + " |",
            "|---|---:|" + "---:|" * (2 * len(SIZES))]
    for r in result["rows"]:
        cells = [f"{r['gmacs'][f'{h}x{w}']:.3f}" for h, w in SIZES] + [
            f"{r['latency_ms'][f'{h}x{w}']:.2f} ({r['latency_min_ms'][f'{h}x{w}']:.2f})" for h, w in SIZES]
        head.append(f"| {r['model']} | {r['params_m']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join([
        "# timm students against SegFormer-B0: params, GMACs, CPU ONNX latency",
        "",
        "Generated by `examples/bench_timm_students.py` (raw figures in `bench-timm-students.json`). "
        f"{s['classes']} classes (CamVid), deploy form (reparameterisable encoders fused), batch 1, ONNX Runtime on "
        f"the CPU with {s['threads']} thread; latency = median over {s['rounds']} interleaved rounds of the median "
        f"of {s['calls']} calls (after {s['warmup']} warm-up calls). GMACs = multiply-adds, attention counted.",
        "",
        *head,
        "",
        f"Machine: {env['cpu']}, shared with other processes (load average {env['load_avg'][0]:.1f} at the end): "
        "absolute times are inflated and noisy (the per-round figures in the JSON vary up to 10x as the load "
        "changes); the interleaving exposes every row to the same load, and the best round (least disturbed) is "
        "given beside the median. "
        f"torch {env['torch']}, onnxruntime {env['onnxruntime']}.",
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = measure(args)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
