"""Human-readable rendering of the ``segkd export`` report (the ``--json`` output is the report itself)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from segkd.shapes import hw_text
from segkd.textout import human_size, print_table


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}"


def _precision(ex: dict[str, Any]) -> str:
    return "int8 (QDQ)" if ex.get("int8") else "fp16" if ex["fp16"] else "fp32"


def _verdict(trt: dict[str, Any]) -> str:
    from segkd.export.tensorrt import readiness_verdict

    sev = [i["severity"] for i in trt["issues"]]
    text = trt.get("verdict") or readiness_verdict(sev.count("error"), sev.count("warning"))
    return text if text == "ready" else f"[red]{text}[/]" if not trt["ready"] else f"[yellow]{text}[/]"


def _counts(ops: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in ops.items()) or "none"


def render_int8(q: dict[str, Any], console: Console) -> None:
    """The INT8 gate line, sizes and which op types run in int8 / stayed fp32."""
    cal = q["calibration"]
    console.print(
        f"INT8 {q['format']} for {q['target']} ({q['weights']} weights, {q['activations']} activations), "
        f"calibrated by "
        f"{cal['method']} on {cal['images']} of {cal['images_in_split']} {cal['split']!r} images: mIoU on "
        f"{q['eval_split']!r} ({q['eval_images']} images) {q['miou_fp32']:.2f} fp32 -> {q['miou_int8']:.2f} int8, "
        f"drop {q['miou_drop']:.2f} <= {q['max_miou_drop']:g}; {human_size(q['bytes_fp32'])} -> "
        f"{human_size(q['bytes_int8'])}", highlight=False, soft_wrap=True)
    console.print(f"  int8: {_counts(q['quantized_op_types'])}", highlight=False, soft_wrap=True)
    console.print(f"  fp32: {_counts(q['fp32_op_types'])}", highlight=False, soft_wrap=True)
    if q.get("verification"):
        render_parity(q["verification"], "int8 (QDQ): ONNX Runtime vs PyTorch (reported; the gate is the mIoU drop)",
                      console, gated=False)


def render_parity(ver: dict[str, Any], title: str, console: Console, gated: bool = True) -> None:
    """One verification table: per case the output differences and label agreement (and the verdict if gated)."""
    table = Table(title=title, title_justify="left")
    for col in ("case", "max |diff|", "mean |diff|", "label agreement", *(("ok",) if gated else ())):
        table.add_column(col, no_wrap=col == "case")  # the case names the input: never cut it
    for c in ver["cases"]:
        if "error" in c:
            table.add_row(c["case"], "-", "-", "-", *((f"[red]{c['error']}[/]",) if gated else ()))
            continue
        table.add_row(c["case"], _num(c["max_abs_diff"]), _num(c["mean_abs_diff"]), f"{c['label_agreement']:.5f}",
                      *(("yes" if c["passed"] else "[red]no[/]",) if gated else ()))
    print_table(console, table)


def render_export_report(report: dict[str, Any], console: Console) -> None:
    """Summary, verification table, TensorRT readiness and the trtexec line."""
    ex, graph = report["export"], report["graph"]
    shape = "x".join(str(d) for d in ex["input_shape"])
    console.print(
        f"[bold]{report['model']}[/] -> {report['out']}  opset {ex['opset']}, output {ex['output']}, "
        f"input {ex['input_name']} {shape} ({ex['input_range']}), {_precision(ex)}, "
        f"{graph['nodes']} nodes, {human_size(report['bytes'])}, {report['seconds']:.1f} s",
        highlight=False,
    )
    if ex.get("export_size_source"):
        console.print(f"size {hw_text(ex['export_size'])}: {ex['export_size_source']}", highlight=False,
                      soft_wrap=True)
    ver = report.get("verification")
    if ver:
        title = "fp32 graph (verified, then quantised)" if report.get("int8") else _precision(ex)
        render_parity(ver, f"{title}: ONNX Runtime vs PyTorch", console)
        if ver.get("static_other_size"):
            probe = ver["static_other_size"]
            verdict = "rejected (as it must)" if probe["rejected"] else "[red]accepted[/]"
            console.print(f"static: another size {'x'.join(map(str, probe['shape']))} {verdict}: {probe['reason']}",
                          highlight=False)
        console.print(f"providers requested {ver['providers_requested']}, used {ver['providers_used']}; gates: "
                      f"atol {ver['atol']}, min agreement {ver['min_agreement']}", highlight=False)
    else:
        console.print("verification skipped (--no-verify)")
    if report.get("int8"):
        render_int8(report["int8"], console)
    trt = report["tensorrt"]
    src = trt["table"]
    console.print(
        f"TensorRT readiness (ONNX-TensorRT {src['tensorrt_version']} matrix, {src['repository']} "
        f"{src['path']}@{src['commit'][:10]}): {_verdict(trt)}; "
        f"{len(trt['op_counts'])} op types, unsupported: {', '.join(trt['unsupported']) or 'none'}",
        highlight=False,
    )
    for issue in trt["issues"]:
        where = f" {issue['op']}" + (f" {issue['node']}" if issue["node"] else "")
        console.print(f"  {issue['severity']}:{where}: {issue['message']}", highlight=False, soft_wrap=True)
    engine = trt.get("engine") or {}
    if engine.get("built"):
        console.print(f"  TensorRT EP engine built and run at {engine['shape']}: max |diff| vs CPU "
                      f"{engine['max_abs_diff_vs_cpu']:.3g}", highlight=False)
    elif engine and engine.get("requested", True):
        console.print(f"  TensorRT EP not run: {engine['reason']}", highlight=False, soft_wrap=True)
    if trt.get("profile_note"):
        console.print(f"  note: {trt['profile_note']}", highlight=False, soft_wrap=True)
    console.print(trt["trtexec"], highlight=False, soft_wrap=True)
