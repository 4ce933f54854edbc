"""Rich rendering of a bench report: one row per model x backend x input, ratios against the first model."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from segkd.textout import print_table


def _table(title: str, cols: list[str]) -> Table:
    """A compact table whose identifying columns (model, backend, input) never wrap or truncate; numbers are
    right-aligned."""
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False, pad_edge=False,
                  collapse_padding=True)
    for c in cols:
        left = c in ("model", "backend", "input")
        table.add_column(c, justify="left" if left else "right", no_wrap=left)
    return table


def _shape(s: list[int]) -> str:
    return "x".join(str(v) for v in s)


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _gmacs_at(model: dict[str, Any], h: int, w: int) -> float | None:
    for c in model["complexity"]:
        if c["input"][2:] == [h, w]:
            return c.get("gmacs")
    return None


# the "speed-up vs 1st" cell of a run the 1st model has no counterpart for; a note under the table says why
NO_PEER = "n/a*"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (what the table shows), also handy for docs and tests."""
    out: list[dict[str, Any]] = []
    first = report["models"][0] if report["models"] else None
    first_runs = {(r["backend"], _shape(r["input"])): r for r in (first or {}).get("runs", [])}
    for i, m in enumerate(report["models"]):
        items = m["runs"] or [{"backend": "-", "input": c["input"], "latency_ms": None} for c in m["complexity"]]
        for r in items:
            h, w = r["input"][2], r["input"][3]
            gmacs = _gmacs_at(m, h, w)
            row = {
                "model": m["name"], "backend": r["backend"], "input": _shape(r["input"]),
                "providers": ",".join(p.replace("ExecutionProvider", "") for p in r.get("providers_used") or []),
                "params_m": m["params_m"], "gmacs": gmacs, "gflops": None if gmacs is None else 2 * gmacs,
                "lat": r.get("latency_ms"), "ips": r.get("throughput_ips"), "mem": r.get("peak_mem_mb"),
                "util": r.get("cpu_util"), "contended": r.get("contended"),
                "vs_params": "", "vs_gmacs": "", "vs_speed": "",
            }
            if i == 0:
                row["vs_speed"] = "ref" if r.get("latency_ms") else ""
            elif first is not None:
                row["vs_params"] = _ratio(m["params"], first["params"])
                row["vs_gmacs"] = _ratio(gmacs, _gmacs_at(first, h, w))
                f = first_runs.get((r["backend"], _shape(r["input"])))
                if f is not None and r.get("latency_ms"):
                    row["vs_speed"] = _ratio(f["latency_ms"]["p50"], r["latency_ms"]["p50"])
                elif r.get("latency_ms"):
                    row["vs_speed"] = NO_PEER
            out.append(row)
    return out


def render(report: dict[str, Any], console: Console) -> None:
    """The summary table, the conventions line, and ``--detail`` tables when present."""
    if report.get("train_step"):
        render_train_step(report["train_step"], console)
    if not report["models"]:
        return
    env = report["environment"]
    title = (f"segkd bench on {env['device']} ({env['cpu_model'] if env['device'] == 'cpu' else env['gpu_name']}, "
             f"{env['threads']} threads)")
    several = len(report["models"]) > 1
    timed = any(m["runs"] for m in report["models"])
    table_rows = rows(report)
    # two narrow tables, not one of 15 columns (~190 wide piped, squeezed to "3…" in an 80-column terminal):
    # what the model costs (per model and input), then how fast it ran (per model, backend and input)
    size = _table(title, ["model", "input", "params (M)", "GMACs", "GFLOPs"]
                  + (["params vs 1st", "GMACs vs 1st"] if several else []))
    seen: set[tuple[str, str]] = set()
    for r in table_rows:
        if (r["model"], r["input"]) in seen:
            continue
        seen.add((r["model"], r["input"]))
        size.add_row(*[r["model"], r["input"], f"{r['params_m']:.2f}", _fmt(r["gmacs"]), _fmt(r["gflops"])]
                     + ([r["vs_params"], r["vs_gmacs"]] if several else []))
    print_table(console, size)
    if timed:
        speed = _table("latency", ["model", "backend", "input", "p50 ms", "p90 ms", "mean±std ms", "img/s",
                                   "peak MB", "CPU util"] + (["speed-up vs 1st"] if several else []))
        for r in table_rows:
            lat = r["lat"]
            backend = r["backend"] + (f" ({r['providers']})" if r["backend"] == "onnxruntime" else "")
            util = "-" if r["util"] is None else f"{r['util']:.2f}" + (" [red]contended[/]" if r["contended"] else "")
            speed.add_row(*[r["model"], backend, r["input"], _fmt(lat and lat["p50"], ".1f"),
                            _fmt(lat and lat["p90"], ".1f"), "-" if not lat else f"{lat['mean']:.1f}±{lat['std']:.1f}",
                            _fmt(r["ips"], ".2f"), _fmt(r["mem"], ".0f"), util] + ([r["vs_speed"]] if several else []))
        print_table(console, speed)
    if timed and any(r["vs_speed"] == NO_PEER for r in table_rows):
        console.print(f"{NO_PEER}: the 1st model has no run with this backend and input, and a speed-up only compares "
                      "like with like (e.g. an .onnx file runs on onnxruntime, a checkpoint on torch: bench the 1st "
                      "with --backend torch --backend onnxruntime, or list a file of the same kind first)",
                      highlight=False, soft_wrap=True)
    console.print("GMACs = multiply-adds per image (the SegFormer/mmseg papers' 'FLOPs'); GFLOPs = 2 x GMACs. "
                  "Attention counted; elementwise ops and interpolation not. Latency excludes preprocessing and "
                  "host-to-device copies (torch); peak MB on CPU is the process-wide peak RSS.", highlight=False,
                  soft_wrap=True)
    if any(r.get("contended") for m in report["models"] for r in m["runs"]):
        console.print("[yellow]warning:[/] some runs were contended (process CPU time / wall time < 0.9 x threads): "
                      "another process shared the cores, so those latencies are too high.", highlight=False,
                      soft_wrap=True)
    if report.get("settings", {}).get("inputs_source", "--input") != "--input":
        console.print(f"note: input {report['settings']['inputs_source']}", highlight=False, soft_wrap=True)
    for m in report["models"]:
        for note in m.get("notes", []):
            console.print(f"note ({m['name']}): {note}", highlight=False, soft_wrap=True)
        for c in m["complexity"]:
            if "modules" in c:
                _render_detail(m["name"], c, console)
    for g in report.get("gates", []):
        mark = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "[yellow]skip[/]"}[g["passed"]]
        console.print(f"{mark} {g['message']}", highlight=False, soft_wrap=True)


