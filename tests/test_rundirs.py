"""Run directories and resume (issue 23 items 1-4, 10, 16; docs/faults.md): nothing the user wrote is replaced,
a resume state continues only its own run, and a resumed run keeps its own settings. Every case through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import one_error_line
from test_faults import KILL_HOOK, T, _env, _main

from segkd.engine.state import load_resume
from segkd.runlock import LOCK_FILE

torch.set_num_threads(1)
FAST = ["--iters", "2", "--val-every", "2", "--threads", "1"]


def _killed_run(out: Path, iters: int = 4, at: int = 3, extra: tuple[str, ...] = ()) -> None:
    """A train run SIGKILLed right after step ``at`` (its resume state from iteration 2), in a process of its own."""
    args = [*T, "--iters", str(iters), "--val-every", "2", "--threads", "1", *extra, "--out", str(out)]
    proc = subprocess.run([sys.executable, str(KILL_HOOK), f"step:{at}", *args], env=_env(), capture_output=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert load_resume(out)["iteration"] == 2


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` (the lock file a killed run left is stale by construction: taken over, removed)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != LOCK_FILE}


# ------------------------------------------------------------------------- item 1: --out holds the user's files
def test_out_holding_other_files_is_refused_naming_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.yaml").write_text("# my notes\nlr: 0.1\n")
    (exp / "run.json").write_text('{"mine": true}\n')
    (exp / "notes.txt").write_text("keep me\n")
    before = _snapshot(exp)
    code, err = _main([*T, *FAST, "--out", exp], capsys)
    assert code == 1
    one_error_line(err, f"--out {exp} is not empty and holds no segkd run (config.yaml, notes.txt, run.json)")
    assert _snapshot(exp) == before and sorted(p.name for p in exp.iterdir()) == sorted(before)  # no lock left
    # a run of the other command is named as such
    other = tmp_path / "distilled"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"command": "segkd distill --method kd", "config": {}}))
    code, err = _main([*T, *FAST, "--out", other], capsys)
    one_error_line(err, f"--out {other} holds a segkd distill run, not a segkd train one")


# ------------------------------------------------------------------------ item 2: --config is never overwritten
def test_the_config_file_given_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    text = "# hand-written: keep my comments\nmodel: segformer-b0\niters: 1  # one step\n"
    (exp / "config.yaml").write_text(text)
    code, err = _main([*T, "--config", exp / "config.yaml", "--out", exp], capsys)
    assert code == 1
    one_error_line(err, f"--config {exp / 'config.yaml'} is the config.yaml this run would write into --out {exp}")
    assert (exp / "config.yaml").read_text() == text and sorted(p.name for p in exp.iterdir()) == ["config.yaml"]


# ---------------------------------------------------------- item 3: a resume state continues only its own run
def test_a_resume_state_from_another_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     small_ckpt: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _killed_run(a)
    _killed_run(b, extra=("--seed", "1"))
    ids = {d: json.loads((d / "run.json").read_text())["run_id"] for d in (a, b)}
    assert ids[a] != ids[b] and f"# run_id: {ids[a]}" in (a / "config.yaml").read_text()
    assert load_resume(a)["run"]["run_id"] == ids[a]
    shutil.copy(a / "resume.pt", b / "resume.pt")  # run A's state dropped into run B's directory
    before = _snapshot(b)
    code, err = _main(["train", "--resume", b, "--no-progress"], capsys)
    assert code == 1
    one_error_line(err, f"{b / 'resume.pt'} belongs to another run (segkd train, run id {ids[a]}) than "
                   f"{b / 'run.json'} (run id {ids[b]})")
    assert _snapshot(b) == before  # config.yaml and metrics.jsonl untouched
    # the right command, named, for a run of the other one (before: "kd needs --teacher NAME")
    code, err = _main(["distill", "--resume", a, "--no-progress"], capsys)
    one_error_line(err, f"{a} holds a segkd train run; continue it with segkd train --resume {a}")
    d = tmp_path / "d"
    code, _ = _main(["distill", "--method", "kd", "--student", "segformer-b0", "--teacher-weights", small_ckpt,
                     "--data", "synth", "--batch", "2", "--crop", "64x64", "--workers", "0", "--device", "cpu",
                     "--no-progress", *FAST, "--out", d], capsys)
    assert code == 0
    code, err = _main(["train", "--resume", d, "--no-progress"], capsys)  # before: "the run already finished (2/2)"
    one_error_line(err, f"{d} holds a segkd distill run; continue it with segkd distill --resume {d}")
    shutil.copy(d / "resume.pt", a / "resume.pt")
    code, err = _main(["train", "--resume", a, "--no-progress"], capsys)
    one_error_line(err, "belongs to another run (segkd distill, run id")


# -------------------------------------------------- item 4: --resume keeps the run's settings; --iters extends
def test_resume_restores_the_runs_own_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _killed_run(run)  # started with --workers 0 --device cpu --threads 1 (T and FAST)
    code, err = _main(["train", "--resume", run], capsys)  # none of them typed again
    assert code == 0, err
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["workers"], cfg["device"], cfg["threads"], cfg["progress"]) == (0, "cpu", 1, False)
    assert json.loads((run / "run.json").read_text())["config"]["workers"] == 0
    # a typed machine option still applies
    code, err = _main(["train", "--resume", run, "--iters", "6", "--log-every", "3"], capsys)
    assert code == 0, err
    assert "schedule changed from 4 to 6 iterations; the poly LR is recomputed over 6" in err
    doc = json.loads((run / "run.json").read_text())
    assert doc["summary"]["iterations"] == 6 and doc["config"]["log_every"] == 3
    assert [(e["at"], e["from"], e["to"]) for e in doc["extensions"]] == [(4, 4, 6)]
    lr = doc["extensions"][0]["lr_factor"]
    assert lr[0] == pytest.approx(0.0) and lr[1] == pytest.approx(1 - 4 / 6)  # poly (power 1) at iteration 4
    assert load_resume(run)["iteration"] == 6
    code, err = _main(["train", "--resume", run], capsys)
    one_error_line(err, "the run already finished (6/6 iterations); extend it with", "--iters N (N > 6)")
    code, err = _main(["train", "--resume", run, "--iters", "5"], capsys)
    one_error_line(err, f"--iters 5: the run in {run} is already at iteration 6")


# ------------------------------------------------------------------------------------- item 10: --out ""
def test_empty_out_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = _main([*T, *FAST, "--out", ""], capsys)
    assert code == 2  # a bad option value is a usage error
    one_error_line(err, "--out must name a directory, got an empty string")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------- item 16: config.yaml repeats from any directory
def test_config_yaml_paths_repeat_from_anywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from segkd.data import synthesize

    work = tmp_path / "work"
    synthesize(work / "small", n_train=4, n_val=2, size=(64, 64))
    monkeypatch.chdir(work)
    args = [a if a != "synth" else "small" for a in T]
    code, err = _main([*args, *FAST, "--out", "runs/x"], capsys)
    assert code == 0, err
    saved = yaml.safe_load((work / "runs/x/config.yaml").read_text())
    assert saved["data"] == str(work / "small") and saved["out"] == "runs/x"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err = _main(["train", "--config", work / "runs/x/config.yaml", "--out", "again"], capsys)
    assert code == 0, err
    # a relative path that came from a config file says so
    (elsewhere / "exp.yaml").write_text("model: segformer-b0\ndata: small\n")
    code, err = _main(["train", "--config", "exp.yaml", "--out", "y"], capsys)
    one_error_line(err, "--data small (from --config exp.yaml; relative paths are read from the current "
                   "directory): dataset folder not found")
    assert not os.path.exists(elsewhere / "y")
