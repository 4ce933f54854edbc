"""``segkd export``: a segkd checkpoint -> a verified, self-describing ONNX file of the deployable model.

Pipeline: load the checkpoint alone (:func:`segkd.models.loading.load_model`) -> wrap it in :class:`DeployModel`
(optional folded normalisation, optional upsample + softmax/argmax) -> trace in eval mode -> ONNX Runtime's offline
*basic* graph optimisation -> optional fp16 conversion with fp32 islands -> ``onnx.checker`` (full check) and
strict shape inference -> metadata -> verification against PyTorch -> atomic rename. Nothing is written at ``--out``
unless verification passes.

Exporter choice: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) at opset 17. Measured here it
exports SegFormer-B0 in about 1 s versus about 15 s for the torch.export-based exporter, emits native
``LayerNormalization`` at opset 17 (lower opsets decompose it into ReduceMean/Pow/Sqrt chains, the pattern behind
the wrong fp16 TensorRT engines of mmdeploy #2477 / TensorRT #2564), keeps the batch dimension dynamic through
``dynamic_axes`` (the dynamo exporter specialises batch to 1 unless traced with a batch-2 example), and matches
ORT to about 1e-6 at sizes other than the traced one. Its known hazard — restoring submodules' training flags after
export, so a later parity check silently runs dropout (ecosystem notes §9.2) — is guarded by asserting that no
module is in training mode before and after export. The tracer's "converting a tensor to a Python boolean"
warnings come from shape comparisons (``(h, w) != size``) whose outcome does not depend on the input size for
these architectures (stage 1 is always the decode size; logits are never at input size), so they are silenced.

Graph optimisation uses ONNX Runtime's offline optimisation at the *basic* level (constant folding, redundant
node elimination; only standard ONNX ops, so the file stays portable to TensorRT): about 0.3 s for SegFormer-B0
where onnxscript's optimizer took 3-5 s for the same node count.

fp16 uses ``onnxruntime.transformers.float16`` (already installed with onnxruntime; no new dependency) with
LayerNormalization, Softmax, every Reduce*, ArgMax, Resize and the folded normalisation kept in fp32 and fp32 graph
inputs/outputs (``keep_io_types``), so callers feed and read fp32 either way.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkd import __version__
from segkd.checkpoint import META_KEY, atomic_write, file_sha256
from segkd.data.datasets import check_name_suffixes
from segkd.errors import GateFailure, SegkdError
from segkd.export.runtime import EXPORT_KEY, parse_providers, probe_providers
from segkd.models.loading import load_model
from segkd.options import IMG_SUFFIX_HELP, SEG_SUFFIX_HELP, option
from segkd.safeio import remove_dead_tmps, segkd_tempdir
from segkd.shapes import check_min_size, hw_text, model_stride, parse_hw, parse_shape, trained_size

OutputKind = Literal["logits", "probs", "labels"]
OUTPUT_KINDS = ("logits", "probs", "labels")
MIN_OPSET = 17
INPUT_NAME = "image"
FP16_KEEP_FP32 = (
    "LayerNormalization", "Softmax", "ArgMax", "Resize",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
)


@dataclass
class ExportConfig:
    """Options of ``segkd export``: the command's flags are generated from these fields (one definition)."""

    opset: int = option(MIN_OPSET, "ONNX opset (17 or newer: native LayerNormalization).")
    static: str | None = option(None, "Fixed input shape BxCxHxW (trtexec syntax), e.g. 1x3x512x1024; dynamic "
                                      "batch/H/W when omitted.")
    output: str = option("logits", "Graph output: logits (model stride), probs or labels (input size).")
    fold_normalize: bool = option(False, "Put mean/std into the graph; the model then takes 0..255 RGB.")
    fp16: bool = option(False, "fp16 weights/activations; LayerNorm, softmax, reductions and normalisation stay fp32.")
    verify: bool = option(True, "Check ORT against PyTorch before writing.")
    data: str | None = option(None, "Dataset root whose first images join verification, or 'synth'.")
    size: str | None = option(None, "Export/verification size HxW (dynamic exports; default: the size the "
                                    "checkpoint was trained at, else 512x1024).")
    atol: float | None = option(None, "Max abs output difference allowed (default 1e-4 fp32, none for fp16), plus "
                                      "--rtol x the output's largest |value|.")
    rtol: float | None = option(None, "Allowed max abs difference grows by RTOL x the largest |value| of the "
                                      "PyTorch output (default 1e-5 fp32: float32 rounding grows with the logits' "
                                      "scale, and a trained model's logits reach tens).")
    min_agreement: float | None = option(None, "Min label agreement (default 0.999 fp32, 0.99 fp16).")
    providers: str = option("cpu", "ONNX Runtime providers for verification: cpu, cuda, tensorrt (comma-separated); "
                                   "never a silent fallback.")
    num_images: int = option(4, "Real images used from --data.")
    trt_min: str | None = option(None, "TensorRT profile min shape (default 1x3xH/2xW/2).")
    trt_max: str | None = option(None, "TensorRT profile max shape (default 4x3xHxW).")
    threads: int = option(0, "ONNX Runtime intra-op threads (0 = its default).")
    seed: int = option(0, "Seed of the random verification inputs and of the calibration subset.")
    int8: bool = option(False, "Static INT8 (QDQ) quantisation calibrated on --data, written only if the mIoU drop on "
                               "--eval-split is within --max-miou-drop.")
    int8_target: str = option("tensorrt", "--int8: tensorrt (symmetric int8 activations) or cpu (uint8 activations, "
                                          "ONNX Runtime's fast x86 kernels).")
    calib_split: str = option("train", "--int8: split whose images calibrate.")
    calib_images: int = option(64, "--int8: calibration images (a seeded random subset).")
    calib_method: str = option("minmax", "--int8: minmax, entropy or percentile.")
    eval_split: str = option("val", "--int8: split on which fp32 and INT8 mIoU are compared.")
    max_miou_drop: float = option(1.0, "--int8: largest allowed mIoU drop in points (exit 3 beyond).")
    resize: str | None = option(None, "--int8: resize calibration and evaluation images to HxW (default: the size "
                                      "the checkpoint was validated at, else as stored; 'native' = as stored).")
    data_format: str | None = option(None, "--int8: dataset format (default: detected).")
    img_suffix: str | None = option(None, "--int8: " + IMG_SUFFIX_HELP)
    seg_suffix: str | None = option(None, "--int8: " + SEG_SUFFIX_HELP)
    progress: bool = option(True, "Progress bars on a terminal.")

    def check(self) -> None:
        """One-line errors for option values, before the checkpoint is read (sizes parse here; their fit to the
        model's stride is checked by :func:`plan_shapes` once the model is known)."""
        from segkd.engine.config import check_machine_values
        from segkd.export.verify import resolve_gates

        check_opset(self.opset)
        if self.output not in OUTPUT_KINDS:
            raise SegkdError(f"--output {self.output!r}: choose one of {', '.join(OUTPUT_KINDS)}")
        parse_providers(self.providers)
        resolve_gates(self)
        check_machine_values(seed=self.seed)
        if self.threads < 0:
            raise SegkdError(f"--threads must be >= 0, got {self.threads}")
        for opt in ("size", "resize"):
            parse_hw(getattr(self, opt), f"--{opt}")
        check_name_suffixes(self.img_suffix, self.seg_suffix)
        for opt in ("static", "trt_min", "trt_max"):
            if getattr(self, opt):
                parse_shape(getattr(self, opt), f"--{opt.replace('_', '-')}")
        if self.int8:
            from segkd.export.quantize import check_int8_options

            check_int8_options(self)


