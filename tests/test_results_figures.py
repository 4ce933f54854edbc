"""Every figure in docs/results.md's findings and in the README's outcome paragraph comes from a committed JSON.

A figure is a number written with a decimal point. It must equal (at the precision written) a number in
docs/results.json, or in a JSON file the checked text names (``benchmarks/results/teacher-cache.json``); values
stored as fractions (mIoU 0.4136) also match in points (41.36). Signs are ignored (a Δ of -0.79 is the number
0.79 with a sign the text adds). Integers (seeds, iterations, image counts) are not checked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = "<!-- findings: written by hand, kept when the table above is regenerated -->"
NUMBER = re.compile(r"(?<![\w.])[-+−]?(\d+\.\d+)(?![\w.]*\.json)")
JSON_NAME = re.compile(r"[\w./-]+\.json")


def _leaves(obj: object):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def admissible(docs: list[object]) -> set[str]:
    """Every number of the documents, written with 1 and 2 decimals (and x100 for fractions)."""
    out: set[str] = set()
    for doc in docs:
        for v in _leaves(doc):
            if isinstance(v, str):
                out.update(NUMBER.findall(v))
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            for x in (abs(v), abs(v) * 100) if abs(v) <= 1.5 else (abs(v),):
                out.update({f"{x:.1f}", f"{x:.2f}", f"{x:.3f}"})
    return out


def figures(text: str) -> list[str]:
    return [m.group(1) for m in NUMBER.finditer(text)]


def untraced(text: str) -> list[str]:
    docs: list[object] = [json.loads((ROOT / "docs" / "results.json").read_text())]
    for name in sorted(set(JSON_NAME.findall(text))):
        path = next((p for p in (ROOT / name, ROOT / "docs" / name) if p.is_file()), None)
        if path is not None:
            docs.append(json.loads(path.read_text()))
    ok = admissible(docs)
    return [f for f in figures(text) if f not in ok]


def readme_outcome() -> str:
    text = (ROOT / "README.md").read_text()
    start, end = text.index("<!-- results:"), text.index("<!-- /results -->")
    return text[start:end]


@pytest.mark.parametrize("where", ["docs/results.md findings", "README outcome"])
def test_every_figure_is_in_a_committed_json(where: str) -> None:
    text = (ROOT / "docs" / "results.md").read_text().split(FINDINGS, 1)[1] if where.startswith("docs") \
        else readme_outcome()
    assert untraced(text) == []


def test_the_check_can_fail(tmp_path: Path) -> None:
    assert figures("KD lifts B0 from 37.95 to 44.20 (+6.25 [−3.0, +9.5]), 60x80, 3 seeds") == [
        "37.95", "44.20", "6.25", "3.0", "9.5"]
    ok = admissible([{"miou": 0.4420, "delta": {"mean": 6.25, "ci95": [3.01, 9.5]}, "s": "scale 0.75,1.5"}])
    assert {"44.20", "44.2", "6.25", "3.0", "9.5", "0.75", "1.5"} <= ok
    assert "37.95" not in ok and "84.0" not in ok
