"""Issue 14: what the CLI prints (plain lines, no wrapping when piped, a closed pipe), file modes and flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

TRAIN = ["train", "--model", "segformer-b0", "--data", "synth", "--crop", "32x32", "--batch", "2", "--workers", "0",
         "--device", "cpu", "--val-every", "100"]


def _env(**kw: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **kw}


def _segkd(*args: str, **kw: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segkd", *args], capture_output=True, text=True, env=_env(**kw),
                          timeout=300)


def test_no_progress_prints_plain_lines_and_a_closed_pipe_does_not_end_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # `segkd train ... 2>&1 | head -1`: the reader goes away after the first line
    p = subprocess.Popen([sys.executable, "-m", "segkd", *TRAIN, "--iters", "4", "--log-every", "1", "--no-progress",
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    assert p.stdout is not None
    first = p.stdout.readline().decode()
    p.stdout.close()
    assert p.wait(timeout=300) == 0
    assert first.startswith("iter 1/4"), first  # --no-progress: plain lines, not silence
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["iterations"] == 4 and (out / "last.safetensors").is_file()


def test_piped_output_is_never_wrapped_nor_cut(tmp_path: Path) -> None:
    from segkd.models import MODELS

    r = _segkd("models", "--no-flops", COLUMNS="80")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("│ ")]
    names = [line.split("│")[1].strip() for line in rows if line.split("│")[1].strip()]
    assert names == sorted(MODELS.names()) or set(names) == set(MODELS.names())
    assert "…" not in r.stdout
    # one table row per model: the taps column is not wrapped onto continuation lines when piped
    assert len(rows) == len(names)
    assert any(len(line) > 80 for line in r.stdout.splitlines())  # the 80-column guess of rich is not applied


def _report() -> dict:
    def model(name: str, params: int, p50: float) -> dict:
        lat = {"p50": p50, "p90": p50 * 1.1, "mean": p50, "std": 0.5}
        return {"name": name, "params": params, "params_m": params / 1e6, "notes": [],
                "complexity": [{"input": [1, 3, 512, 1024], "gmacs": 8.42}],
                "runs": [{"backend": b, "input": [1, 3, 512, 1024], "latency_ms": lat, "throughput_ips": 1000 / p50,
                          "peak_mem_mb": 1234.0, "cpu_util": 3.98, "contended": False,
                          "providers_used": ["CPUExecutionProvider"] if b == "onnxruntime" else None}
                         for b in ("torch", "onnxruntime")]}

    return {"environment": {"device": "cpu", "cpu_model": "AMD EPYC 7763 64-Core Processor", "threads": 4},
            "models": [model("deeplabv3-resnet101", 60_000_000, 1814.2), model("segformer-b0", 3_715_686, 123.4)],
            "gates": []}


def test_bench_tables_never_cut_cells_and_stay_narrow_when_piped() -> None:
    import io

    from rich.console import Console

    from segkd.bench.report import render

    for terminal in (True, False):
        buf = io.StringIO()
        render(_report(), Console(file=buf, width=80, force_terminal=terminal, color_system=None,
                                  soft_wrap=not terminal))
        text = buf.getvalue()
        assert "…" not in text
        for cell in ("deeplabv3-resnet101", "1814.2", "1814.2±0.5", "3.72", "1x3x512x1024", "onnxruntime", "14.70x"):
            assert cell in text, (terminal, cell)
        widths = [len(line.rstrip()) for line in text.splitlines() if not line.startswith("GMACs =")]
        assert max(widths) <= (110 if terminal else 130), (terminal, max(widths))


def test_train_flags_resume_warning_summary_name_and_file_modes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        r = _segkd(*TRAIN, "--iters", "2", "--threads", "1", "--log-every", "2", "--no-progress", "--out", str(out))
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert "model segformer-b0: best val mIoU" in r.stdout and "student" not in r.stdout
    assert [line for line in r.stderr.splitlines() if line.startswith("iter ")] == [
        line for line in r.stderr.splitlines() if line.startswith("iter 2/2")]
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["threads"] == 1 and run["config"]["log_every"] == 2
    for name in ("run.json", "last.safetensors", "best.safetensors", "resume.pt", "metrics.jsonl"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    # --resume with new run settings: one warning naming each ignored flag (machine options are taken)
    # (--iters is not ignored: it extends the schedule, tests/test_rundirs.py)
    r = _segkd("train", "--resume", str(out), "--warmup", "1", "--lr", "0.5", "--seed", "0", "--threads", "1",
               "--no-progress")
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, r.stderr
    assert "--warmup (the run has 0)" in warnings[0] and "--lr (the run has None)" in warnings[0]
    assert "--seed" not in warnings[0] and "--threads" not in warnings[0]  # same value / a machine option
    assert r.returncode == 1 and "already finished (2/2 iterations)" in r.stderr


def test_eval_names_the_dataset_and_takes_threads_and_log_every(tmp_path: Path) -> None:
    from segkd.checkpoint import CheckpointMeta, save_checkpoint
    from segkd.models import create_model

    ckpt = save_checkpoint(tmp_path / "m.safetensors", create_model("segformer-b0", num_classes=6),
                           CheckpointMeta(model="segformer-b0", num_classes=6))
    r = _segkd("eval", str(ckpt), "--resize", "32x32", "--threads", "1", "--log-every", "20", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "no --data given: scoring the built-in synthetic set (synth)" in r.stderr
    assert "segformer-b0 on synth (folder) val" in r.stdout
    assert [line.split()[1] for line in r.stderr.splitlines() if line.startswith("eval ")] == ["20/40", "40/40"]
    r = _segkd("eval", str(ckpt), "--data", "synth", "--resize", "32x32", "--json", "--device", "cpu")
    doc = json.loads(r.stdout)
    assert doc["data"] == "synth" and doc["data_format"] == "folder" and "note:" not in r.stderr


def test_distill_takes_the_teacher_model_from_a_segkd_checkpoint(tmp_path: Path) -> None:
    import torch

    from segkd.checkpoint import CheckpointMeta, save_checkpoint
    from segkd.models import create_model

    teacher = save_checkpoint(tmp_path / "t.safetensors", create_model("segformer-b0", num_classes=6),
                              CheckpointMeta(model="segformer-b0", num_classes=6))
    args = ["distill", "--method", "kd", "--student", "segformer-b0", "--data", "synth", "--crop", "32x32",
            "--batch", "2", "--workers", "0", "--device", "cpu", "--iters", "1", "--no-progress"]
    r = _segkd(*args, "--teacher-weights", str(teacher), "--out", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "d" / "run.json").read_text())["config"]["teacher"] == "segformer-b0"
    foreign = tmp_path / "t.pth"
    torch.save(create_model("segformer-b0", num_classes=6).state_dict(), foreign)
    r = _segkd(*args, "--teacher-weights", str(foreign), "--out", str(tmp_path / "f"))
    assert r.returncode == 1
    assert r.stderr.strip() == (f"error: kd needs --teacher NAME (--teacher-weights {foreign} is a foreign checkpoint "
                                "that does not name its model)")


def test_data_synth_refuses_an_existing_set_unless_force(tmp_path: Path) -> None:
    args = ["data", "synth", "--out", str(tmp_path / "d"), "--train", "1", "--val", "1", "--size", "32x32"]
    assert _segkd(*args).returncode == 0
    before = (tmp_path / "d" / "classes.json").stat().st_mtime_ns
    r = _segkd(*args, "--seed", "1")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {tmp_path / 'd'} already holds a synthetic set; pass --force to replace it or choose another --out")
    assert (tmp_path / "d" / "classes.json").stat().st_mtime_ns == before
    r = _segkd(*args, "--seed", "1", "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "d" / "classes.json").read_text())["seed"] == 1


def test_deploy_params_has_one_definition() -> None:
    from segkd.models import count_params, create_model, deploy_param_count, deploy_state

    model = create_model("deeplabv3-resnet18", num_classes=6, aux=True)
    n = deploy_param_count(model)
    buffers = sum(b.numel() for b in model.buffers())
    aux = sum(p.numel() for k, p in model.named_parameters() if k.startswith("aux_classifier."))
    assert aux > 0 and buffers > 0
    assert n == count_params(model) - aux  # what bench counts on the deploy model (no aux head)
    assert n == sum(v.numel() for v in deploy_state(model).values()) - sum(  # run.json used to count buffers too
        b.numel() for k, b in model.named_buffers() if not k.startswith("aux_classifier."))


def test_keep_drops_what_a_finished_run_does_not_need_and_says_the_sizes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _segkd(*TRAIN, "--iters", "2", "--keep", "best", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "best.safetensors", "config.yaml", "metrics.jsonl", "run.json"]
    size = (out / "best.safetensors").stat().st_size
    assert f"wrote {out / 'best.safetensors'} ({size / 1e6:.1f} MB), {out / 'metrics.jsonl'} (" in r.stdout
    for again in (["--out", str(out)], ["--resume", str(out)]):  # never restarted over its results
        r = _segkd(*(TRAIN if again[0] == "--out" else ["train"]), "--iters", "2", "--no-progress", *again)
        assert r.returncode == 1 and "holds a finished run (its resume state was not kept)" in r.stderr, r.stderr
    r = _segkd(*TRAIN, "--keep", "best,checkpoint", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--keep must be a comma-separated list of best, last, resume" in r.stderr


def test_run_json_eval_json_and_bench_share_one_provenance_block(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _segkd(*TRAIN, "--iters", "2", "--log-every", "1", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    r = _segkd("eval", str(out / "best.safetensors"), "--data", "synth", "--resize", "32x32", "--json",
               "--device", "cpu")
    ev = json.loads(r.stdout)
    r = _segkd("bench", "segformer-b0", "--input", "1x3x32x32", "--no-latency", "--json")
    bench = json.loads(r.stdout)
    for doc, command in ((run, "train"), (ev, "eval"), (bench, "bench")):
        assert doc["argv"][:2] == ["segkd", command]
        assert set(doc["environment"]) == set(bench["environment"])
        assert doc["environment"]["segkd"] == bench["environment"]["segkd"] and doc["created"][:4].isdigit()
    assert run["segkd_version"] == bench["environment"]["segkd"]
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(rec["time"][:4].isdigit() and rec["unix_time"] > 1e9 for rec in train)


def test_data_synth_takes_num_classes_like_every_other_command_and_keeps_classes(tmp_path: Path) -> None:
    for flag in ("--num-classes", "--classes"):
        out = tmp_path / flag.strip("-")
        r = _segkd("data", "synth", "--out", str(out), "--train", "1", "--val", "1", "--size", "32x32", flag, "3")
        assert r.returncode == 0, r.stderr
        assert len(json.loads((out / "classes.json").read_text())["classes"]) == 3


# ------------------------------------------------------------------- issue 13: identifying columns are never cut
CITYSCAPES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
              "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


def _models_case(console) -> list[str]:
    from segkd.models import MODELS
    from segkd.models.zoo_info import render_models

    taps = [{"name": f"c{i}", "kind": "cnn", "channels": 64 * 2 ** i, "stride": 4 * 2 ** min(i, 1)} for i in range(4)]
    rows = [{"name": n, "family": MODELS.get(n).family, "params_m": 58.63, "gmacs": 482.31, "output_stride": 8,
             "taps": taps} for n in MODELS.names()]
    render_models(rows, console, size="512x1024", num_classes=19)
    return [r["name"] for r in rows]


def _bench_case(console) -> list[str]:
    from segkd.bench.report import render

    report = _report()
    report["models"][0]["name"] = "deeplabv3-resnet101 (teacher/best.safetensors)"
    report["models"][0]["complexity"][0]["modules"] = [
        {"module": "DeepLabV3", "depth": 0, "gflops": 964.6}, {"module": "DeepLabV3.backbone", "depth": 1,
                                                               "gflops": 900.0}]
    report["train_step"] = [{
        "method": "transkd", "student": "deeplabv3plus-resnet101", "teacher": "deeplabv3plus-resnet50",
        "input": [2, 3, 512, 1024], "adapter_params": 1_234_567, "overhead_ratio": 1.23,
        "method_step": {"latency_ms": {"p50": 1234.5}, "peak_mem_mb": 4321.0, "cpu_util": 3.9, "contended": True},
        "lower_bound": {"latency_ms": {"p50": 1000.1}, "peak_mem_mb": 4000.0, "cpu_util": 3.8, "contended": False},
        "bound_definition": "teacher fwd (no grad) + student fwd + CE + bwd + AdamW step", "optimizer": "AdamW"}]
    render(report, console)
    return ["deeplabv3-resnet101 (teacher/best.safetensors)", "segformer-b0", "onnxruntime (CPU)", "1x3x512x1024",
            "transkd", "deeplabv3plus-resnet101", "deeplabv3plus-resnet50", "2x3x512x1024", "DeepLabV3",
            "  backbone"]


def _eval_case(console) -> list[str]:
    from dataclasses import asdict

    import torch

    from segkd.engine.evaluate import EvalResult, render_eval
    from segkd.engine.metrics import scores_from_confusion

    conf = torch.eye(len(CITYSCAPES), dtype=torch.int64) * 1000 + 3
    result = EvalResult(**asdict(scores_from_confusion(conf)), confusion=conf, n_images=500, class_names=CITYSCAPES,
                        extra={"model": "deeplabv3plus-resnet101", "data": "/data/cityscapes",
                               "data_format": "cityscapes", "split": "val"})
    render_eval(result, console)
    return CITYSCAPES


def _export_case(console) -> list[str]:
    from segkd.export.render import render_export_report

    cases = [{"case": name, "max_abs_diff": 1.234e-05, "mean_abs_diff": 2.5e-06, "label_agreement": 0.99998,
              "passed": True} for name in ("random 1x3x512x1024", "random 2x3x384x768", "data 1x3x512x1024 [0:1]")]
    report = {
        "model": "deeplabv3plus-resnet101", "out": "deploy/student.onnx", "bytes": 123_456_789, "seconds": 12.3,
        "export": {"input_shape": ["batch", 3, "height", "width"], "opset": 17, "output": "logits",
                   "input_name": "pixel_values", "input_range": "normalised RGB", "fp16": False},
        "graph": {"nodes": 456},
        "verification": {"cases": cases, "providers_requested": ["cpu"], "providers_used": ["CPUExecutionProvider"],
                         "atol": 1e-4, "min_agreement": 0.999},
        "tensorrt": {"table": {"tensorrt_version": "10.x", "repository": "onnx/onnx-tensorrt",
                               "path": "docs/operators.md", "commit": "0123456789abcdef"},
                     "ready": True, "op_counts": {"Conv": 100}, "unsupported": [], "issues": [],
                     "trtexec": "trtexec --onnx=deploy/student.onnx"},
    }
    render_export_report(report, console)
    return [c["case"] for c in cases]


def _inspect_case(console) -> list[str]:
    from segkd.data.report import render_inspect

    split = {"pairs": 2975, "sizes_hxw": {"1024x2048": 2975}, "ignore_share_pct": 11.2,
             "class_share_pct": {n: 100 / len(CITYSCAPES) for n in CITYSCAPES}}
    report = {"root": "/data/cityscapes", "format": "cityscapes", "num_classes": 19, "ignore_index": 255,
              "class_names": CITYSCAPES, "problems": [],
              "splits": {"train": split, "val": {**split, "pairs": 500}, "test": {**split, "pairs": 1525}}}
    render_inspect(report, console)
    return [*CITYSCAPES, "(ignore)"]


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
@pytest.mark.parametrize("width", [60, 80])
@pytest.mark.parametrize("case", [_models_case, _bench_case, _eval_case, _export_case, _inspect_case],
                         ids=["models", "bench", "eval", "export", "data-inspect"])
def test_no_table_cuts_or_wraps_its_identifying_column(case, width: int, terminal: bool) -> None:
    import io

    from rich.console import Console

    buf = io.StringIO()
    names = case(Console(file=buf, width=width, force_terminal=terminal, color_system=None, soft_wrap=not terminal))
    text = buf.getvalue()
    assert "…" not in text
    lines = text.splitlines()
    for name in names:  # each identifying cell whole on one line: not cut, folded nor wrapped
        assert any(name in line for line in lines), (name, text)


# ----------------------------------------------------------------------- issue 13: one --json / --json-out rule
@pytest.fixture(scope="module")
def json_commands(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Each command that prints a result, as a tiny invocation (without its JSON options)."""
    import torch

    from segkd.checkpoint import CheckpointMeta, save_checkpoint
    from segkd.data.synth import synthesize
    from segkd.models import create_model

    work = tmp_path_factory.mktemp("json")
    data = synthesize(work / "data", n_train=1, n_val=1, size=(32, 32), num_classes=3)
    ckpt = save_checkpoint(work / "b0.safetensors", create_model("segformer-b0", num_classes=3),
                           CheckpointMeta(model="segformer-b0", num_classes=3))
    foreign = work / "tv.pth"  # a torchvision-layout DeepLabV3 state dict, as `segkd convert` imports
    torch.save(create_model("deeplabv3-resnet18", num_classes=2).state_dict(), foreign)
    return {
        "models": ["models", "segformer-b0", "--no-flops"],
        "bench": ["bench", "segformer-b0", "--input", "32x32", "--no-latency"],
        "data inspect": ["data", "inspect", str(data)],
        "eval": ["eval", str(ckpt), "--data", str(data), "--device", "cpu", "--no-progress"],
        "export": ["export", str(ckpt), "-o", str(work / "b0.onnx"), "--size", "32x32", "--no-verify"],
        "convert": ["convert", str(foreign), "-m", "deeplabv3-resnet18", "-o", str(work / "r18.safetensors")],
    }


