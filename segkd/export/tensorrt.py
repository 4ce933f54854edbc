"""TensorRT readiness of an ONNX graph, checked statically against the ONNX-TensorRT parser's support matrix.

The matrix (``trt_onnx_ops.json``) is parsed from onnx/onnx-tensorrt ``docs/operators.md`` at the commit named in
its ``source`` block (TensorRT 10.1, opsets 9-20). Every node is checked for: a custom domain (error), an op the
parser lacks (error), an input dtype outside the op's listed types (warning), and the restrictions the matrix
states that can be decided from the graph (constant ``axes``; Resize mode/coordinate transform/antialias; the extra
LayerNormalization and MaxPool outputs; pooling dilations; Dropout). Shape patterns TensorRT handles but that
deserve attention are reported as ``info``: Reshape/Resize targets computed from ``Shape`` chains at run time (need
shape tensors and an optimisation profile), INT64 constants outside the INT32 range (TensorRT 8.x clamps them;
10.x keeps INT64), DOUBLE tensors (cast down to FP32) and a decomposed LayerNorm (fp16 overflow risk).

When ONNX Runtime's TensorRT execution provider really loads (a GPU machine), :func:`run_trt_ep` builds the engine
through it at the profile's optimal shape and compares it with the CPU provider.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from segkd.errors import SegkdError

TABLE_PATH = Path(__file__).with_name("trt_onnx_ops.json")
DTYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
               16: "BF16"}
AXES_INPUT = {  # op -> index of the input the matrix says must be an initializer / constant
    "Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "Pad": 3, "CumSum": 1,
    **{op: 1 for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}
RESIZE_COORD = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@lru_cache(maxsize=1)
def load_table() -> dict[str, Any]:
    """The parser support matrix with its ``source`` (repository, path, commit, TensorRT version)."""
    with open(TABLE_PATH) as fh:
        return json.load(fh)


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _issue(severity: str, node: Any, message: str) -> dict[str, str]:
    return {"severity": severity, "op": node.op_type, "node": node.name, "message": message}


def _text_attr(node: Any, name: str, default: bytes) -> str:
    value = _attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def _resize_issues(node: Any, consts: set[str]) -> tuple[list[dict[str, str]], bool]:
    """The parser's limits on a Resize node, and whether its sizes/scales are computed at run time."""
    issues = []
    mode = _text_attr(node, "mode", b"nearest")
    coord = _text_attr(node, "coordinate_transformation_mode", b"half_pixel")
    if mode not in ("nearest", "linear"):
        issues.append(_issue("error", node, f"Resize mode {mode!r} (TensorRT: nearest, linear)"))
    if coord not in RESIZE_COORD:
        issues.append(_issue("error", node, f"Resize coordinate_transformation_mode {coord!r}"))
    if _attr(node, "antialias", 0):
        issues.append(_issue("error", node, "Resize antialias=1 is not supported"))
    if _text_attr(node, "keep_aspect_ratio_policy", b"stretch") != "stretch":
        issues.append(_issue("error", node, "Resize keep_aspect_ratio_policy must be 'stretch'"))
    scales = node.input[2] if len(node.input) > 2 else ""
    sizes = node.input[3] if len(node.input) > 3 else ""
    axes = _attr(node, "axes")
    if scales and scales not in consts and axes is not None and list(axes) != list(range(len(axes))):
        issues.append(_issue("error", node, "run-time Resize scales need axes = 0..rank-1"))
    return issues, bool((scales and scales not in consts) or (sizes and sizes not in consts))


def _op_issues(node: Any, entry: dict[str, Any], dtypes: dict[str, int], consts: set[str],
               consumed: Counter) -> list[dict[str, str]]:
    """The parser's limits on one supported standard-domain node (dtypes, constant axes, op-specific rules)."""
    op, issues = node.op_type, []
    dt = DTYPE_NAMES.get(dtypes.get(node.input[0] if node.input else "", 0))
    if dt and entry["types"] and dt not in entry["types"] and op not in ("Shape", "Size"):
        issues.append(_issue("warning", node, f"input dtype {dt} not in the parser's types {entry['types']}"))
    idx = AXES_INPUT.get(op)
    if idx is not None and len(node.input) > idx and node.input[idx] and node.input[idx] not in consts:
        issues.append(_issue("error", node, f"input {idx} (axes) must be an initializer/constant"))
    if op == "LayerNormalization" and any(consumed[o] for o in node.output[1:] if o):
        issues.append(_issue("error", node, "only output Y of LayerNormalization is supported"))
    if op == "MaxPool" and len(node.output) > 1 and node.output[1] and consumed[node.output[1]]:
        issues.append(_issue("error", node, "MaxPool Indices output is not supported"))
    if op in ("MaxPool", "AveragePool", "LpPool") and any(d != 1 for d in (_attr(node, "dilations") or [])):
        issues.append(_issue("error", node, "pooling dilations must be all ones"))
    if op == "Dropout":
        ok = len(node.input) < 3 or not node.input[2] or node.input[2] in consts
        issues.append(_issue("warning" if ok else "error", node,
                             "Dropout in a deploy graph (training_mode must be a constant False)"))
    return issues


