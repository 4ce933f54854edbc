"""`segkd report`: a self-contained page whose numbers are the runs' own, built from two tiny real runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from segkd.report.measure import sample_indices

torch.set_num_threads(1)

TINY = ["--data", "synth", "--iters", "4", "--crop", "32x32", "--resize", "32x32", "--batch", "2", "--workers", "0",
        "--device", "cpu", "--val-every", "2", "--no-progress"]
PNG_URI = '<img src="data:image/png;base64,'


_cli = run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A supervised run (the teacher) and a kd run distilled from its best checkpoint, 4 iterations each."""
    from typer.testing import CliRunner

    from segkd.cli import app

    root = tmp_path_factory.mktemp("runs")
    teacher, student = root / "teacher", root / "student"
    res = CliRunner().invoke(app, ["train", "--model", "segformer-b0", "--out", str(teacher), *TINY])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["distill", "--method", "kd", "--student", "segformer-b0", "--teacher",
                                   "segformer-b0", "--teacher-weights", str(teacher / "best.safetensors"),
                                   "--out", str(student), *TINY])
    assert res.exit_code == 0, res.output
    return {"teacher": teacher, "student": student}


def _rows(page: str, title: str) -> dict[str, list[str]]:
    """The rows of the HTML table headed ``title``, keyed by their first cell."""
    block = page.split(f"<h2>{title}</h2>", 1)[1].split("</table>", 1)[0]
    rows = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", block, flags=re.S):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", tr, flags=re.S)
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def test_report_of_teacher_and_student(runs, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "site" / "page.html"
    code, stdout, err = _cli(monkeypatch, capsys, "report", str(runs["teacher"]), str(runs["student"]),
                             "--out", str(out), "--samples", "2")
    assert code == 0, err
    assert f"wrote {out}" in stdout
    page = out.read_text()
    # self-contained: every src/href is a data: URI (no file, no network)
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert refs and all(r.startswith("data:") for r in refs)
    # loss + mIoU curves + per-class bars + one figure per sample
    assert page.count(PNG_URI) == 3 + 2

    val = _rows(page, "Validation (%)")
    cost = _rows(page, "Size and cost")
    for name in ("teacher", "student"):
        doc = json.loads((runs[name] / "run.json").read_text())
        final, best = doc["summary"]["final"]["student"], doc["summary"]["best"]["student"]
        assert val[name][1:4] == [f"{100 * final['miou']:.2f}", f"{100 * best['miou']:.2f}", str(best["iteration"])]
        assert val[name][4] == f"{100 * final['aacc']:.2f}"
        assert cost[name][0] == f"{doc['deploy_params']['student'] / 1e6:.3f}"
        assert float(cost[name][3]) > 0  # latency measured
    # the teacher named in distill.json is the teacher run's best checkpoint: shown once, as that run
    assert not any(k.startswith("teacher ") for k in val)
    assert "the teacher of student (best.safetensors) is teacher on this page" in page
    gmacs = json.loads((runs["student"] / "distill.json").read_text())["deploy_gmacs"]["student"]
    assert cost["student"][1] == f"{gmacs:.3f}"
    per_class = _rows(page, "Per-class IoU (%)")
    assert list(per_class) == json.loads((runs["teacher"] / "run.json").read_text())["classes"]

    md = out.with_suffix(".md").read_text()
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert len(links) == 5
    for link in links:
        assert (out.parent / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best_t = json.loads((runs["teacher"] / "run.json").read_text())["summary"]["best"]["student"]
    assert f"| {100 * best_t['miou']:.2f} |" in md


def test_teacher_found_in_distill_json_is_evaluated_as_the_run_validates(runs, tmp_path, monkeypatch,
                                                                          capsys) -> None:
    out = tmp_path / "student.html"
    code, _, err = _cli(monkeypatch, capsys, "report", str(runs["student"]), "--out", str(out), "--samples", "1",
                        "--no-latency")
    assert code == 0, err
    page = out.read_text()
    # evaluated here on the student run's val split, the teacher scores what its own run logged at its best iteration
    best_t = json.loads((runs["teacher"] / "run.json").read_text())["summary"]["best"]["student"]
    assert _rows(page, "Validation (%)")["teacher segformer-b0"][1] == f"{100 * best_t['miou']:.2f}"
    logged = [json.loads(line) for line in (runs["teacher"] / "metrics.jsonl").read_text().splitlines()]
    at_best = next(r for r in logged if r["type"] == "val" and r["iter"] == best_t["iteration"])
    per_class = _rows(page, "Per-class IoU (%)")
    assert [cells[1] for cells in per_class.values()] == [
        "-" if v is None else f"{100 * v:.2f}" for v in at_best["per_class_iou"]]
    assert page.count(PNG_URI) == 3 + 1


def test_unfinished_run_is_shown_with_what_it_has(runs, tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path / "cut"
    shutil.copytree(runs["teacher"], run)
    doc = json.loads((run / "run.json").read_text())
    del doc["summary"]
    (run / "run.json").write_text(json.dumps(doc))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_val = max(i for i, r in enumerate(records) if r["type"] == "val")
    kept = [r for i, r in enumerate(records) if i != last_val]  # killed before its final validation
    assert kept[-1]["type"] == "train"
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"type": "va')  # torn line
    final = [r for r in kept if r["type"] == "val"][-1]
    out = tmp_path / "cut.html"
    code, stdout, err = _cli(monkeypatch, capsys, "report", str(run), "--out", str(out), "--samples", "0",
                             "--no-latency")
    assert code == 0, err
    page = out.read_text()
    assert f"unfinished: iteration {kept[-1]['iter']} of 4" in page
    assert "unfinished" in stdout
    assert _rows(page, "Validation (%)")["cut"][1] == f"{100 * final['miou']:.2f}"
    assert _rows(page, "Size and cost")["cut"][3] == "-"
    assert page.count(PNG_URI) == 3


def test_bad_run_dir_is_one_line(runs, tmp_path, monkeypatch, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _cli(monkeypatch, capsys, "report", str(runs["student"]), str(empty), "--out",
                        str(tmp_path / "r.html"))
    assert code == 1
    assert err.strip().splitlines() == [f"error: {empty}: not a segkd run directory (no run.json)"]
    assert not (tmp_path / "r.html").exists()
    code, _, err = _cli(monkeypatch, capsys, "report", str(runs["student"]), "--teacher", str(tmp_path / "no.pth"),
                        "--out", str(tmp_path / "r.html"))
    assert code == 1 and err.strip().splitlines() == [f"error: --teacher {tmp_path / 'no.pth'}: file not found"]


def test_sample_indices_spread_over_the_split() -> None:
    assert sample_indices(40, 4) == [0, 13, 26, 39]
    assert sample_indices(3, 5) == [0, 1, 2]
    assert sample_indices(10, 0) == []