@dataclass
class ExportPlan:
    """The validated shapes of an export."""

    height: int
    width: int
    batch: int
    static: bool
    stride: int
    profile: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


class DeployModel(nn.Module):
    """What gets exported: optional folded normalisation, the zoo model, then the requested output head.

    ``logits`` returns the model's logits at its own stride; ``probs`` upsamples them to the input size
    (bilinear, ``align_corners=False``, as the zoo's ``predict``) then applies a softmax over classes; ``labels``
    upsamples and takes the argmax, emitted as int32 (an argmax of logits equals one of probabilities; int32 is what
    TensorRT 8 and 10 both take as a network output). With ``fold_normalize`` the input is RGB in 0..255 (float32)
    and ``(x - 255 mean) / (255 std)`` runs in the graph.
    """

    def __init__(self, model: nn.Module, output: str, mean: list[float], std: list[float], fold: bool) -> None:
        super().__init__()
        self.model = model
        self.output = output
        self.fold = fold
        self.register_buffer("mean255", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std255", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, x: Tensor) -> Tensor:
        if self.fold:
            x = (x - self.mean255) / self.std255
        logits = self.model(x)
        if self.output == "logits":
            return logits
        up = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.output == "probs":
            return up.softmax(dim=1)
        return up.argmax(dim=1).to(torch.int32)


# --------------------------------------------------------------------------------------------- option parsing

def required_stride(model: nn.Module) -> int:
    """The coarsest feature stride (32 SegFormer, 16 DeepLabV3+, 8 DeepLabV3).

    ONNX Runtime and PyTorch agree at *any* input size for these models (measured at 65x97, 33x50, 100x31: identical
    labels): every stride-2 conv rounds up identically in both. The multiple is required for static shapes and
    TensorRT profiles for another reason: at other sizes the ceil-rounded coarse grids overhang the image, so the
    bilinear upsampling in the decoder misaligns coarse and fine features by up to half a coarse cell, and
    SegFormer's spatial-reduction convs (kernel = stride = 8 at stride 4) floor away border rows.
    """
    return model_stride(model)


def _round_up(v: int, m: int) -> int:
    """``v`` rounded up to a multiple of ``m`` (never to the nearest: a profile must hold the size verified)."""
    return max(m, -(-v // m) * m)


def _round_nearest(v: int, m: int) -> int:
    """The min profile side: ``v`` (half the verified side) to the nearest multiple, never above the verified side
    (nearest of h/2 is at most h/2 + m/2 <= h for h >= m)."""
    return max(m, int(round(v / m)) * m)


def plan_shapes(cfg: ExportConfig, stride: int, model_name: str) -> ExportPlan:
    """Validate ``--static``/``--size``/``--trt-min``/``--trt-max`` against the model's stride."""
    if cfg.static:
        b, _, h, w = parse_shape(cfg.static, "--static")
        if h % stride or w % stride:
            up = f"{b}x3x{_round_up(h, stride)}x{_round_up(w, stride)}"
            raise SegkdError(
                f"--static {cfg.static}: height and width must be multiples of {stride} for {model_name} "
                f"(its coarsest feature map is at stride {stride}); the smallest valid shape holding it: {up}"
            )
        if cfg.size and parse_hw(cfg.size, "--size") != (h, w):
            raise SegkdError(f"--size {cfg.size} contradicts --static {cfg.static}; give one of them")
        shape = (b, 3, h, w)
        return ExportPlan(h, w, b, True, stride, {"min": shape, "opt": shape, "max": shape})
    h, w = parse_hw(cfg.size or "512x1024", "--size")
    check_min_size((h, w), stride, "--size", model_name)
    # opt and max rounded up to the stride, min (half the size) to the nearest: the verified h x w lies inside
    profile = {
        "min": (1, 3, _round_nearest(h // 2, stride), _round_nearest(w // 2, stride)),
        "opt": (1, 3, _round_up(h, stride), _round_up(w, stride)),
        "max": (4, 3, _round_up(h, stride), _round_up(w, stride)),
    }
    for key, text in (("min", cfg.trt_min), ("max", cfg.trt_max)):
        if text:
            b, _, ph, pw = parse_shape(text, f"--trt-{key}")
            if ph % stride or pw % stride:
                raise SegkdError(f"--trt-{key} {text}: height and width must be multiples of {stride} for {model_name}")
            profile[key] = (b, 3, ph, pw)
    lo, opt, hi = profile["min"], profile["opt"], profile["max"]
    if not (lo[2] <= h <= hi[2] and lo[3] <= w <= hi[3]):
        raise SegkdError(f"the TensorRT profile {lo[2]}x{lo[3]} .. {hi[2]}x{hi[3]} (--trt-min/--trt-max) does not "
                         f"hold the verified size {h}x{w} (--size)")
    if not all(a <= o <= c for a, o, c in zip(lo, opt, hi)):
        raise SegkdError(f"TensorRT profile must satisfy min <= opt <= max per dim, got {lo} / {opt} / {hi}")
    return ExportPlan(h, w, 1, False, stride, profile)


def check_opset(opset: int) -> None:
    """Refuse opsets below 17 (decomposed LayerNorm) or above what the TorchScript exporter supports."""
    from torch.onnx import _constants

    top = int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    if opset < MIN_OPSET:
        raise SegkdError(
            f"--opset {opset}: segkd exports opset {MIN_OPSET} or newer (below {MIN_OPSET} LayerNormalization is "
            "decomposed, which breaks fp16 TensorRT engines)"
        )
    if opset > top:
        raise SegkdError(f"--opset {opset}: the TorchScript exporter of torch {torch.__version__} stops at {top}")


# ------------------------------------------------------------------------------------------------ the export
def assert_eval(module: nn.Module, when: str) -> None:
    """Fail loudly if any submodule is in training mode (dropout/drop-path/BN statistics would be traced)."""
    training = [name or "<root>" for name, m in module.named_modules() if m.training]
    if training:
        raise SegkdError(
            f"export aborted: {len(training)} module(s) in training mode {when} export, e.g. {training[0]}"
        )


def trace_to_onnx(wrapper: DeployModel, plan: ExportPlan, opset: int, path: Path) -> None:
    """Trace ``wrapper`` (eval mode, asserted before and after) with dynamic or static axes into ``path``."""
    out_name = wrapper.output
    dynamic = None
    if not plan.static:
        out_axes = {
            "logits": {0: "batch", 2: "out_height", 3: "out_width"},
            "probs": {0: "batch", 2: "height", 3: "width"},
            "labels": {0: "batch", 1: "height", 2: "width"},
        }[out_name]
        dynamic = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, out_name: out_axes}
    example = torch.zeros(plan.batch, 3, plan.height, plan.width)
    assert_eval(wrapper, "before")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*will be removed.*")
        try:
            torch.onnx.export(
                wrapper, (example,), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=[INPUT_NAME], output_names=[out_name], dynamic_axes=dynamic,
            )
        except Exception as e:  # the exporter raises many internal error types
            raise SegkdError(f"ONNX export failed ({str(e).strip().splitlines()[0][:160]})") from None
    assert_eval(wrapper, "after")


def optimize_basic(src: Path, dst: Path) -> None:
    """ONNX Runtime offline optimisation at the basic level: standard ONNX ops only, portable to TensorRT."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def prune_opset_imports(model: Any) -> None:
    """ORT's saved model imports every domain it knows; keep only those the graph uses (plus the default)."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used or (o.domain == "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def topological_sort(graph: Any) -> None:
    """Reorder ``graph.node`` so each node follows the producers of its inputs (the fp16 converter appends casts)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise SegkdError(f"ONNX graph has a cycle or a dangling input near node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _normalisation_nodes(graph: Any) -> list[str]:
    """Names of the folded-normalisation nodes: the Sub fed by the graph input and the Div/Mul after it."""
    inp = graph.input[0].name
    names = []
    for node in graph.node:
        if node.op_type == "Sub" and inp in node.input:
            names.append(node.name)
            for nxt in graph.node:
                if nxt.op_type in ("Div", "Mul") and node.output[0] in nxt.input:
                    names.append(nxt.name)
    return names


def to_fp16(model: Any, keep_nodes: list[str]) -> Any:
    """fp16 weights/activations with :data:`FP16_KEEP_FP32` ops and ``keep_nodes`` kept in fp32, fp32 I/O.

    Initializers shared between a kept-fp32 node and other nodes are duplicated first: the exporter deduplicates
    identical tensors (e.g. all-ones LayerNorm weights), and the converter would otherwise emit two Cast nodes with
    one name, which ONNX rejects.
    """
    import copy
    from collections import defaultdict

    from onnxruntime.transformers.float16 import convert_float_to_float16

    graph = model.graph
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    keep = set(keep_nodes)
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list[tuple[Any, int]]] = defaultdict(list)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in inits:
                users[name].append((node, k))
    for name, uses in users.items():
        if len(uses) > 1 and any(n.op_type in FP16_KEEP_FP32 or n.name in keep for n, _ in uses):
            for j, (node, k) in enumerate(uses[1:], 1):
                dup = copy.deepcopy(inits[name])
                dup.name = f"{name}__{j}"
                graph.initializer.append(dup)
                node.input[k] = dup.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(FP16_KEEP_FP32), node_block_list=sorted(keep)
        )
    topological_sort(out.graph)
    return out


def build_metadata(meta: Any, export: dict[str, Any]) -> dict[str, str]:
    """``metadata_props``: the full checkpoint metadata and export details (enough to evaluate the file alone)."""
    return {
        META_KEY: meta.to_json(),
        EXPORT_KEY: json.dumps(export, sort_keys=True),
        "segkd.model": meta.model,
        "segkd.version": __version__,
        "segkd.class_names": json.dumps(meta.class_names),
        "segkd.palette": json.dumps(meta.palette),
        "segkd.mean": json.dumps(meta.mean),
        "segkd.std": json.dumps(meta.std),
        "segkd.ignore_index": str(meta.ignore_index),
        "segkd.input_layout": export["input_layout"],
        "segkd.input_range": export["input_range"],
        "segkd.output": export["output"],
        "segkd.checkpoint_sha256": export["checkpoint_sha256"],
    }


def finalize_graph(path: Path, fp16: bool, fold: bool) -> tuple[Any, dict[str, Any]]:
    """Optimise, optionally convert to fp16, check and shape-infer; returns the model and a small summary."""
    import onnx

    opt_path = path.with_suffix(".opt.onnx")
    optimize_basic(path, opt_path)
    model = onnx.load(str(opt_path))
    before = len(onnx.load(str(path), load_external_data=False).graph.node)
    prune_opset_imports(model)
    kept: list[str] = []
    if fp16:
        kept = _normalisation_nodes(model.graph) if fold else []
        model = to_fp16(model, kept)
    try:
        onnx.checker.check_model(model, full_check=True)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:
        raise SegkdError(f"exported graph fails onnx.checker ({str(e).strip().splitlines()[0][:160]})") from None
    summary = {"nodes_traced": before, "nodes": len(model.graph.node), "fp32_kept_nodes": kept}
    return model, summary


def _check_export_options(cfg: ExportConfig, out: Path) -> tuple[list[str], float | None, float, float]:
    """Every option checked before the checkpoint is read: the providers (probed when verifying), the gates."""
    from segkd.export.verify import resolve_gates

    cfg.check()
    providers = parse_providers(cfg.providers)
    if cfg.verify:
        probe_providers(providers)
    atol, rtol, min_agree = resolve_gates(cfg)
    if out.suffix.lower() != ".onnx":
        raise SegkdError(f"--out {out}: give a path ending in .onnx")
    if out.exists() and out.is_dir():
        raise SegkdError(f"--out {out}: is a directory")
    return providers, atol, rtol, min_agree


def _export_info(cfg: ExportConfig, plan: ExportPlan, model: nn.Module, ckpt: Path) -> dict[str, Any]:
    """What the export is (recorded in the ONNX metadata and the report)."""
    return {
        "output": cfg.output,
        "fold_normalize": cfg.fold_normalize,
        "fp16": cfg.fp16,
        "int8": cfg.int8,
        "opset": cfg.opset,
        "static": plan.static,
        "input_name": INPUT_NAME,
        "output_name": cfg.output,
        "input_shape": [plan.batch, 3, plan.height, plan.width] if plan.static else ["batch", 3, "height", "width"],
        "input_layout": "NCHW, RGB, float32",
        "input_range": "0..255 RGB (normalisation folded into the graph)" if cfg.fold_normalize
        else "(RGB/255 - mean) / std",
        "output_stride": int(getattr(model, "output_stride", 1)) if cfg.output == "logits" else 1,
        "required_stride": plan.stride,
        "export_size": [plan.height, plan.width],
        "trt_profile": {k: list(v) for k, v in plan.profile.items()},
        "checkpoint": ckpt.name,
        "checkpoint_sha256": file_sha256(ckpt),
        "segkd_version": __version__,
        "exporter": f"torch.onnx TorchScript (dynamo=False), torch {torch.__version__}",
    }


def _build_graph(wrapper: nn.Module, plan: ExportPlan, cfg: ExportConfig, meta: Any, info: dict[str, Any],
                 ckpt: Path) -> tuple[Any, dict[str, Any]]:
    """Trace, finalise (fp16, folded normalisation) and stamp the ONNX graph with segkd's metadata."""
    with segkd_tempdir("export") as tmp:
        traced = tmp / "traced.onnx"
        trace_to_onnx(wrapper, plan, cfg.opset, traced)
        onnx_model, graph_summary = finalize_graph(traced, cfg.fp16, cfg.fold_normalize)
    onnx_model.producer_name = "segkd"
    onnx_model.producer_version = __version__
    onnx_model.doc_string = f"segkd export of {meta.model} ({cfg.output}) from {ckpt.name}"
    del onnx_model.metadata_props[:]
    for key, value in build_metadata(meta, info).items():
        onnx_model.metadata_props.add(key=key, value=value)
    if onnx_model.ByteSize() > 2**31 - 1:
        raise SegkdError(f"{ckpt}: the model exceeds ONNX's 2 GB single-file limit")
    return onnx_model, graph_summary


def _trt_engine(trt: dict[str, Any], out: Path, plan: ExportPlan, providers: list[str], fp16: bool) -> None:
    """The TensorRT engine entry of the report: built and run only when ``--providers`` asks for tensorrt."""
    from segkd.export.tensorrt import run_trt_ep, trt_ep_status

    if "tensorrt" not in providers:  # not asked for: no probe, and no "not run" message
        trt["engine"] = {"built": False, "requested": False,
                         "reason": "not requested (add tensorrt to --providers to build and run the engine)"}
    else:
        usable, reason = trt_ep_status()
        trt["engine"] = ({"built": True, "requested": True, **run_trt_ep(out, INPUT_NAME, plan.profile, fp16)}
                         if usable else {"built": False, "requested": True, "reason": reason})
    opt_hw = tuple(plan.profile["opt"][2:])
    if opt_hw != (plan.height, plan.width):
        trt["profile_note"] = (f"the TensorRT profile is at multiples of the stride {plan.stride}: "
                               f"{opt_hw[0]}x{opt_hw[1]} for --size {plan.height}x{plan.width} (verified here at "
                               f"{plan.height}x{plan.width}); export --size {opt_hw[0]}x{opt_hw[1]} to verify the "
                               "engine's own shape")


def trained_defaults(cfg: ExportConfig, meta: Any, ckpt: Path) -> tuple[ExportConfig, str]:
    """``cfg`` with ``--size`` (and, for ``--int8``, ``--resize``) defaulting to the size the checkpoint was
    trained at (:func:`segkd.shapes.trained_size`: its ``resize``, else its ``crop``), and a note saying which size
    is used and why. A checkpoint that records no size keeps the historical 512x1024."""
    trained = trained_size(meta)
    if cfg.int8 and cfg.resize is None and trained.resize:
        cfg = replace(cfg, resize=hw_text(trained.resize))
    if cfg.static:
        return cfg, "--static"
    if cfg.size:
        return cfg, "--size"
    if trained.deploy is None:
        return replace(cfg, size="512x1024"), f"default 512x1024 ({ckpt.name} records no training size)"
    which = "validated" if trained.resize else "trained (crop)"
    return replace(cfg, size=hw_text(trained.deploy)), (f"the size {ckpt.name} was {which} at, from its "
                                                        f"{trained.source}")


def export_checkpoint(ckpt: str | Path, out: str | Path, cfg: ExportConfig) -> dict[str, Any]:
    """Export, verify and write ``out`` atomically; returns the report (also raised GateFailure on failed checks)."""
    import onnx

    from segkd.export.tensorrt import trt_readiness
    from segkd.export.verify import verify_onnx

    t0 = time.perf_counter()
    out, ckpt = Path(out), Path(ckpt)
    providers, atol, rtol, min_agree = _check_export_options(cfg, out)
    remove_dead_tmps(out.parent, out.name)  # the temp file of an export killed while writing this --out
    model = load_model(ckpt).float().deploy_form()  # reparameterisable encoders fused, as deployed
    meta = model.segkd_meta  # type: ignore[attr-defined]
    cfg, size_note = trained_defaults(cfg, meta, ckpt)
    plan = plan_shapes(cfg, required_stride(model), meta.model)
    wrapper = DeployModel(model, cfg.output, meta.mean, meta.std, cfg.fold_normalize).eval()
    calibration = None
    if cfg.int8:  # read the calibration images first: a split with too few fails before any tracing
        from segkd.export.quantize import calibration_batches

        calibration = calibration_batches(cfg, meta, cfg.fold_normalize, cfg.progress)
    info = _export_info(cfg, plan, model, ckpt) | {"export_size_source": size_note}
    onnx_model, graph_summary = _build_graph(wrapper, plan, cfg, meta, info, ckpt)
    trt = trt_readiness(onnx_model, plan, out, cfg.fp16)
    report: dict[str, Any] = {"checkpoint": str(ckpt), "out": str(out), "model": meta.model, "export": info,
                              "graph": graph_summary, "tensorrt": trt, "verification": None}

    def write_and_verify(tmp_path: Path) -> None:
        onnx.save(onnx_model, str(tmp_path))
        if not cfg.verify:
            return
        result = verify_onnx(tmp_path, wrapper, plan, cfg, providers=providers, atol=atol, min_agreement=min_agree,
                             rtol=rtol)
        report["verification"] = result
        if not result["passed"]:
            raise GateFailure(f"verification failed, nothing written to {out}: {result['failure']}")

    if cfg.int8:  # verify the fp32 graph (in a temp dir), then quantise, gate on mIoU and write the INT8 file
        from segkd.export.quantize import build_int8

        with segkd_tempdir("export") as tmp:
            write_and_verify(tmp / "fp32.onnx")
        assert calibration is not None
        report["int8"] = build_int8(onnx_model, out, cfg, calibration, progress=cfg.progress)
        if cfg.verify:  # the int8 file against PyTorch too: reported, not gated (its gate is the mIoU drop)
            report["int8"]["verification"] = verify_onnx(out, wrapper, plan, cfg, providers=providers, atol=None,
                                                         min_agreement=0.0)
        trt = report["tensorrt"] = trt_readiness(onnx.load(str(out)), plan, out, False, int8=True)  # the QDQ graph
    else:
        atomic_write(out, write_and_verify)
    _trt_engine(trt, out, plan, providers, cfg.fp16)
    report.update(bytes=out.stat().st_size, seconds=round(time.perf_counter() - t0, 2), config=asdict(cfg))
    return report