def _initializer_issues(graph: Any) -> list[dict[str, str]]:
    """INT64 constants beyond INT32 (TensorRT <= 8.6 clamps them) and DOUBLE initializers."""
    import onnx

    issues = []
    for t in graph.initializer:
        if t.data_type == 7 and t.dims and np.prod(t.dims) <= 64:
            vals = onnx.numpy_helper.to_array(t)
            if vals.size and (vals.min() < INT32_MIN or vals.max() > INT32_MAX):
                issues.append({"severity": "info", "op": "", "node": t.name,
                               "message": "INT64 constant outside INT32 range (TensorRT <= 8.6 clamps it)"})
        if t.data_type == 11:
            issues.append({"severity": "warning", "op": "", "node": t.name,
                           "message": "DOUBLE initializer (TensorRT casts it down to FP32)"})
    return issues


def _dynamic_notes(graph: Any, dynamic_reshape: int, dynamic_resize: int) -> list[dict[str, str]]:
    notes = []
    if dynamic_reshape:
        notes.append({"severity": "info", "op": "Reshape", "node": "",
                      "message": f"{dynamic_reshape} Reshape(s) take their shape from a run-time Shape chain "
                                 "(fine with shape tensors; requires an optimisation profile)"})
    if dynamic_resize:
        notes.append({"severity": "info", "op": "Resize", "node": "",
                      "message": f"{dynamic_resize} Resize(s) take sizes/scales computed at run time"})
    sym = [d.dim_param for i in graph.input for d in i.type.tensor_type.shape.dim if d.dim_param]
    if sym:
        notes.append({"severity": "info", "op": "", "node": graph.input[0].name,
                      "message": f"dynamic input dims {sym}: build with --minShapes/--optShapes/--maxShapes"})
    return notes


def check_graph(model: Any) -> dict[str, Any]:
    """Op counts, unsupported ops and issues of ``model`` (an ``onnx.ModelProto``) for the parser's matrix."""
    table = load_table()
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    consts = {t.name for t in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producers = {o: n for n in graph.node for o in n.output}
    consumed = Counter(i for n in graph.node for i in n.input) + Counter(o.name for o in graph.output)
    dtypes = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input)
              + list(graph.output)}
    dtypes.update({t.name: t.data_type for t in graph.initializer})
    issues: list[dict[str, str]] = []
    unsupported: list[str] = []
    dynamic_reshape = dynamic_resize = 0
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in graph.node)
    if not table["opset_min"] <= opset <= table["opset_max"]:
        issues.append({"severity": "warning", "op": "", "node": "",
                       "message": f"opset {opset} is outside the parser's documented range "
                                  f"{table['opset_min']}-{table['opset_max']} (TensorRT "
                                  f"{table['source']['tensorrt_version']})"})
    for node in graph.node:
        entry = table["ops"].get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if node.domain not in ("", "ai.onnx"):
            issues.append(_issue("error", node, f"custom op in domain {node.domain!r}: TensorRT needs a plugin"))
            unsupported.append(f"{node.domain}::{node.op_type}")
            continue
        if entry is None or not entry["supported"]:
            issues.append(_issue("error", node, "not supported by the ONNX-TensorRT parser"))
            unsupported.append(node.op_type)
            continue
        issues += _op_issues(node, entry, dtypes, consts, consumed)
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] not in consts:
            dynamic_reshape += 1
        if node.op_type == "Resize":
            resize_issues, dynamic = _resize_issues(node, consts)
            issues += resize_issues
            dynamic_resize += dynamic
    issues += _initializer_issues(graph)
    if _has_decomposed_layernorm(graph, producers):
        issues.append({"severity": "warning", "op": "ReduceMean", "node": "",
                       "message": "decomposed LayerNorm (ReduceMean/Pow/Sqrt); fp16 engines may overflow"})
    issues += _dynamic_notes(graph, dynamic_reshape, dynamic_resize)
    errors = sum(i["severity"] == "error" for i in issues)
    warnings = sum(i["severity"] == "warning" for i in issues)
    return {
        "table": table["source"],
        "opset": opset,
        "op_counts": dict(sorted(counts.items())),
        "unsupported": sorted(set(unsupported)),
        "issues": issues,
        "ready": not errors,
        "verdict": readiness_verdict(errors, warnings),
    }


