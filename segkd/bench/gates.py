"""CI gates on a bench report: absolute limits and regressions against a previous report.

A gate applies to every model in the report unless its value names the models it applies to after ``@``:
``--max-latency-ms 40@student.safetensors``, ``--max-params 4M@2`` (a MODEL argument as typed, its file name, its
row name, or its position 1..N; several separated by commas), so a teacher-vs-student comparison can gate the
student alone; ``--max-regression 10%@2`` scopes the baseline comparison. Latency gates use
the p50 of each run (backend x input x batch); ``--max-gflops`` uses GFLOPs per image (2 x GMACs) at each input size;
``--max-params`` the deploy parameter count. A gate that cannot be evaluated (e.g. GFLOPs of an ONNX file without
segkd metadata) fails rather than passing silently. A baseline row is matched by model name (else by file path,
else, in a report from before rows were named by model, by file name), then by backend and input shape; pairs
missing on either side are listed as skipped, and a baseline sharing nothing with the run is an error (exit 1),
not a pass.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segkd.errors import GateFailure, SegkdError

_COUNT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([kmgb]?)\s*$", re.IGNORECASE)
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}


def parse_count(text: str, option: str = "--max-params") -> float:
    """``"3.8M"``, ``"500k"``, ``"25e6"`` or ``"3800000"`` -> a number of parameters."""
    m = _COUNT_RE.match(text or "")
    if not m:
        raise SegkdError(f"{option} {text!r}: expected a count such as 3.8M, 500k or 3800000")
    count = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if not math.isfinite(count):  # '1e999' is inf: a gate that can never fail
        raise SegkdError(f"{option} {text!r}: not a finite count")
    return count


def split_scope(text: str, option: str) -> tuple[str, tuple[str, ...] | None]:
    """``"40@a,b"`` -> ``("40", ("a", "b"))``; no ``@`` -> ``(text, None)`` (every model)."""
    value, sep, scope = str(text).partition("@")
    if not sep:
        return value, None
    models = tuple(s.strip() for s in scope.split(",") if s.strip())
    if not models:
        raise SegkdError(f"{option} {text!r}: name the models after '@', e.g. 40@student.safetensors or 40@2")
    return value.strip(), models


@dataclass
class Gates:
    """Thresholds; ``None`` disables a gate. ``max_regression`` is a fraction (0.10 = 10 %). ``scope`` maps a gate
    (``max-params``, ``max-gflops``, ``max-latency-ms``, ``baseline``) to the MODEL selectors it applies to; a gate
    not in it applies to every model."""

    max_latency_ms: float | None = None
    max_gflops: float | None = None
    max_params: float | None = None
    baseline: Path | None = None
    max_regression: float = 0.10
    scope: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def any(self) -> bool:
        return any(v is not None for v in (self.max_latency_ms, self.max_gflops, self.max_params, self.baseline))

    def check_scope(self, models: list[str]) -> None:
        """Every selector names one of the MODEL arguments (one line otherwise, before anything is measured)."""
        for gate, selectors in self.scope.items():
            for sel in selectors:
                if not any(_selects(sel, i, {"arg": a}) for i, a in enumerate(models)):
                    raise SegkdError(f"--{'max-regression' if gate == 'baseline' else gate} ...@{sel}: {sel!r} is "
                                     f"none of the MODELs ({', '.join(models) or 'none'}) nor a position 1.."
                                     f"{len(models)}")

    def applies(self, gate: str, index: int, model: dict[str, Any]) -> bool:
        selectors = self.scope.get(gate)
        return selectors is None or any(_selects(s, index, model) for s in selectors)


def _selects(selector: str, index: int, model: dict[str, Any]) -> bool:
    """Whether ``selector`` names the report row ``model`` (position ``index``, 0-based)."""
    if selector.isdigit():
        return int(selector) == index + 1
    arg = str(model.get("arg") or "")
    return selector in {arg, Path(arg).name, str(model.get("name") or ""), str(model.get("path") or "")}


def parse_gates(max_latency_ms: str | None, max_gflops: str | None, max_params: str | None,
                baseline: Path | None, max_regression: str) -> Gates:
    """The gate options of ``segkd bench`` (each ``LIMIT[@MODEL,...]``) as :class:`Gates`."""
    from segkd.bench.specs import parse_nonnegative, parse_percent

    gates, scope = Gates(baseline=baseline), {}
    for gate, text in (("max-latency-ms", max_latency_ms), ("max-gflops", max_gflops), ("max-params", max_params)):
        if text is None:
            continue
        value, models = split_scope(text, f"--{gate}")
        limit = parse_count(value) if gate == "max-params" else parse_nonnegative(value, f"--{gate}")
        setattr(gates, gate.replace("-", "_"), limit)
        if models:
            scope[gate] = models
    value, models = split_scope(max_regression, "--max-regression")
    gates.max_regression = parse_percent(value)
    if models:
        scope["baseline"] = models
    gates.scope = scope
    return gates


def _shape(s: list[int]) -> str:
    return "x".join(str(v) for v in s)


def load_baseline(path: Path) -> dict[str, Any]:
    """A previous ``segkd bench`` JSON report, checked enough to compare against."""
    from segkd.bench.run import SCHEMA_VERSION

    if not path.is_file():
        raise SegkdError(f"--baseline {path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SegkdError(f"--baseline {path}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(data, dict) or data.get("kind") != "segkd.bench" or not isinstance(data.get("models"), list):
        raise SegkdError(f"--baseline {path}: not a segkd bench report (make one with `segkd bench --json-out FILE`)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise SegkdError(f"--baseline {path}: schema_version {data.get('schema_version')!r}, this segkd writes "
                         f"{SCHEMA_VERSION}")
    return data


def _check(results: list[dict[str, Any]], gate: str, model: str, where: str, value: float | None, limit: float,
           unit: str, extra: str = "") -> None:
    if value is None:
        results.append({"gate": gate, "model": model, "where": where, "value": None, "limit": limit,
                        "passed": False, "message": f"{gate}: {model} {where}: value unavailable"})
        return
    passed = value <= limit
    msg = f"{gate}: {model} {where}: {value:.4g}{unit} {'<=' if passed else '>'} {limit:.4g}{unit}{extra}"
    results.append({"gate": gate, "model": model, "where": where, "value": value, "limit": limit,
                    "passed": passed, "message": msg})


def apply_gates(report: dict[str, Any], gates: Gates) -> list[dict[str, Any]]:
    """Evaluate every gate; stores ``report["gates"]`` and ``report["passed"]`` and returns the gate list."""
    results: list[dict[str, Any]] = []
    for i, m in enumerate(report["models"]):
        name = m["name"]
        if gates.max_params is not None and gates.applies("max-params", i, m):
            _check(results, "max-params", name, "deploy", float(m["params"]), gates.max_params, "")
        if gates.max_gflops is not None and gates.applies("max-gflops", i, m):
            for c in m["complexity"]:
                _check(results, "max-gflops", name, f"@{_shape(c['input'])}", c.get("gflops"), gates.max_gflops, " G")
        if gates.max_latency_ms is not None and gates.applies("max-latency-ms", i, m):
            if not m["runs"]:  # nothing was timed (--no-latency): the gate cannot pass
                _check(results, "max-latency-ms", name, "no timed run", None, gates.max_latency_ms, " ms")
            for r in m["runs"]:
                extra = f" (contended run: CPU util {r['cpu_util']:.2f})" if r.get("contended") else ""
                _check(results, "max-latency-ms", name, f"{r['backend']} {_shape(r['input'])} p50",
                       r["latency_ms"]["p50"], gates.max_latency_ms, " ms", extra)
    if gates.baseline is not None:
        results += _baseline_gates(report, load_baseline(gates.baseline), gates, str(gates.baseline))
    report["gates"] = results
    report["passed"] = all(g["passed"] is not False for g in results)
    return results


def _baseline_match(base: dict[str, Any]) -> Any:
    """``row -> its baseline row or None``: the same name, else the same file path, else (a baseline from before
    rows were named by model, without ``path``: files were named by their file name) the row named by its file."""
    by_name = {m["name"]: m for m in base["models"]}
    by_path = {m["path"]: m for m in base["models"] if m.get("path")}
    legacy = {m["name"]: m for m in base["models"] if "path" not in m}

    def match(row: dict[str, Any]) -> dict[str, Any] | None:
        path = row.get("path")
        return by_name.get(row["name"]) or (path and (by_path.get(path) or legacy.get(Path(path).name))) or None

    return match


def _baseline_gates(report: dict[str, Any], base: dict[str, Any], gates: Gates, source: str) -> list[dict[str, Any]]:
    baseline_of = _baseline_match(base)
    limit = gates.max_regression
    results: list[dict[str, Any]] = []
    compared = 0

    def regress(gate: str, name: str, where: str, new: float | None, old: float | None, unit: str) -> None:
        nonlocal compared
        if new is None or old is None or old <= 0:
            results.append({"gate": gate, "model": name, "where": where, "value": None, "limit": limit,
                            "passed": None, "message": f"{gate}: {name} {where}: skipped (no value on one side)"})
            return
        compared += 1
        change = new / old - 1.0
        passed = change <= limit
        msg = (f"{gate}: {name} {where}: {new:.4g}{unit} vs baseline {old:.4g}{unit} ({change:+.1%}, "
               f"limit +{limit:.0%})")
        results.append({"gate": gate, "model": name, "where": where, "value": change, "limit": limit,
                        "passed": passed, "message": msg, "baseline": old, "current": new})

    for i, m in enumerate(report["models"]):
        if not gates.applies("baseline", i, m):
            continue
        old = baseline_of(m)
        if old is None:
            results.append({"gate": "baseline", "model": m["name"], "where": "-", "value": None, "limit": limit,
                            "passed": None, "message": f"baseline: {m['name']} not in {source}: skipped"})
            continue
        regress("regression-params", m["name"], "deploy", float(m["params"]), float(old["params"]), "")
        old_c = {_shape(c["input"]): c for c in old.get("complexity", [])}
        for c in m["complexity"]:
            o = old_c.get(_shape(c["input"]))
            if o is not None:
                regress("regression-gmacs", m["name"], f"@{_shape(c['input'])}", c.get("gmacs"), o.get("gmacs"), " G")
        old_r = {(r["backend"], _shape(r["input"])): r for r in old.get("runs", [])}
        for r in m["runs"]:
            o = old_r.get((r["backend"], _shape(r["input"])))
            if o is not None:
                regress("regression-latency", m["name"], f"{r['backend']} {_shape(r['input'])} p50",
                        r["latency_ms"]["p50"], o["latency_ms"]["p50"], " ms")
    if compared == 0:
        raise SegkdError(f"--baseline {source}: shares no model/backend/input with this run, nothing to compare")
    return results


def enforce(report: dict[str, Any]) -> None:
    """Raise :class:`GateFailure` (exit 3) with one line naming the first failed gate and how many failed."""
    failed = [g for g in report.get("gates", []) if g["passed"] is False]
    if failed:
        more = f" (+{len(failed) - 1} more failed gate(s))" if len(failed) > 1 else ""
        raise GateFailure(failed[0]["message"] + more)
