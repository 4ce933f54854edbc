"""``segkd bench``: complexity, latency, throughput and memory of one or more models, as a JSON-ready report.

The report follows ``segkd/bench/schema.json`` (``schema_version`` 1). Complexity is counted once per input size at
batch 1 (figures are per image); latency runs cover every backend x input shape x batch size.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segkd.bench.latency import RunResult, bench_onnxruntime, bench_torch, resolve_device
from segkd.bench.specs import (
    ModelSpec,
    expand_inputs,
    name_models,
    onnx_param_count,
    onnx_precision,
    parse_backends,
    parse_batches,
    resolve_model,
)
from segkd.errors import SegkdError
from segkd.models.flops import count_flops, module_table
from segkd.options import option
from segkd.provenance import command_line, environment

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("schema.json")
CONVENTIONS = {
    "gmacs": "multiply-accumulates / 1e9 per image (the SegFormer/mmseg papers' 'FLOPs')",
    "gflops": "2 x GMACs (torch FlopCounterMode convention)",
    "flops_counted": "conv, linear/matmul, attention (QK^T and AV); counted on the meta device, identical on CPU/GPU",
    "flops_not_counted": "elementwise, normalisation, activations, softmax, pooling, interpolation",
    "params": "parameters of the deploy model only (no training-only heads or adapters)",
    "latency": "per call on a batch already on the device, synchronised; excludes preprocessing, the host-to-device "
    "copy (torch), upsampling to input size and argmax unless the ONNX file contains them",
    "throughput_ips": "batch / mean latency, images per second",
    "peak_mem_mb": "cuda_max_allocated: torch.cuda.max_memory_allocated during the timed loop; process_peak_rss: "
    "process-wide peak RSS since the process started (includes earlier work)",
    "contended": "process CPU time / wall time < 0.9 x threads during the timed loop (CPU runs only)",
}


@dataclass
class BenchConfig:
    """Options of ``segkd bench`` (the gates are :class:`~segkd.bench.gates.Gates`); the command's flags are
    generated from these fields (one definition)."""

    models: list[str] = option(help="Zoo names, segkd checkpoints (.safetensors) or .onnx files; the first is the "
                               "reference for ratios.", argument=True, default_factory=list)
    inputs: list[str] = option(MISSING, "Input shape BxCxHxW or HxW (repeatable); default: the sizes the MODEL "
                               "checkpoints/exports were trained at, else 1x3x512x1024.", "--input",
                               default_factory=list)
    batch: str | None = option(None, "Batch sizes replacing each input's batch, e.g. 1,8.")
    device: str = option("cpu", "Device for torch backends: cpu or cuda.")
    threads: int | None = option(None, "CPU threads for torch and ONNX Runtime (default: torch's).")
    backends: list[str] = option(MISSING, "torch, torch-compile or onnxruntime (repeatable); default torch.",
                                 "--backend", default_factory=lambda: ["torch"])
    providers: str | None = option(None, "ONNX Runtime provider: cpu, cuda or tensorrt (default follows --device); "
                                   "never a silent fallback.")
    warmup: int = option(3, "Untimed calls before timing.")
    iters: int = option(10, "Minimum timed calls.")
    min_time: float = option(0.0, "Keep timing until this many seconds have passed.")
    num_classes: int | None = option(None, "Classes of zoo models (default 19).")
    detail: bool = option(False, "Per-module FLOPs table and the ops counted as 0.")
    detail_depth: int = option(3, "Module depth of the --detail table.")
    channels_last: bool = option(False, "channels_last memory format (torch).")
    flops: bool = option(True, "Count FLOPs.")
    latency: bool = option(True, "Time the models.")
    train_step: bool = option(False, "Time one distillation step of --method against its lower bound (batch 2 "
                              "unless --batch).")
    method: str | None = option(None, "With --train-step: the distillation method, e.g. kd.")
    teacher: str | None = option(None, "With --train-step: teacher zoo model (the peer for online methods such as "
                                 "dml).")
    student: str | None = option(None, "With --train-step: student zoo model.")
    teacher_cache: bool = option(False, "With --train-step: time the step as `distill --teacher-cache` runs it "
                                 "(teacher targets from the batch, no teacher forward) against the student alone.")
    cache_topk: int = option(0, "With --train-step --teacher-cache: the batch carries a top-K cache's compact logits "
                             "(0: full fp16 logits).")

    def check(self) -> None:
        """One-line errors for option values (sizes within segkd's pixel limit, device spelling, counts), before
        any model is built."""
        from segkd.engine.config import check_machine_values
        from segkd.engine.distributed import check_device

        check_device(self.device)
        check_machine_values(threads=self.threads)
        expand_inputs(self.inputs, parse_batches(self.batch))
        parse_backends(self.backends)
        if self.warmup < 0 or self.iters < 1 or self.min_time < 0:
            raise SegkdError("--warmup and --min-time must be >= 0 and --iters >= 1")


def export_temp_onnx(model: nn.Module, shape: tuple[int, int, int, int], path: Path) -> None:
    """Export a model's logits to ``path`` for ONNX Runtime with ``segkd export``'s own pipeline.

    The same steps as ``segkd export`` (TorchScript exporter, opset 17, dynamic batch/height/width, ORT basic graph
    optimisation, onnx.checker) minus the checkpoint metadata, the PyTorch-vs-ORT verification and the TensorRT
    engine build, so ONNX Runtime times exactly the graph users deploy.
    """
    import onnx

    from segkd.export.onnx_export import (
        MIN_OPSET,
        DeployModel,
        ExportConfig,
        finalize_graph,
        plan_shapes,
        required_stride,
        trace_to_onnx,
    )

    model = model.cpu().eval()
    stride = required_stride(model)
    h, w = max(shape[2], stride), max(shape[3], stride)
    plan = plan_shapes(ExportConfig(size=f"{h}x{w}"), stride, getattr(model, "zoo_name", type(model).__name__))
    wrapper = DeployModel(model, "logits", [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], fold=False).eval()
    traced = path.with_name(path.stem + ".traced.onnx")
    trace_to_onnx(wrapper, plan, MIN_OPSET, traced)
    graph, _ = finalize_graph(traced, fp16=False, fold=False)
    onnx.save(graph, str(path))


def _complexity(spec: ModelSpec, hw_list: list[tuple[int, int]], cfg: BenchConfig) -> list[dict[str, Any]]:
    out = []
    module = spec.module
    note = "counted on the PyTorch model (meta device)"
    if module is None and spec.architecture is not None:
        from segkd.models import create_model

        kwargs = (spec.onnx_meta or {}).get("meta", {}).get("model_kwargs", {}) or {}
        module = create_model(spec.architecture, num_classes=spec.num_classes or 19, **kwargs).deploy_form()
        note = f"counted on the zoo architecture {spec.architecture} recorded in the ONNX metadata (meta device)"
    for h, w in hw_list:
        entry: dict[str, Any] = {"input": [1, 3, h, w]}
        if module is None or not cfg.flops:
            entry.update(gflops=None, gmacs=None, flops_source=None if cfg.flops else "not requested (--no-flops)")
            if module is None and cfg.flops:
                entry["flops_source"] = "unavailable: an ONNX graph without segkd metadata (FLOPs are not read " \
                                        "from ONNX graphs)"
            out.append(entry)
            continue
        count = count_flops(module, (1, 3, h, w))
        entry.update(gflops=count.gflops, gmacs=count.gmacs, flops_source=note,
                     flops_by_op={k: v / 1e9 for k, v in count.by_op.items()})
        if cfg.detail:
            entry["uncounted_ops"] = count.uncounted_ops
            entry["modules"] = [{"module": m, "depth": d, "gflops": f / 1e9}
                                for m, d, f in module_table(count, cfg.detail_depth)]
        out.append(entry)
    return out


def _run_entry(backend: str, shape: tuple[int, ...], device: str, providers: str | None, cfg: BenchConfig,
               res: RunResult) -> dict[str, Any]:
    t = res.timing
    return {
        "backend": backend,
        "input": list(shape),
        "batch": shape[0],
        "device": device,
        "providers_requested": providers.split(",") if providers else None,
        "providers_used": res.providers_used,
        "latency_ms": {k: getattr(t, f"{k}_ms") for k in ("mean", "std", "min", "max", "p50", "p90", "p95", "p99")},
        "iters": t.iters,
        "warmup": t.warmup,
        "min_time_s": cfg.min_time,
        "throughput_ips": res.throughput_ips,
        "peak_mem_mb": res.peak_mem_mb,
        "peak_mem_kind": res.peak_mem_kind,
        "wall_s": t.wall_s,
        "cpu_s": t.cpu_s,
        "cpu_util": t.cpu_util,
        "contended": t.contended,
        "compile_s": res.compile_s,
        "channels_last": cfg.channels_last if backend.startswith("torch") else False,
    }


def bench_models(cfg: BenchConfig, progress: Any = None) -> dict[str, Any]:
    """Measure every model; returns the schema-shaped report (gates are applied by :func:`segkd.bench.gates`)."""
    _check_what_is_measured(cfg)
    cfg.check()
    device = resolve_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    batches = parse_batches(cfg.batch)
    if cfg.inputs:  # a bad --input fails first, before any model is loaded
        expand_inputs(cfg.inputs, batches)
    backends = parse_backends(cfg.backends)
    providers = cfg.providers or ("cpu" if device.type == "cpu" else "cuda")
    if "onnxruntime" in backends or any(m.lower().endswith(".onnx") for m in cfg.models):
        from segkd.export.runtime import parse_providers

        providers = ",".join(parse_providers(providers))
    specs = [resolve_model(m, cfg.num_classes) for m in cfg.models]  # all resolved first: bad input fails fast
    name_models(specs)
    inputs, inputs_source = default_inputs(cfg.inputs, specs)
    shapes = expand_inputs(inputs, batches if batches or not cfg.train_step else [2])
    hw_list = list(dict.fromkeys((s[2], s[3]) for s in shapes))
    _check_input_sizes(cfg, specs, hw_list)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "segkd.bench",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": command_line(),
        "environment": environment(device, threads),
        "settings": {
            "inputs": [list(s) for s in shapes],
            "inputs_source": inputs_source,
            "backends": backends,
            "device": str(device),
            "providers": providers,
            "threads": threads,
            "warmup": cfg.warmup,
            "iters": cfg.iters,
            "min_time_s": cfg.min_time,
            "channels_last": cfg.channels_last,
            "precision": "fp32",
        },
        "conventions": CONVENTIONS,
        "models": [],
    }
    if cfg.train_step:
        report["train_step"] = _train_steps(cfg, shapes, device, threads, progress)
        return report
    with tempfile.TemporaryDirectory(prefix="segkd-bench-") as tmp:
        for spec in specs:
            entry = _bench_one(spec, shapes, hw_list, backends, device, providers, threads, cfg, Path(tmp), progress)
            report["models"].append(entry)
    return report


def _check_what_is_measured(cfg: BenchConfig) -> None:
    """MODELs, or ``--train-step`` with its method and pair: never both, never neither."""
    if cfg.train_step:
        _check_train_step(cfg)
    elif not cfg.models:
        raise SegkdError("give at least one MODEL (a zoo name, a .safetensors checkpoint or an .onnx file)")
    elif cfg.method or cfg.teacher or cfg.student:
        raise SegkdError("--method/--teacher/--student belong to --train-step")


def default_inputs(inputs: list[str], specs: list[ModelSpec]) -> tuple[list[str], str]:
    """``--input`` as given, else the sizes the MODELs were trained at (:func:`segkd.shapes.trained_size` of each
    checkpoint's or segkd export's metadata; every model is timed at each of them, so rows stay comparable), else
    1x3x512x1024; with a line saying which."""
    from segkd.shapes import hw_text, trained_size

    if inputs:
        return inputs, "--input"
    sizes: dict[str, list[str]] = {}
    for spec in specs:
        meta = getattr(spec.module, "segkd_meta", None) or (spec.onnx_meta or {}).get("meta")
        hw = trained_size(meta).deploy if meta is not None else None
        if hw is not None:
            sizes.setdefault(hw_text(hw), []).append(Path(spec.arg).name)
    if not sizes:
        return ["1x3x512x1024"], "default 1x3x512x1024 (no MODEL records a training size)"
    said = "; ".join(f"{hw} from {', '.join(names)}" for hw, names in sizes.items())
    return list(sizes), f"the size(s) the models were trained at: {said}"


def _check_input_sizes(cfg: BenchConfig, specs: list[ModelSpec], hw_list: list[tuple[int, int]]) -> None:
    """Every ``--input`` at least the stride of every model (the train-step student and teacher included)."""
    from segkd.models import zoo_stride
    from segkd.shapes import check_min_size, model_stride

    strides = []
    for spec in specs:
        if spec.module is not None:
            strides.append((spec.name, model_stride(spec.module)))
        elif spec.architecture is not None:
            strides.append((spec.name, zoo_stride(spec.architecture, num_classes=spec.num_classes or 19)))
    if cfg.train_step:
        strides += [(n, zoo_stride(n, num_classes=cfg.num_classes or 19)) for n in (cfg.student, cfg.teacher) if n]
    for name, stride in strides:
        for hw in hw_list:
            check_min_size(hw, stride, "--input", name)


def _check_train_step(cfg: BenchConfig) -> None:
    from segkd.methods import METHODS
    from segkd.models import MODELS

    if cfg.models:
        raise SegkdError("--train-step measures --method/--teacher/--student; drop the MODEL arguments")
    missing = [o for o, v in (("--method", cfg.method), ("--teacher", cfg.teacher), ("--student", cfg.student))
               if not v]
    if missing:
        raise SegkdError(f"--train-step needs {', '.join(missing)}")
    if cfg.cache_topk < 0 or (cfg.cache_topk and not cfg.teacher_cache):
        raise SegkdError(f"--cache-topk {cfg.cache_topk}: needs --teacher-cache and K >= 1 (0: full logits)")
    METHODS.canonical(cfg.method or "")
    MODELS.canonical(cfg.teacher or "")
    MODELS.canonical(cfg.student or "")


def _train_steps(cfg: BenchConfig, shapes: list[tuple[int, int, int, int]], device: torch.device, threads: int,
                 progress: Any) -> list[dict[str, Any]]:
    from segkd.bench.trainstep import bench_train_step

    out = []
    for shape in shapes:
        if progress is not None:
            progress(f"{cfg.method} train step {'x'.join(map(str, shape))}")
        out.append(bench_train_step(cfg.method or "", cfg.teacher or "", cfg.student or "", shape, device,
                                    cfg.num_classes or 19, cfg.warmup, cfg.iters, cfg.min_time, threads,
                                    cached=cfg.teacher_cache, topk=cfg.cache_topk))
    return out


def _bench_one(spec: ModelSpec, shapes: list[tuple[int, int, int, int]], hw_list: list[tuple[int, int]],
               backends: list[str], device: torch.device, providers: str, threads: int, cfg: BenchConfig,
               tmp: Path, progress: Any) -> dict[str, Any]:
    notes = list(spec.notes)
    if spec.module is not None:
        params, params_source = sum(p.numel() for p in spec.module.parameters()), "torch_deploy_model"
    else:
        assert spec.onnx_path is not None
        params, params_source = onnx_param_count(spec.onnx_path), "onnx_initializers"
        notes.append("params are the ONNX file's float initializers (BatchNorm folded into convs by the exporter)"
                     + (", plus the int8/int32 weights its DequantizeLinear nodes read" if
                        onnx_precision(spec.onnx_meta) == "int8" else ""))
    entry: dict[str, Any] = {
        "name": spec.name,
        "path": None if spec.path is None else str(spec.path),
        "arg": spec.arg,
        "source": spec.source,
        "architecture": spec.architecture,
        "num_classes": spec.num_classes,
        "params": int(params),
        "params_m": params / 1e6,
        "params_source": params_source,
        "precision": onnx_precision(spec.onnx_meta) if spec.source == "onnx" else "fp32",
        "complexity": _complexity(spec, hw_list, cfg),
        "runs": [],
        "notes": notes,
    }
    if not cfg.latency:
        return entry
    model_backends = ["onnxruntime"] if spec.source == "onnx" else backends
    if spec.source == "onnx" and any(b != "onnxruntime" for b in backends):
        notes.append("an ONNX file runs on ONNX Runtime only; torch backends were skipped for it")
    onnx_file = spec.onnx_path
    for backend in model_backends:
        for shape in shapes:
            label = f"{spec.name} {backend} {'x'.join(map(str, shape))}"
            if progress is not None:
                progress(label)
            if backend == "onnxruntime":
                if onnx_file is None:
                    assert spec.module is not None
                    onnx_file = tmp / f"{len(list(tmp.iterdir()))}-{spec.architecture}.onnx"  # name: maybe a path
                    export_temp_onnx(spec.module, shape, onnx_file)
                    notes.append("onnxruntime: exported to a temporary ONNX file with segkd export's pipeline "
                                 "(TorchScript exporter, opset 17, dynamic batch/height/width, ORT basic optimisation)")
                res = bench_onnxruntime(onnx_file, shape, providers, cfg.warmup, cfg.iters, cfg.min_time, threads)
                entry["runs"].append(_run_entry(backend, shape, "ort", providers, cfg, res))
            else:
                assert spec.module is not None
                res = bench_torch(spec.module, shape, device, cfg.warmup, cfg.iters, cfg.min_time, threads,
                                  compile=backend == "torch-compile", channels_last=cfg.channels_last)
                spec.module.to("cpu")
                entry["runs"].append(_run_entry(backend, shape, str(device), None, cfg, res))
    return entry


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate_report(report: dict[str, Any]) -> None:
    """Validate against the packaged JSON Schema (jsonschema is a dev dependency; skipped when absent)."""
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - the dev extra installs it
        return
    jsonschema.validate(report, load_schema())


def run_bench_command(cfg: BenchConfig, gates: Any = None, progress: Any = None) -> dict[str, Any]:
    """What ``segkd bench`` runs: measure, validate against the schema, then evaluate the gates (not enforce)."""
    from segkd.bench.gates import Gates, apply_gates, load_baseline

    gates = gates or Gates()
    if gates.baseline is not None:
        load_baseline(gates.baseline)  # a bad baseline fails before minutes of timing
    report = bench_models(cfg, progress=progress)
    if gates.any():
        apply_gates(report, gates)
    validate_report(report)
    return report