def readiness_verdict(errors: int, warnings: int) -> str:
    """The one-word-and-count summary of the issues, so it never says less than the list below it: ``ready`` only
    with neither errors nor warnings (a parser dtype warning is a node TensorRT may refuse)."""
    if errors:
        return f"NOT ready ({errors} error{'s' * (errors != 1)}" + (f", {warnings} warning{'s' * (warnings != 1)})"
                                                                     if warnings else ")")
    return f"ready with {warnings} warning{'s' * (warnings != 1)}" if warnings else "ready"


def _has_decomposed_layernorm(graph: Any, producers: dict[str, Any]) -> bool:
    """ReduceMean -> ... -> Pow -> ReduceMean -> ... -> Sqrt: the opset<17 LayerNorm pattern."""
    for node in graph.node:
        if node.op_type != "Sqrt":
            continue
        seen, frontier = [], list(node.input)
        for _ in range(4):
            nxt = []
            for name in frontier:
                p = producers.get(name)
                if p is not None:
                    seen.append(p.op_type)
                    nxt.extend(p.input)
            frontier = nxt
        if "ReduceMean" in seen and "Pow" in seen:
            return True
    return False


def shape_text(shape: tuple[int, ...] | list[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


def trtexec_command(onnx_path: str | Path, input_name: str, profile: dict[str, Any], static: bool,
                    fp16: bool, int8: bool = False) -> str:
    """The matching ``trtexec`` build line. Static graphs take no shape flags (trtexec refuses explicit shapes
    for inputs whose shape the model fixes), so the profile is stated for dynamic exports only. A QDQ graph gets
    ``--int8``: the builder's INT8 flag enables the int8 kernels its explicit scales ask for."""
    path = Path(onnx_path)
    parts = ["trtexec", f"--onnx={path}", f"--saveEngine={path.with_suffix('.engine')}"]
    if not static:
        for key in ("min", "opt", "max"):
            parts.append(f"--{key}Shapes={input_name}:{shape_text(profile[key])}")
    if fp16:
        parts.append("--fp16")
    if int8:
        parts.append("--int8")
    return " ".join(parts)


def trt_ep_status() -> tuple[bool, str]:
    """Whether ONNX Runtime's TensorRT EP really loads here (a one-node probe session), with the reason if not."""
    from segkd.export.runtime import probe_providers

    try:
        probe_providers(("tensorrt",))
    except SegkdError as e:
        return False, str(e)
    return True, "TensorrtExecutionProvider loaded"


def run_trt_ep(onnx_path: str | Path, input_name: str, profile: dict[str, Any], fp16: bool) -> dict[str, Any]:
    """Build the engine through ORT's TensorRT EP at the optimal shape and compare it with the CPU provider."""
    from segkd.export.runtime import create_session
    from segkd.safeio import segkd_tempdir

    opt = tuple(profile["opt"])
    with segkd_tempdir("trt") as cache:
        trt_options = {
            "trt_fp16_enable": bool(fp16),
            "trt_engine_cache_enable": False,
            "trt_timing_cache_enable": False,
            "trt_profile_min_shapes": f"{input_name}:{shape_text(profile['min'])}",
            "trt_profile_opt_shapes": f"{input_name}:{shape_text(profile['opt'])}",
            "trt_profile_max_shapes": f"{input_name}:{shape_text(profile['max'])}",
            "trt_engine_cache_path": str(cache),
        }
        trt = create_session(onnx_path, ("tensorrt",), trt_options=trt_options)
        cpu = create_session(onnx_path, ("cpu",))
        x = np.random.default_rng(0).standard_normal(opt).astype(np.float32)
        a = trt.run(None, {input_name: x})[0]
        b = cpu.run(None, {input_name: x})[0]
    diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.shape == b.shape else float("inf")
    return {"shape": list(opt), "max_abs_diff_vs_cpu": diff, "providers_used": trt.get_providers()}


def trt_readiness(model: Any, plan: Any, out: str | Path, fp16: bool, int8: bool = False) -> dict[str, Any]:
    """The static report plus the trtexec line; the EP build itself runs after the file is written (see CLI)."""
    report = check_graph(model)
    input_name = model.graph.input[0].name
    report["trtexec"] = trtexec_command(out, input_name, plan.profile, plan.static, fp16, int8)
    report["profile"] = {k: shape_text(v) for k, v in plan.profile.items()}
    return report
