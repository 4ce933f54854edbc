"""The fault trial of docs/faults.md, case by case: each input once through the CLI, one line, no traceback."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import one_error_line
from test_train import bundle, cfg_for

from segkd.engine.state import load_resume
from segkd.engine.trainer import Trainer
from segkd.errors import SegkdError
from segkd.runlock import LOCK_FILE
from segkd.runs.train import run_train

torch.set_num_threads(1)
T = ["train", "--model", "segformer-b0", "--data", "synth", "--batch", "2", "--crop", "64x64", "--workers", "0",
     "--no-progress", "--device", "cpu"]
SHARED = Path(__file__).resolve().parents[2] / "shared"
CAMVID_R18 = SHARED / "checkpoints" / "camvid-deeplabv3-resnet18-torchvision.pth"
# `python KILL_HOOK SPEC segkd-args...` runs the CLI in a fresh process that SIGKILLs itself at SPEC: "rename:NAME:K"
# just before the K-th rename onto NAME (its temp file complete), "write:NAME:K" inside that write (temp cut midway),
# "step:N" right after the N-th optimiser step (see its docstring; benchmarks/kill_resume.py uses it too)
KILL_HOOK = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_hook.py"


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from segkd.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``segkd ARGS`` through the console-script entry point: (exit code, stderr)."""
    from segkd.cli import main

    old = sys.argv
    sys.argv = ["segkd", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = old
    return int(e.value.code or 0), capsys.readouterr().err


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


@pytest.fixture
def readonly(monkeypatch: pytest.MonkeyPatch):
    """``readonly(folder)``: every write below ``folder`` fails with EROFS, as on a read-only mount (the tests may
    run as root, whom a chmod does not stop)."""

    def make(root: Path) -> Path:
        root = root.resolve()

        def blocked(p: object) -> bool:
            try:
                return Path(os.fspath(p)).resolve().is_relative_to(root)  # type: ignore[arg-type]
            except TypeError:  # a file descriptor
                return False

        def erofs(p: object) -> OSError:
            return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))  # type: ignore[arg-type]

        real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

        def fake_open(file, mode="r", *a, **k):  # noqa: ANN001, ANN002, ANN003
            if any(c in mode for c in "wax+") and blocked(file):
                raise erofs(file)
            return real_open(file, mode, *a, **k)

        def fake_os_open(path, flags, *a, **k):  # noqa: ANN001, ANN002, ANN003
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and blocked(path):
                raise erofs(path)
            return real_os_open(path, flags, *a, **k)

        def fake_mkdir(path, *a, **k):  # noqa: ANN001, ANN002, ANN003
            if blocked(path):
                raise erofs(path)
            return real_mkdir(path, *a, **k)

        for mod in (builtins, io):
            monkeypatch.setattr(mod, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        return root

    return make


# ----------------------------------------------------------------------------------- 1. kill during checkpoint
def test_run_killed_during_its_first_checkpoint_restarts(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*T, "--iters", "2", "--val-every", "1", "--out", str(run)]
    proc = subprocess.run([sys.executable, str(KILL_HOOK), "rename:resume.pt:1", *args], env=_env(),
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (run / "last.safetensors").is_file() and not (run / "resume.pt").exists()
    assert len(list(run.glob(".resume.pt.*.tmp"))) == 1 and (run / LOCK_FILE).is_file()  # orphan + stale lock
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)

    res = _cli([*T, "--iters", "2", "--val-every", "1", "--out", run])  # the same command again: restarts
    assert res.exit_code == 0, res.output
    assert "starting it again from iteration 0" in res.stderr and "removed 1 temp file" in res.stderr
    res = _cli(["train", "--resume", copy, "--no-progress"])  # or --resume: restarts from its run.json
    assert res.exit_code == 0, res.output
    assert "restarting it from iteration 0 with the settings of its run.json" in res.stderr
    for d in (run, copy):
        assert load_resume(d)["iteration"] == 2
        assert not list(d.glob(".*.tmp")) and not (d / LOCK_FILE).exists()


def _check_run_files(run: Path) -> dict[str, int]:
    """Every file a killed run left must load (checkpoints through segkd's loader, resume.pt through load_resume,
    run.json and each metrics.jsonl line as JSON); returns the iteration each run file says it holds."""
    from segkd.models.loading import load_model

    seen: dict[str, int] = {}
    for path in sorted(run.iterdir()):
        if path.suffix == ".safetensors":
            seen[path.name] = load_model(path).segkd_meta.metrics["iteration"]
        elif path.name == "resume.pt":
            seen[path.name] = load_resume(path)["iteration"]
        elif path.name == "run.json":
            assert "summary" not in json.loads(path.read_text())  # killed: the run never finished
        elif path.name == "config.yaml":
            import yaml

            assert yaml.safe_load(path.read_text())["iters"] > 0  # the resolved options, written at the start
        elif path.name == "metrics.jsonl":
            recs = [json.loads(line) for line in path.read_text().splitlines()]
            seen[path.name] = max((r["iter"] for r in recs if r["type"] == "train"), default=0)
        else:  # the temp file of a killed write, or the lock no process holds any more
            assert path.name == LOCK_FILE or (path.name.startswith(".") and path.suffix == ".tmp"), path
    return seen


def test_distill_killed_mid_checkpoint_and_mid_training_resumes_bit_identical(
        tmp_path: Path, small_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import random

    from segkd.checkpoint import read_checkpoint

    machine = ["--workers", "0", "--no-progress", "--device", "cpu", "--threads", "1", "--log-every", "1"]
    kd = ["distill", "--method", "kd", "--student", "segformer-b0", "--teacher", "segformer-b0", "--teacher-weights",
          str(small_ckpt), "--data", "synth", "--batch", "2", "--crop", "64x64", "--iters", "4", "--val-every", "2",
          *machine]
    code, err = _main([*kd, "--out", tmp_path / "ref"], capsys)
    assert code == 0, err
    step = random.Random(13).randint(1, 3)  # a random iteration, the same on every run of the test
    for spec in ("write:last.safetensors:2", f"step:{step}"):
        run = tmp_path / spec.replace(":", "-")
        proc = subprocess.run([sys.executable, str(KILL_HOOK), spec, *kd, "--out", str(run)], env=_env(),
                              capture_output=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        seen = _check_run_files(run)
        temps = list(run.glob(".*.tmp"))
        if spec.startswith("write"):  # killed while writing iteration 4's checkpoint: iteration 2's is intact
            assert seen == {"best.safetensors": 2, "last.safetensors": 2, "resume.pt": 2, "metrics.jsonl": 4}, seen
            assert [t.name.split(".")[1] for t in temps] == ["last"] and temps[0].stat().st_size < (
                run / "last.safetensors").stat().st_size  # the torn half of the new one
        else:  # killed right after optimiser step `step`: its log line and checkpoint were never written
            assert seen.get("metrics.jsonl") == step - 1 and seen.get("resume.pt", 0) == 2 * ((step - 1) // 2), seen
            assert not temps
        code, err = _main(["distill", "--resume", run, *machine], capsys)
        assert code == 0, err
        assert not list(run.glob(".*.tmp")) and not (run / LOCK_FILE).exists()
        for name in ("last.safetensors", "best.safetensors"):
            ref, got = read_checkpoint(tmp_path / "ref" / name)[0], read_checkpoint(run / name)[0]
            assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), (spec, name)

        def losses(d: Path) -> list[tuple[int, float]]:
            recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            return [(r["iter"], r["loss"]) for r in recs if r["type"] == "train"]

        assert losses(run) == losses(tmp_path / "ref")


# -------------------------------------------------------------------------------------- 2. two runs, one --out
def test_second_run_on_a_locked_out_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "segkd", *T, "--iters", "3", "--val-every", "3", "--seed", "0",
                              "--out", str(run)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (run / LOCK_FILE).is_file() or not (run / LOCK_FILE).read_text():
            assert first.poll() is None and time.time() < deadline, "the first run never took its lock"
            time.sleep(0.05)
        res = _cli([*T, "--iters", "3", "--val-every", "3", "--seed", "1", "--out", run])
        assert isinstance(res.exception, SegkdError), res.output
        assert f"is in use by another segkd run (pid {first.pid}" in str(res.exception)
        assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    finally:
        if first.poll() is None:
            first.kill()
    assert json.loads((run / "run.json").read_text())["config"]["seed"] == 0  # the first run's files
    assert not (run / LOCK_FILE).exists()
    # a lock file left by a dead process (kill -9) holds no flock: the next run takes it over
    (run / LOCK_FILE).write_text("999999 elsewhere\n")
    res = _cli(["train", "--resume", run, "--no-progress"])
    assert "already finished" in str(res.exception)


# ---------------------------------------------------------------------------- 3. torchvision head, new classes
@pytest.mark.skipif(not CAMVID_R18.is_file(), reason="the shared CamVid checkpoint is not here (CI clone)")
def test_convert_torchvision_to_another_class_count(tmp_path: Path) -> None:
    out = tmp_path / "r18.safetensors"
    res = _cli(["convert", CAMVID_R18, "-m", "deeplabv3-resnet18", "--num-classes", "12", "-o", out, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["skipped"] == ["classifier.4.weight", "classifier.4.bias"] and report["placed"] == 162
    assert report["missing"] == ["classifier.4.weight", "classifier.4.bias"] and report["num_classes"] == 12


# ------------------------------------------------------------------------------------------ 4. nan / inf
def test_non_finite_numbers_are_usage_errors(tmp_path: Path, small_ckpt: Path) -> None:
    kd = ["distill", "--method", "kd", "--student", "segformer-b0", "--teacher", "segformer-b0", "--teacher-weights",
          str(small_ckpt)]
    for args, option in (([*T, "--lr", "nan"], "--lr"), ([*T, "--lr", "inf"], "--lr"),
                         ([*T, "--clip-grad", "-inf"], "--clip-grad"),
                         ([*kd, "--lr", "nan"], "--lr"),
                         (["bench", "segformer-b0", "--max-latency-ms", "nan"], "--max-latency-ms")):
        res = _cli([*args, "--out" if args[0] != "bench" else "--json-out", tmp_path / "x"])
        assert res.exit_code == 2, res.output
        assert (f"Invalid value for '{option}'" in res.output and "not a finite number" in res.output
                or f"{option} 'nan': must be a finite number" in res.output)  # bench gates: LIMIT[@MODEL] text
        assert len(res.output.strip().splitlines()) == 1
    res = _cli([*kd, "--method-opt", "temperature=nan", "--out", tmp_path / "x"])
    assert isinstance(res.exception, SegkdError)
    assert "kd option temperature must be a finite number, got 'nan'" in str(res.exception)
    with pytest.raises(SegkdError, match="--momentum must be a finite number"):  # the API checks it too
        run_train(cfg_for(tmp_path / "y", momentum=float("nan")), data=bundle())
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---------------------------------------------------------------------------------- 5. sizes below the stride
def test_sizes_below_the_model_stride_fail_before_any_work(tmp_path: Path, small_ckpt: Path) -> None:
    for crop in ("16x16", "1x1"):
        res = _cli([*T, "--crop", crop, "--iters", "1", "--out", tmp_path / "run"])
        assert isinstance(res.exception, SegkdError), res.output
        assert f"--crop {crop}: segformer-b0 needs at least 32x32" in str(res.exception)
        assert not (tmp_path / "run").exists()  # no run.json, no empty directory
    cases = ((["bench", "segformer-b0", "--input", "1x3x16x16"], "--input 16x16"),
             (["eval", small_ckpt, "--data", "synth", "--resize", "1x1"], "--resize 1x1"),
             (["eval", small_ckpt, "--data", "synth", "--mode", "slide", "--crop", "8x8"], "--crop 8x8"),
             (["models", "segformer-b0", "--size", "1x1"], "--size 1x1"),
             (["export", small_ckpt, "-o", tmp_path / "m.onnx", "--size", "16x16"], "--size 16x16"))
    for args, where in cases:
        res = _cli(args)
        assert isinstance(res.exception, SegkdError), res.output
        assert f"{where}: segformer-b0 needs at least 32x32" in str(res.exception)
    res = _cli(["models", "deeplabv3-resnet18", "--size", "8x8", "--json"])  # stride 8: 8x8 is its minimum
    assert res.exit_code == 0, res.output


# --------------------------------------------------------------------------------- 6. file vs directory
def test_a_file_where_a_directory_is_expected_and_the_reverse(tmp_path: Path, small_ckpt: Path) -> None:
    a_file, a_dir = tmp_path / "file.txt", tmp_path / "folder"
    a_file.write_text("x")
    a_dir.mkdir()
    cases = (([*T, "--iters", "1", "--out", a_file], "--out", "is a file, but a directory is expected"),
             ([*T, "--iters", "1", "--out", a_file / "run"], "--out", "file.txt is a file, not a directory"),
             (["distill", "--method", "kd", "--student", "segformer-b0", "--teacher", "segformer-b0",
               "--teacher-weights", small_ckpt, "--out", a_file], "--out", "is a file, but a directory is expected"),
             (["convert", small_ckpt, "-m", "segformer-b0", "-o", a_dir], "--out", "is a directory"),
             (["eval", small_ckpt, "--json-out", a_dir], "--json-out", "is a directory"),
             (["eval", small_ckpt, "--save-preds", a_file], "--save-preds", "is a file, but a directory"),
             (["bench", "segformer-b0", "--json-out", a_dir], "--json-out", "is a directory"),
             (["models", "segformer-b0", "--json-out", a_dir], "--json-out", "is a directory"),
             (["export", small_ckpt, "-o", a_dir], "--out", "is a directory"))
    for args, option, problem in cases:
        res = _cli(args)
        assert isinstance(res.exception, SegkdError), (args, res.output)
        assert str(res.exception).startswith(option) and problem in str(res.exception), str(res.exception)
    assert a_file.read_text() == "x" and not any(a_dir.iterdir())


# ------------------------------------------------------------------------------ 7. read-only and disk full
def test_read_only_destinations_are_one_line(tmp_path: Path, small_ckpt: Path, readonly,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from segkd.models import create_model

    ro = tmp_path / "ro"
    (ro / "old").mkdir(parents=True)
    (ro / "old" / "m.json").write_text("{}")
    foreign = tmp_path / "tv.pth"  # a torchvision-layout DeepLabV3 state dict, as `segkd convert` imports
    torch.save(create_model("deeplabv3-resnet18", num_classes=2).state_dict(), foreign)
    readonly(ro)
    cases = (([*T, "--iters", "1", "--out", ro / "run"], f"{ro / 'run'}: Read-only file system (EROFS)"),
             (["convert", foreign, "-m", "deeplabv3-resnet18", "-o", ro / "c.safetensors"],
              "c.safetensors: Read-only file system (EROFS)"),
             (["export", small_ckpt, "-o", ro / "m.onnx", "--size", "32x32", "--no-verify"],
              "m.onnx: Read-only file system (EROFS)"),
             (["eval", small_ckpt, "--data", "synth", "--resize", "32x32", "--json-out", ro / "old" / "m.json"],
              "m.json: Read-only file system (EROFS); the previous m.json is kept unchanged"),
             (["bench", "segformer-b0", "--input", "32x32", "--iters", "1", "--warmup", "0", "--no-flops",
               "--json-out", ro / "b.json"], "b.json: Read-only file system (EROFS)"),
             (["data", "synth", "-o", ro / "synth", "--train", "1", "--val", "1"],
              "Read-only file system (EROFS); the set in"))
    for args, needle in cases:
        code, err = _main(args, capsys)
        assert code == 1, err
        one_error_line(err, needle)
    assert not (ro / "run").exists() and (ro / "old" / "m.json").read_text() == "{}"


def test_disk_full_at_the_second_checkpoint_keeps_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    real, calls = os.replace, []

    def replace(src, dst, *a, **k):  # noqa: ANN001, ANN002, ANN003
        if Path(dst).name == "last.safetensors":
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), src)
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    code, err = _main([*T, "--iters", "4", "--val-every", "2", "--out", run], capsys)
    assert code == 1
    line = one_error_line(err, f"{run / 'last.safetensors'}: No space left on device (ENOSPC)",
                           "the previous last.safetensors is kept unchanged",
                           f"{run / 'resume.pt'} (iteration 2) is intact: continue with --resume {run}")
    assert ".tmp" not in line and not list(run.glob(".*.tmp")) and not (run / LOCK_FILE).exists()
    monkeypatch.setattr(os, "replace", real)
    code, err = _main(["train", "--resume", run, "--no-progress"], capsys)
    assert code == 0, err
    assert load_resume(run)["iteration"] == 4


# ------------------------------------------------------------------------------------------------- weak items
def test_log_window_after_resume_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    data = bundle()
    run_train(cfg_for(tmp_path / "ref", log_every=4), data=data)

    def crash(trainer: Trainer, it: int) -> None:
        if it == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(cfg_for(tmp_path / "crash", log_every=4), callbacks=[crash], data=data)
    assert load_resume(tmp_path / "crash")["iteration"] == 3  # mid-window: iterations 1-3 of the 1-4 window
    run_train(cfg_for(tmp_path / "crash", log_every=4), resume=tmp_path / "crash", data=data)

    def train_log(run: str) -> list[tuple[int, float]]:
        recs = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["iter"], r["loss"]) for r in recs if r["type"] == "train"]

    assert [it for it, _ in train_log("ref")] == [4, 6]
    assert train_log("crash") == train_log("ref")


def test_refused_pickles_say_what_was_refused(tmp_path: Path) -> None:
    import pickle

    from segkd.models import create_model

    module, raw = tmp_path / "module.pth", tmp_path / "raw.pth"
    torch.save(create_model("deeplabv3-resnet18", num_classes=2), module)
    raw.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    res = _cli(["convert", module, "-m", "deeplabv3-resnet18", "-o", tmp_path / "a.safetensors"])
    assert "pickles the Python object segkd.models.deeplab.DeepLabV3" in str(res.exception)
    assert str(res.exception).endswith("instead)")  # the whole sentence, not cut off
    res = _cli(["convert", raw, "-m", "deeplabv3-resnet18", "-o", tmp_path / "a.safetensors"])
    assert "not plain tensors" in str(res.exception) and "raw Python pickle" in str(res.exception)
    assert "UserWarning" not in res.output and "pickle protocol" not in res.output


def test_usage_errors_are_one_plain_line() -> None:
    for args, needle in ((["train", "--model", "segformer-b0", "--out"], "Option '--out' requires an argument"),
                         (["train", "--iters", "x"], "Invalid value for '--iters'"),
                         (["trian"], "No such command 'trian'"),
                         (["data", "synth", "--bogus"], "No such option: --bogus")):
        res = _cli(args)
        assert res.exit_code == 2
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output
        assert "--help'" in lines[0] and "╭" not in res.output
    res = _cli(["--version"])
    assert res.exit_code == 0 and res.output.startswith("segkd ")


# ------------------------------------------------------------------------------- issue 13: a malicious pickle
class _Payload:
    """Unpickling it calls ``Path(target).touch()``: code that runs by merely loading the file (no os.system)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.target,))


def _pickle_entry_points(d: Path) -> dict[str, tuple[list, Path]]:
    """Every way a pickle reaches segkd: ``segkd ARGS`` and the file it must name (``d/r18.safetensors``: a
    DeepLabV3 teacher for the c2vkd entry)."""
    evil, raw, hf, run, r18 = d / "evil.pth", d / "raw.pth", d / "hf", d / "run", d / "r18.safetensors"
    kd = ["--student", "segformer-b0", "--data", "synth", "--batch", "2", "--crop", "64x64", "--iters", "1",
          "--workers", "0", "--no-progress", "--device", "cpu", "--out", d / "out"]
    return {
        "convert": (["convert", evil, "-m", "segformer-b0", "-o", d / "c.safetensors"], evil),
        "convert-raw-pickle": (["convert", raw, "-m", "segformer-b0", "-o", d / "c.safetensors"], raw),
        "convert-hf-folder-bin": (["convert", hf, "-m", "segformer-b0", "-o", d / "c.safetensors"],
                                  hf / "pytorch_model.bin"),
        "distill-teacher-weights": (["distill", "--method", "kd", "--teacher", "segformer-b0", "--teacher-weights",
                                     evil, *kd], evil),
        "distill-c2vkd-pool-weights": (["distill", "--method", "c2vkd", "--teacher", "deeplabv3-resnet18",
                                        "--teacher-weights", r18, "--c2vkd-pool-weights", evil, *kd], evil),
        "eval": (["eval", evil, "--data", "synth", "--device", "cpu", "--no-progress"], evil),
        "train-resume": (["train", "--resume", run, "--no-progress", "--device", "cpu"], run / "resume.pt"),
        "distill-resume": (["distill", "--resume", run, "--no-progress", "--device", "cpu"], run / "resume.pt"),
        "train-pretrained-segformer": ([*T, "--pretrained", evil, "--iters", "1", "--out", d / "out"], evil),
        "train-pretrained-deeplab": ([*T[:2], "deeplabv3-resnet18", *T[3:], "--pretrained", evil, "--iters", "1",
                                      "--out", d / "out"], evil),
    }


@pytest.mark.parametrize("entry", ["convert", "convert-raw-pickle", "convert-hf-folder-bin", "distill-teacher-weights",
                                   "distill-c2vkd-pool-weights", "eval", "train-resume", "distill-resume",
                                   "train-pretrained-segformer", "train-pretrained-deeplab"])
def test_a_malicious_pickle_is_refused_unexecuted(entry: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import pickle

    from segkd.engine.state import STATE_VERSION

    sentinel = tmp_path / "sentinel"
    payload = {"weight": torch.zeros(2), "x": _Payload(sentinel)}
    torch.save(payload, tmp_path / "evil.pth")
    (tmp_path / "raw.pth").write_bytes(pickle.dumps({"x": _Payload(sentinel)}))
    (tmp_path / "hf").mkdir()
    torch.save(payload, tmp_path / "hf" / "pytorch_model.bin")
    (tmp_path / "run").mkdir()
    torch.save({"version": STATE_VERSION, "iteration": 1, "x": _Payload(sentinel)}, tmp_path / "run" / "resume.pt")
    if entry == "distill-c2vkd-pool-weights":
        from segkd.checkpoint import CheckpointMeta, save_checkpoint
        from segkd.models import create_model

        save_checkpoint(tmp_path / "r18.safetensors", create_model("deeplabv3-resnet18", num_classes=6),
                        CheckpointMeta(model="deeplabv3-resnet18", num_classes=6))
    args, named = _pickle_entry_points(tmp_path)[entry]
    code, err = _main(args, capsys)
    assert code == 1, err
    one_error_line(err, f"{named}: ", "refused" if entry != "eval" else "not a readable safetensors file")
    assert not sentinel.exists()
    # the payload is live: an unrestricted load of the same file runs it
    if named.name == "raw.pth":
        pickle.loads(named.read_bytes())
    else:
        torch.load(named, weights_only=False)
    assert sentinel.exists()