def _render_detail(name: str, c: dict[str, Any], console: Console) -> None:
    total = next((row["gflops"] for row in c["modules"] if row["depth"] == 0), None) or c.get("gflops") or 0.0
    t = Table(title=f"{name} @ {_shape(c['input'])}: FLOPs by module")
    for col in ("module", "GMACs", "GFLOPs", "share"):
        t.add_column(col, justify="left" if col == "module" else "right", no_wrap=col == "module")
    for row in c["modules"]:
        label = "  " * row["depth"] + row["module"].split(".")[-1] if row["depth"] else row["module"]
        share = f"{100 * row['gflops'] / total:.1f}%" if total else "-"
        t.add_row(label, f"{row['gflops'] / 2:.3f}", f"{row['gflops']:.3f}", share)
    print_table(console, t)
    by_op = ", ".join(f"{k.replace('aten.', '')} {v:.3f}" for k, v in c.get("flops_by_op", {}).items())
    console.print(f"GFLOPs by op: {by_op}", highlight=False, soft_wrap=True)
    unc = c.get("uncounted_ops") or {}
    text = ", ".join(f"{k.replace('aten.', '')} x{n}" for k, n in unc.items()) or "none"
    console.print(f"ops seen with no FLOP formula (contributed 0; views omitted): {text}", highlight=False,
                  soft_wrap=True)


def render_train_step(entries: list[dict[str, Any]], console: Console) -> None:
    """One row per input: the method's step, its lower bound and their ratio."""
    t = Table(title="distillation train step vs its lower bound")
    for col in ("method", "student", "teacher/peer", "input", "adapter params (M)", "step p50 ms", "bound p50 ms",
                "overhead", "peak MB", "CPU util"):
        name = col in ("method", "student", "teacher/peer", "input")  # what identifies a row: never cut
        t.add_column(col, justify="left" if name else "right", no_wrap=name)
    for e in entries:
        step, bound = e["method_step"], e["lower_bound"]
        util = f"{step['cpu_util']:.2f}/{bound['cpu_util']:.2f}"
        if step.get("contended") or bound.get("contended"):
            util += " [red]contended[/]"
        t.add_row(e["method"], e["student"], e.get("teacher") or e.get("peer") or "-", _shape(e["input"]),
                  f"{e['adapter_params'] / 1e6:.3f}", f"{step['latency_ms']['p50']:.1f}",
                  f"{bound['latency_ms']['p50']:.1f}", f"{e['overhead_ratio']:.2f}x",
                  f"{max(step['peak_mem_mb'], bound['peak_mem_mb']):.0f}", util)
    print_table(console, t)
    if entries:
        console.print(f"lower bound: {entries[0]['bound_definition']}; optimiser {entries[0]['optimizer']} on both; "
                      "the step includes the method's adapters, taps and loss terms.", highlight=False)