@pytest.mark.parametrize("command", ["models", "bench", "data inspect", "eval", "export", "convert"])
def test_every_command_follows_one_json_convention(monkeypatch, capsys, json_commands, command: str,
                                                   tmp_path: Path) -> None:
    args = json_commands[command]
    code, stdout, err = run_cli(monkeypatch, capsys, *args, "--json")  # `segkd X --json | jq`
    assert code == 0, err
    doc = json.loads(stdout)  # stdout is exactly one JSON document
    assert not any(box in stdout + err for box in "│┃─━"), err  # and no table went anywhere
    path = tmp_path / "result.json"
    code, stdout, err = run_cli(monkeypatch, capsys, *args, "--json-out", str(path))
    assert code == 0, err
    assert stdout.rstrip().splitlines()[-1] == f"wrote {path}"  # the human output stays, then the file it wrote
    with pytest.raises(json.JSONDecodeError):
        json.loads(stdout)
    saved = json.loads(path.read_text())
    assert type(saved) is type(doc)
    assert (saved.keys() if isinstance(doc, dict) else [r["name"] for r in saved]) == (
        doc.keys() if isinstance(doc, dict) else [r["name"] for r in doc])


def test_the_cli_starts_without_torch() -> None:
    # train/distill/eval/export/bench generate their options from config modules that import torch: they are built
    # only when run, so `segkd --version`, `--help` and usage errors of the light commands stay fast
    code = "import sys, segkd.cli; segkd.cli.app(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False" and "distill" in r.stdout
