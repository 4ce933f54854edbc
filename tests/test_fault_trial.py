"""Issue 23's fault and new-user trial, items 5-18 (docs/faults.md): each case once through the CLI, one line naming
the option or file, the exit code of its kind (2 bad option value, 1 bad input file), no traceback."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_error_line, run_cli

torch.set_num_threads(1)
T = ["train", "--model", "segformer-b0", "--data", "synth", "--batch", "2", "--crop", "64x64", "--workers", "0",
     "--no-progress", "--device", "cpu"]
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _segkd(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segkd", *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _bilevel_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of ``width x height`` written row by row (a 12000x12000 one is 18 KB and never sits in
    memory whole): what a decompression bomb looks like to a dataset reader."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row, z = b"\0" + bytes((width + 7) // 8), zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------- 5. memory and resource bombs
@pytest.mark.parametrize("args, needle", [
    ([*T, "--workers", "100000"], "--workers must be between 0 and"),
    (["eval", "x.safetensors", "--resize", "100000x100000"], "--resize '100000x100000': 10,000,000,000 pixels"),
    (["bench", "segformer-b0", "--input", "1x3x100000x100000"], "--input '1x3x100000x100000': 10,000,000,000"),
    (["bench", "segformer-b0", "--batch", "100000", "--input", "512x512"], "pixels per batch"),
    (["export", "x.safetensors", "-o", "x.onnx", "--size", "100000x100000"], "--size '100000x100000'"),
    (["eval", "x.safetensors", "--workers", "100000"], "--workers must be between 0 and"),
])
def test_absurd_sizes_and_workers_are_refused_before_any_allocation(args: list[str], needle: str, monkeypatch,
                                                                     capsys, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    one_error_line(err, needle)
    assert not any(tmp_path.iterdir())  # nothing written, not even a run folder


def test_synth_of_an_absurd_size_leaves_no_folder(monkeypatch, capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "data", "synth", "--size", "100000x100000", "--out",
                           str(tmp_path / "big"))
    assert code == 2
    one_error_line(err, "--size '100000x100000'", "above segkd's limit of 67,108,864")
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize("side", [9000, 12000])  # between PIL's warning and its error; above both
def test_a_pixel_bomb_png_is_named_without_decoding(side: int, monkeypatch, capsys, tmp_path: Path) -> None:
    root = tmp_path / "bomb"
    _bilevel_png(root / "images" / "train" / "a.png", side, side)
    _bilevel_png(root / "labels" / "train" / "a.png", side, side)
    code, out, err = run_cli(monkeypatch, capsys, "data", "inspect", str(root), "--num-classes", "2")
    assert code == 1 and "DecompressionBomb" not in out + err
    one_error_line(err, f"images/train/a.png: image of {side * side:,} pixels, above segkd's limit of 67,108,864")


def test_pil_limit_is_segkds() -> None:
    from PIL import Image

    import segkd.data.datasets  # noqa: F401  (sets the limit)
    from segkd.shapes import MAX_PIXELS

    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS == 8192 * 8192


# ---------------------------------------------------------------------------------------- 7. huge seeds
@pytest.mark.parametrize("seed", ["99999999999999999999999", "-99999999999999999999999"])
def test_a_seed_beyond_64_bits_is_a_usage_error(seed: str, monkeypatch, capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(monkeypatch, capsys, *T, "--seed", seed, "--out", str(tmp_path / "r"))
    assert code == 2
    one_error_line(err, "--seed must be a signed 64-bit integer", seed)
    assert not (tmp_path / "r").exists()


def test_the_largest_seed_runs(tmp_path: Path) -> None:
    from segkd.engine.config import SEED_RANGE, TrainConfig
    from segkd.runs.train import run_train

    cfg = TrainConfig(model="segformer-b0", data="synth", batch=2, crop="64x64", workers=0, device="cpu",
                      progress=False, iters=1, val_every=1, seed=SEED_RANGE[1], out=str(tmp_path / "r"))
    assert run_train(cfg)["iterations"] == 1


# ------------------------------------------------------------------------------- 10. inspect and classes.txt
def _small_set(root: Path) -> Path:
    from segkd.data import synthesize

    return synthesize(root, n_train=2, n_val=2, size=(32, 32), num_classes=3, seed=0)


def test_inspect_reports_an_empty_val_split(monkeypatch, capsys, tmp_path: Path) -> None:
    root = _small_set(tmp_path / "s")
    for sub in ("images", "labels"):
        for f in (root / sub / "val").iterdir():
            f.unlink()
    code, _, err = run_cli(monkeypatch, capsys, "data", "inspect", str(root))
    assert code == 1
    one_error_line(err, "split 'val' has no images")


@pytest.mark.parametrize("text, needle", [
    ("a\nb\n\nc\n", "classes.txt: line 3 is blank"),
    ("a\nb\na\n", "classes.txt: class name 'a' is given twice (ids 0 and 2)"),
])
def test_classes_txt_blank_lines_and_duplicates_are_refused(text: str, needle: str, monkeypatch, capsys,
                                                            tmp_path: Path) -> None:
    root = _small_set(tmp_path / "s")
    (root / "classes.json").unlink()
    (root / "classes.txt").write_text(text)
    code, _, err = run_cli(monkeypatch, capsys, "data", "inspect", str(root))
    assert code == 1
    one_error_line(err, needle)


def test_classes_txt_trailing_blank_lines_are_fine(tmp_path: Path) -> None:
    from segkd.data import inspect_dataset

    root = _small_set(tmp_path / "s")
    (root / "classes.json").unlink()
    (root / "classes.txt").write_text("bg\n one \ntwo\n\n\n")
    report = inspect_dataset(root)
    assert report["class_names"] == ["bg", "one", "two"] and not report["problems"]


# ------------------------------------------------------------------------------- 11. bad values exit 2
@pytest.mark.parametrize("args, needle", [
    ([*T, "--device", "gpu"], "--device must be auto, cpu or cuda[:N], got 'gpu'"),
    ([*T, "--crop", "60by80"], "--crop '60by80': expected HxW"),
    ([*T, "--model", "segformer-b9"], "unknown model 'segformer-b9'"),
    (["distill", "--method", "c2vk", "--student", "segformer-b0"], "unknown method 'c2vk'; did you mean c2vkd"),
    (["eval", "x.safetensors", "--device", "gpu"], "--device must be auto"),
    (["bench", "segformer-b0", "--device", "gpu"], "--device must be auto"),
    (["export", "x.safetensors", "-o", "x.onnx", "--output", "logitz"], "--output 'logitz'"),
    (["data", "synth", "--out", "s", "--num-classes", "40"], "--num-classes must be 2..11"),
])
def test_bad_option_values_are_usage_errors(args: list[str], needle: str, monkeypatch, capsys,
                                            tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    line = one_error_line(err, needle)
    assert line.endswith("--help'")
    assert not any(tmp_path.iterdir())


def test_a_bad_input_file_stays_exit_1(monkeypatch, capsys, tmp_path: Path) -> None:
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not safetensors")
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(bad))
    assert code == 1
    one_error_line(err, str(bad))


# ------------------------------------------------------------------------------- 6. crafted checkpoint metadata
def _crafted(small_ckpt: Path, name: str, tensors: dict | None = None, **changes: object) -> Path:
    """``small_ckpt`` rewritten with its metadata changed (and its tensors replaced by ``tensors``)."""
    import json

    from safetensors.torch import save

    from segkd.checkpoint import read_safetensors

    state, raw = read_safetensors(small_ckpt)
    meta = {**json.loads(raw["segkd"]), **changes}
    out = small_ckpt.with_name(name)
    out.write_bytes(save(tensors or state, metadata={"segkd": json.dumps(meta)}))
    return out


@pytest.mark.parametrize("changes, needle", [
    ({"num_classes": "six"}, 'metadata num_classes must be an integer from 1 to 65536, got "six"'),
    ({"num_classes": -1}, "metadata num_classes must be an integer from 1 to 65536, got -1"),
    ({"model_kwargs": {"evil": 1}}, "segformer-b0 takes no option 'evil' (it takes: drop_path_rate, ln_eps)"),
    ({"model_kwargs": {"ln_eps": "tiny"}}, "option ln_eps='tiny' is not of the kind of its default"),
    ({"palette": [[1, 2]]}, "metadata palette must be a list of [r, g, b] (0..255), got [[1, 2]]"),
    ({"palette": [[1, 2, 3]]}, "metadata palette has 1 colours for 6 classes"),
    ({"std": [0, 1, 1]}, "metadata std must be 3 positive numbers"),
    ({"model": "segformer-b9"}, "metadata names the model 'segformer-b9'"),
    ({"format_version": 99}, "written in checkpoint format 99"),
])
def test_crafted_metadata_is_one_line_naming_the_file(changes: dict, needle: str, small_ckpt: Path, monkeypatch,
                                                      capsys, tmp_path: Path) -> None:
    bad = _crafted(small_ckpt, "bad.safetensors", **changes)
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(bad), "--data", "synth", "--device", "cpu",
                           "--no-progress", "--save-preds", str(tmp_path / "preds"))
    assert code == 1
    assert one_error_line(err, needle).startswith(f"error: {bad}: ")
    assert not (tmp_path / "preds").exists() or not any((tmp_path / "preds").iterdir())  # refused before any work


def test_unknown_metadata_keys_of_this_format_are_ignored(small_ckpt: Path) -> None:
    from segkd.models.loading import load_model

    ok = _crafted(small_ckpt, "newer.safetensors", trained_size=[64, 64])
    assert load_model(ok).num_classes == 6


def test_a_tensor_relabelled_to_another_dtype_is_refused(small_ckpt: Path, monkeypatch, capsys) -> None:
    from segkd.checkpoint import read_safetensors

    state, _ = read_safetensors(small_ckpt)
    key = "decode_head.classifier.weight"
    relabelled = {**state, key: state[key].view(torch.int32)}  # same bytes, same shape, another dtype
    bad = _crafted(small_ckpt, "i32.safetensors", tensors=relabelled)
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(bad), "--data", "synth", "--device", "cpu")
    assert code == 1
    one_error_line(err, f"{bad}: tensor '{key}' is int32 but the model's parameter is float32")


# ------------------------------------------------------------------------------- 9. what a pickle refusal refused
class _SystemCall:
    """The common payload: unpickling calls ``os.system`` (here a harmless ``true``; never run by segkd)."""

    def __reduce__(self) -> tuple:
        return (os.system, ("true",))


def test_the_os_system_payload_refusal_names_the_global(monkeypatch, capsys, tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _SystemCall()}, evil)
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(evil), "-m", "deeplabv3-resnet18", "-o",
                           str(tmp_path / "c.safetensors"))
    assert code == 1
    line = one_error_line(err, f"{evil}: cannot be read", f"pickles the Python object {os.system.__module__}.system")
    assert "In PyTorch 2.6" not in line and line.endswith("instead)")


def test_refusals_torch_words_otherwise_are_kept_whole() -> None:
    from segkd.checkpoint import load_refusal

    generic = ("Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument "
               "in `torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` "
               "will likely succeed, but it can result in arbitrary code execution. Do it only if you got the file "
               "from a trusted source.\n\nSome new reason torch gives in a later version, which is long enough to "
               "have been cut at 160 characters before: it must reach the user whole.\n\nCheck the documentation of "
               "torch.load to learn more about types accepted by default with weights_only https://pytorch.org/.")
    assert load_refusal(RuntimeError(generic)) == ("Some new reason torch gives in a later version, which is long "
                                                   "enough to have been cut at 160 characters before: it must reach "
                                                   "the user whole.")
    assert load_refusal(RuntimeError("")) == "RuntimeError"


# ------------------------------------------------------------------------------- 8. leftovers after kill -9
KILL_HOOK = ROOT / "benchmarks" / "kill_hook.py"


def _killed(spec: str, *args: object) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(KILL_HOOK), spec, *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    return proc


def test_an_export_killed_before_its_rename_is_cleaned_by_the_next(small_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    args = ["export", small_ckpt, "-o", out, "--size", "64x64", "--no-progress"]
    _killed("rename:m.onnx:1", *args)
    orphans = list(tmp_path.glob(".m.onnx.*.tmp"))
    assert len(orphans) == 1 and orphans[0].stat().st_size > 1e6 and not out.exists()
    r = _segkd(*args)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and not list(tmp_path.glob(".*.tmp"))


def test_scratch_folders_of_killed_processes_are_swept(tmp_path: Path) -> None:
    """``export --int8`` verifies its fp32 graph (and ORT quantises) in a scratch folder of the system temp dir;
    a kill -9 left it for good. The next segkd scratch folder removes those whose process is gone, not others."""
    script = ("import os, signal\nfrom segkd.safeio import segkd_tempdir\nwith segkd_tempdir('export') as t:\n"
              "    (t / 'fp32.onnx').write_bytes(b'x' * 1000)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**_env(), "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9
    (dead,) = tmp_path.glob("segkd-export-*")
    live = tmp_path / f"segkd-export-{os.getpid()}-keep"  # a live process's folder (this one)
    live.mkdir()
    script = ("from segkd.safeio import segkd_tempdir\nwith segkd_tempdir('int8') as t:\n    print(t)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not dead.exists() and live.is_dir()
    assert not Path(proc.stdout.strip()).exists()  # its own folder went on exit


def _write_report_script(out: Path, version: str, spec: str) -> str:
    return (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
            f"from kill_hook import plant\nplant({spec!r})\n"
            "from segkd.report.build import Figure, Report\nfrom segkd.report.render import write_report\n"
            f"figs = [Figure('{version}_a', 'a', b'png-{version}')]\n"
            f"write_report(Report('{version}', 'now', [], figs, []), {str(out)!r})\n")


def test_a_report_killed_while_written_leaves_the_earlier_one_whole(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    for version, spec in (("old", "none"), ("new", "rename:r.md:1")):  # killed while staging the new markdown
        proc = subprocess.run([sys.executable, "-c", _write_report_script(out, version, spec)], env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == (0 if spec == "none" else -9), proc.stderr
    assert "old" in out.read_text() and "old" in out.with_suffix(".md").read_text()
    assert [p.name for p in (tmp_path / "r_figures").iterdir()] == ["old_a.png"]  # page, markdown, figures agree
    assert len(list(tmp_path.glob(".r.html.*.tmp"))) == 1  # the staged report the kill left
    proc = subprocess.run([sys.executable, "-c", _write_report_script(out, "third", "none")], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "third" in out.read_text() and "third" in out.with_suffix(".md").read_text()
    assert [p.name for p in (tmp_path / "r_figures").iterdir()] == ["third_a.png"]  # no stale figure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.md", "r_figures"]  # no temp left


# ------------------------------------------------------------------------------- 12. the TensorRT profile
@pytest.mark.parametrize("size, opt_max", [("60x80", (64, 96)), ("97x131", (128, 160)), ("64x96", (64, 96))])
def test_the_trt_profile_holds_the_verified_size(size: str, opt_max: tuple[int, int]) -> None:
    from segkd.export.onnx_export import ExportConfig, plan_shapes

    plan = plan_shapes(ExportConfig(size=size), 32, "segformer-b0")
    h, w = map(int, size.split("x"))
    lo, opt, hi = plan.profile["min"], plan.profile["opt"], plan.profile["max"]
    assert hi == (4, 3, *opt_max) and opt == (1, 3, *opt_max)
    assert lo[2] <= h <= hi[2] and lo[3] <= w <= hi[3] and all(v % 32 == 0 for v in (*lo[2:], *hi[2:]))


def test_static_suggestion_rounds_up_and_a_profile_missing_the_size_is_refused(monkeypatch, capsys,
                                                                             small_ckpt: Path) -> None:
    from segkd.errors import SegkdError
    from segkd.export.onnx_export import ExportConfig, plan_shapes

    with pytest.raises(SegkdError, match="holding it: 1x3x64x96$"):
        plan_shapes(ExportConfig(static="1x3x60x80"), 32, "segformer-b0")
    with pytest.raises(SegkdError, match="does not hold the verified size 60x80"):
        plan_shapes(ExportConfig(size="60x80", trt_max="4x3x64x64"), 32, "segformer-b0")


def test_the_printed_trtexec_line_holds_the_size(small_ckpt: Path, monkeypatch, capsys, tmp_path: Path) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "export", str(small_ckpt), "-o", str(tmp_path / "m.onnx"),
                             "--size", "60x80", "--no-progress")
    assert code == 0, err
    assert "--maxShapes=image:4x3x64x96" in out and "--optShapes=image:1x3x64x96" in out, out


# ------------------------------------------------------------------------------- 13. the readiness verdict
def test_the_readiness_verdict_never_says_less_than_its_issues() -> None:
    import onnx
    from onnx import TensorProto, helper

    from segkd.export.tensorrt import check_graph, readiness_verdict

    assert readiness_verdict(0, 0) == "ready" and readiness_verdict(0, 20) == "ready with 20 warnings"
    assert readiness_verdict(2, 1) == "NOT ready (2 errors, 1 warning)"
    bias = helper.make_tensor("b", TensorProto.INT32, [4], [1, 2, 3, 4])  # ORT's default bias form
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["b", "s"], ["bf"], name="bias_dq"),
                               helper.make_node("Add", ["x", "bf"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[bias, scale])
    report = check_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert report["ready"] and report["verdict"] == "ready with 1 warning"
    assert onnx.TensorProto.INT32 == 6 and "INT32" in report["issues"][0]["message"]


# ------------------------------------------------------------------------------- 14. gates naming their models
def _bench_report() -> dict:
    """A two-model report (zoo names only: nothing is built) shaped as bench writes it."""
    def model(name: str, params: int, p50: float, backend: str) -> dict:
        return {"name": name, "arg": name, "path": None, "params": params, "params_m": params / 1e6,
                "complexity": [{"input": [1, 3, 64, 64], "gmacs": params / 1e6, "gflops": 2 * params / 1e6}],
                "runs": [{"backend": backend, "input": [1, 3, 64, 64], "latency_ms": {"p50": p50, "p90": p50,
                          "mean": p50, "std": 0.0}, "throughput_ips": 1000 / p50, "peak_mem_mb": 1.0,
                          "cpu_util": 1.0, "contended": False, "providers_used": []}], "notes": []}

    return {"models": [model("teacher", 40_000_000, 300.0, "torch"), model("student", 3_700_000, 30.0, "torch"),
                       model("student.onnx", 3_700_000, 20.0, "onnxruntime")],
            "environment": {"device": "cpu", "cpu_model": "x", "threads": 1}}


def test_a_gate_can_name_the_models_it_applies_to() -> None:
    from segkd.bench.gates import apply_gates, parse_gates

    every = parse_gates("100", None, "4M", None, "10%")
    apply_gates(report := _bench_report(), every)
    assert report["passed"] is False and {g["model"] for g in report["gates"] if not g["passed"]} == {"teacher"}
    for selector in ("student,student.onnx", "2,3"):
        scoped = parse_gates(f"100@{selector}", None, f"4M@{selector}", None, "10%")
        scoped.check_scope(["teacher", "student", "student.onnx"])
        apply_gates(report := _bench_report(), scoped)
        assert report["passed"] is True and {g["model"] for g in report["gates"]} == {"student", "student.onnx"}


@pytest.mark.parametrize("args, needle", [
    (["--max-params", "4M@nosuch"], "--max-params ...@nosuch: 'nosuch' is none of the MODELs (segformer-b0, "
                                    "deeplabv3-resnet18) nor a position 1..2"),
    (["--max-latency-ms", "40@"], "--max-latency-ms '40@': name the models after '@'"),
    (["--max-latency-ms", "forty@2"], "--max-latency-ms 'forty': expected a number"),
    (["--max-regression", "10%@3"], "'3' is none of the MODELs"),
])
def test_bad_gate_scopes_are_usage_errors(args: list[str], needle: str, monkeypatch, capsys) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "bench", "segformer-b0", "deeplabv3-resnet18", "--input", "64x64",
                           *args)
    assert code == 2
    one_error_line(err, needle)


def test_a_blank_speed_up_cell_says_why() -> None:
    from rich.console import Console

    from segkd.bench.report import NO_PEER, render, rows

    report = _bench_report()
    assert [r["vs_speed"] for r in rows(report)] == ["ref", "10.00x", NO_PEER]
    console = Console(record=True, width=250)
    render(report, console)
    text = console.export_text()
    assert f"{NO_PEER}: the 1st model has no run with this backend and input" in text


# ------------------------------------------------------------------------------- 15. --help in 80 columns
def _help(monkeypatch, capsys, *command: str) -> str:
    from segkd.cli import main

    monkeypatch.setattr(sys, "argv", ["segkd", *command, "--help"])
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [("train",), ("distill",), ("eval",), ("export",), ("bench",), ("convert",),
                                     ("data", "synth"), ("data", "inspect"), ("report",), ("models",)])
def test_help_in_80_columns_cuts_nothing(command: tuple[str, ...], monkeypatch, capsys) -> None:
    from typer.main import get_command

    from segkd.cli import _SegkdGroup, app  # noqa: F401  (the commands as run)

    text = _help(monkeypatch, capsys, *command)
    assert "…" not in text and "<bool>" not in text and "╭" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    group = get_command(app)
    ctx = group.make_context("segkd", [*command, "--help"], resilient_parsing=True)
    cmd = group
    for name in command:  # the real command (the generated ones are built when resolved)
        _, cmd, _ = cmd.resolve_command(ctx, [name])
    for param in cmd.params:
        for flag in [*param.opts, *param.secondary_opts]:
            assert flag in text, (flag, text)  # every flag whole


def test_distill_help_leads_with_the_method_and_the_teacher(monkeypatch, capsys) -> None:
    text = _help(monkeypatch, capsys, "distill")
    flags = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert flags[:4] == ["--method", "--teacher", "--teacher-weights", "--student"]
    method = text[text.index("--method"):text.index("--teacher")]
    assert "[required" in " ".join(method.split())
    assert "--flip / --no-flip" in text and "--peer-head-lr-mult" in text and "--c2vkd-pool-weights" in text


# ------------------------------------------------------------------------------- 17. the report page
class _FakeRun:
    """What the loss figure reads of a run: its name, deploy models and train records."""

    def __init__(self, name: str, train: list[dict]) -> None:
        self.name, self.models, self.train = name, ["student"], train

    def label(self, role: str) -> str:
        return self.name


def test_loss_figure_scales_says_what_is_missing_and_keeps_legends_off_the_data(monkeypatch) -> None:
    from segkd.report import figures

    monkeypatch.setattr(figures, "to_png", lambda fig: fig)  # inspect the figure instead of its pixels
    kd = _FakeRun("kd", [{"iter": i, "loss": 10.0 / i, "raw_ce": 1.0 / i} for i in (1, 2, 4)])
    c2vkd = _FakeRun("c2vkd", [{"iter": i, "loss": 900.0 / i} for i in (1, 2, 4)])  # no CE term at all
    fig = figures.loss_figure([kd, c2vkd], {})
    total, parts = fig.axes
    firsts = [line.get_ydata()[0] for line in total.get_lines()]
    assert firsts == [1.0, 1.0] and "relative" in total.get_title()  # 10 and 900 no longer share one scale
    assert "not shown (no cross-entropy logged): c2vkd" in [t.get_text() for t in parts.texts]
    assert total.get_legend() is not None and parts.get_legend() is not None
    for ax in (total, parts):
        assert ax.get_legend().get_bbox_to_anchor().x0 >= ax.get_window_extent().x1  # right of the plotting area


def test_overlay_colours_tell_road_pavement_and_car_apart() -> None:
    from segkd.data.classes import CAMVID_CLASSES, CAMVID_PALETTE
    from segkd.report.figures import MIN_DELTA_E, _lab, overlay_palette

    palette, changed = overlay_palette(CAMVID_PALETTE, range(len(CAMVID_CLASSES)))
    lab = _lab(palette)
    dist = np.linalg.norm(lab[:, None] - lab[None], axis=2) + np.eye(len(palette)) * 1e9
    assert dist.min() >= MIN_DELTA_E  # every pair of classes shown, Road/Pavement/Car included
    road, pavement, car = (CAMVID_CLASSES.index(n) for n in ("Road", "Pavement", "Car"))
    assert palette[road] == CAMVID_PALETTE[road] and CAMVID_CLASSES[car] in [CAMVID_CLASSES[i] for i in changed]
    assert all(palette[i] == CAMVID_PALETTE[i] for i in range(len(palette)) if i not in changed)
    assert overlay_palette(CAMVID_PALETTE, [road, car])[1] == [car]  # CIE76 38.5 apart in the dataset palette
    assert overlay_palette(CAMVID_PALETTE, [road, pavement])[1] == []  # far enough: the dataset's colours stay


def test_a_contended_latency_is_marked_on_the_report(tmp_path: Path) -> None:
    from segkd.report.build import cost_table
    from segkd.report.measure import Entry

    calm = Entry("kd", "student", "segformer-b0", None, None, (64, 64), latency_ms=20.0, cpu_util=1.0,
                 contended=False)
    busy = Entry("dkd", "student", "segformer-b0", None, None, (64, 64), latency_ms=600.0, cpu_util=0.31,
                 contended=True)
    table = cost_table([calm, busy], latency=True)
    assert table.rows[0][-2:] == ["20.0", "1.00"] and table.rows[1][-2:] == ["600.0", "0.31 contended"]
    assert "contended = the process got less than 0.9 x its threads" in table.note


# ------------------------------------------------------------------------------- 18. convert and small frictions
def test_convert_detects_the_model_and_names_a_wrong_depth(monkeypatch, capsys, tmp_path: Path) -> None:
    from test_convert import _nvlabs_state

    from segkd.checkpoint import read_meta
    from segkd.models import create_model
    from segkd.models.convert import detect_model

    torch.manual_seed(0)
    tv = create_model("deeplabv3-resnet18", num_classes=5).state_dict()  # segkd's DeepLab keys are torchvision's
    torch.save({k: v for k, v in tv.items() if not k.startswith("aux_")}, tmp_path / "r18.pth")
    code, out, err = run_cli(monkeypatch, capsys, "convert", str(tmp_path / "r18.pth"), "-o",
                             str(tmp_path / "a.safetensors"))
    assert code == 0, err
    assert "deeplabv3-resnet18 (detected from its keys and shapes) (5 classes)" in out
    assert read_meta(tmp_path / "a.safetensors").model == "deeplabv3-resnet18"
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(tmp_path / "r18.pth"), "-m", "deeplabv3-resnet50",
                           "-o", str(tmp_path / "b.safetensors"))
    assert code == 1 and not (tmp_path / "b.safetensors").exists()
    one_error_line(err, "r18.pth: not a deeplabv3-resnet50 checkpoint:", "tensors differ in shape (first "
                   "backbone.layer1.0.conv1.weight: (64, 64, 3, 3) here, (64, 64, 1, 1) in deeplabv3-resnet50)",
                   "it holds a deeplabv3-resnet18")
    for variant in ("b0", "b2"):  # a MiT variant from its width and blocks per stage (NVlabs keys)
        state = _nvlabs_state(create_model(f"segformer-{variant}", num_classes=3))
        assert detect_model(state, "x.pth") == f"segformer-{variant}"


def test_convert_of_an_unknown_layout_asks_for_the_model(monkeypatch, capsys, tmp_path: Path) -> None:
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pth")
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(tmp_path / "other.pth"), "-o",
                           str(tmp_path / "o.safetensors"))
    assert code == 1
    one_error_line(err, "other.pth: cannot tell the model from its keys", "pass --model")


def test_small_sizes_read_as_people_write_them() -> None:
    from segkd.textout import human_size

    assert [human_size(n) for n in (0, 812, 12_345, 7_400_000, 2.5e9)] == ["0 B", "812 B", "12.3 kB", "7.4 MB",
                                                                          "2.5 GB"]


def test_shapes_are_not_coloured_by_guess() -> None:
    import io

    from rich.console import Console

    from segkd.textout import make_console

    console = make_console()
    assert isinstance(console, Console) and console.highlighter is not None
    buffer = io.StringIO()
    console.file, console._force_terminal = buffer, True
    console.print("input image 1x3x60x80 (fp32), 7.4 MB")
    assert "\x1b[" not in buffer.getvalue()  # no escape code splits the shape
