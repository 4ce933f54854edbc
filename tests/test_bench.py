"""segkd bench: FLOP formulas, paper/torchvision figures, timing statistics, JSON schema, gates, bad input."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segkd.bench.gates import Gates, apply_gates, enforce, parse_count
from segkd.bench.latency import summarize, time_loop
from segkd.bench.run import BenchConfig, bench_models, export_temp_onnx, load_schema, run_bench_command
from segkd.bench.specs import expand_inputs, parse_percent, parse_shape
from segkd.errors import GateFailure, SegkdError
from segkd.models import create_model
from segkd.models.flops import count_flops, module_table

TINY = "1x3x64x64"


# ----------------------------------------------------------------------------------------------- FLOP formulas
class Attn(nn.Module):
    """q/k/v projections, fused SDPA, output projection: 4 linears + 2 attention matmuls."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, d).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(out.transpose(1, 2).reshape(b, n, c))


def test_conv_flops_equal_formula_on_cpu_and_meta() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
    # out 8 x 8 x 8 per image; MACs = B * Cout * Hout * Wout * Cin * k * k
    macs = 2 * 8 * 8 * 8 * 3 * 3 * 3
    for device in (None, "meta"):
        assert count_flops(conv, (2, 3, 16, 16), device=device).flops == 2 * macs


def test_grouped_conv_and_linear_flops_equal_formula() -> None:
    dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    assert count_flops(dw, (1, 16, 10, 10)).flops == 2 * (16 * 10 * 10 * 9)
    lin = nn.Linear(16, 32)

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, H*W, 16) tokens
            return self.lin(x.flatten(2).transpose(1, 2).repeat(1, 1, 6)[..., :16])

    # B=2, tokens 5*4=20, 16 -> 32: MACs = 2 * 20 * 16 * 32
    assert count_flops(Tokens(), (2, 3, 5, 4), device=None).flops == 2 * (2 * 20 * 16 * 32)


def test_attention_block_on_cpu_counts_fused_sdpa() -> None:
    b, n, c, heads = 2, 50, 32, 4
    attn = Attn(c, heads)
    x_shape = (b, n, c)

    def fwd(m: nn.Module, dummy: torch.Tensor) -> torch.Tensor:  # the block takes tokens, not images
        return m(torch.randn(x_shape, device=dummy.device))

    count = count_flops(attn, (1, 1, 1, 1), device=None, forward=fwd)
    linears = 4 * b * n * c * c
    attention = 2 * b * heads * n * n * (c // heads)  # QK^T and AV
    assert count.flops == 2 * (linears + attention)
    # it is the CPU fused kernel that got counted, and stock FlopCounterMode would have missed it
    assert count.by_op["aten._scaled_dot_product_flash_attention_for_cpu"] == 2 * attention
    stock = FlopCounterMode(display=False)
    with stock, torch.no_grad():
        attn(torch.randn(x_shape))
    assert stock.get_total_flops() == 2 * linears
    assert count_flops(attn, (1, 1, 1, 1), device="meta", forward=fwd).flops == count.flops


def test_segformer_b0_matches_paper_and_same_on_cpu_and_meta() -> None:
    model = create_model("segformer-b0", num_classes=150)
    gmacs = count_flops(model, (1, 3, 512, 512)).gmacs
    assert abs(gmacs - 8.4) / 8.4 < 0.05, gmacs
    cpu, meta = count_flops(model, (1, 3, 64, 96), device=None), count_flops(model, (1, 3, 64, 96))
    assert cpu.flops == meta.flops
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in cpu.by_op
    assert "aten.upsample_bilinear2d" in meta.uncounted_ops and "aten.convolution" not in meta.uncounted_ops
    assert model.training is True  # the caller's train/eval mode is restored (zoo models are built in train mode)
    assert next(model.parameters()).device.type == "cpu"  # the meta count used a copy


@pytest.mark.parametrize("arch", ["resnet50", "resnet101"])
def test_deeplabv3_with_aux_matches_torchvision_metadata(arch: str) -> None:
    from torchvision.models import segmentation as tvseg

    weights = {"resnet50": tvseg.DeepLabV3_ResNet50_Weights, "resnet101": tvseg.DeepLabV3_ResNet101_Weights}[arch]
    ops = weights.DEFAULT.meta["_ops"]  # GMACs at 520x520, aux FCN head included (21 classes)
    model = create_model(f"deeplabv3-{arch}", num_classes=21, aux=True)
    with_aux = count_flops(model, (1, 3, 520, 520), forward=lambda m, x: m.forward_aux(x)).gmacs
    assert abs(with_aux - ops) / ops < 0.05, (with_aux, ops)
    deploy = count_flops(model, (1, 3, 520, 520)).gmacs  # the deploy forward skips the aux head
    assert 8 < with_aux - deploy < 12


def test_module_table_levels_add_up() -> None:
    count = count_flops(create_model("segformer-b0", num_classes=19), (1, 3, 64, 64))
    rows = module_table(count, 3)
    assert rows[0][1] == 0 and rows[0][2] == count.flops
    by_name = {name: f for name, _, f in rows}
    assert by_name["SegFormer.encoder"] + by_name["SegFormer.decode_head"] == count.flops
    stages = [f for name, d, f in rows if name.startswith("SegFormer.encoder.stages.") and d == 3]
    assert len(stages) == 4 and sum(stages) == by_name["SegFormer.encoder.stages"]


def test_models_command_rows_have_gmacs() -> None:
    from segkd.models.zoo_info import describe_models

    (row,) = describe_models("segformer-b0", num_classes=150, size="512x512")
    assert abs(row["gmacs"] - 8.39) < 0.01


# ------------------------------------------------------------------------------------------------ timing
def test_summarize_matches_hand_percentiles() -> None:
    s = summarize([0.001, 0.002, 0.003, 0.004, 0.010])
    assert s["mean_ms"] == pytest.approx(4.0)
    assert s["std_ms"] == pytest.approx(float(np.std([1, 2, 3, 4, 10], ddof=1)))
    assert s["p50_ms"] == pytest.approx(3.0)
    assert s["p90_ms"] == pytest.approx(4 + 0.6 * 6)  # linear interpolation between 4 and 10
    assert s["p99_ms"] == pytest.approx(4 + 0.96 * 6)
    assert (s["min_ms"], s["max_ms"]) == (pytest.approx(1.0), pytest.approx(10.0))


def test_time_loop_counts_calls_and_flags_contention() -> None:
    calls, syncs = [], []
    t = time_loop(lambda: calls.append(1), lambda: syncs.append(1), warmup=2, iters=5, threads=1000)
    assert t.iters == 5 and len(calls) == 7 and len(syncs) == 6  # one sync after warm-up, one per timed call
    assert t.contended is True  # nobody reaches 0.9 x 1000 threads of CPU
    t = time_loop(lambda: sum(range(20000)), lambda: None, warmup=0, iters=1, min_time=0.05, threads=None)
    assert t.iters > 1 and t.wall_s >= 0.05 and t.contended is None
    with pytest.raises(SegkdError, match="--iters"):
        time_loop(lambda: None, lambda: None, warmup=0, iters=0)


# ------------------------------------------------------------------------------- end-to-end report + schema
@pytest.fixture(scope="module")
def report() -> dict:
    torch.set_num_threads(1)
    cfg = BenchConfig(models=["segformer-b0", "deeplabv3-resnet18"], inputs=[TINY], batch="1,2",
                      backends=["torch", "onnxruntime"], warmup=1, iters=2, threads=1)
    return bench_models(cfg)


def test_report_validates_and_has_every_run(report: dict) -> None:
    import jsonschema

    jsonschema.validate(report, load_schema())
    assert report["schema_version"] == 1 and report["environment"]["threads"] == 1
    for m in report["models"]:
        assert [(r["backend"], r["batch"]) for r in m["runs"]] == [
            ("torch", 1), ("torch", 2), ("onnxruntime", 1), ("onnxruntime", 2)]
        for r in m["runs"]:
            lat = r["latency_ms"]
            assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
            assert r["throughput_ips"] == pytest.approx(r["batch"] / (lat["mean"] / 1e3))
            assert r["peak_mem_mb"] > 0 and r["peak_mem_kind"] == "process_peak_rss"
        assert [r["providers_used"] for r in m["runs"] if r["backend"] == "onnxruntime"][0] == ["CPUExecutionProvider"]
        assert m["complexity"][0]["input"] == [1, 3, 64, 64]
    assert report["models"][0]["params"] == sum(p.numel() for p in create_model("segformer-b0").parameters())
    # a bad report does not validate (the schema is not vacuous)
    broken = copy.deepcopy(report)
    broken["models"][0]["runs"][0]["latency_ms"].pop("p99")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, load_schema())


def test_gates_pass_and_fail(report: dict, tmp_path: Path) -> None:
    r = copy.deepcopy(report)
    params0 = r["models"][1]["params"]  # the larger model
    gflops0 = max(c["gflops"] for m in r["models"] for c in m["complexity"])
    lat0 = max(x["latency_ms"]["p50"] for m in r["models"] for x in m["runs"])
    apply_gates(r, Gates(max_params=params0, max_gflops=gflops0 * 1.001, max_latency_ms=lat0 + 1))
    assert r["passed"] is True
    enforce(r)
    for gates, name in [(Gates(max_params=params0 - 1), "max-params"), (Gates(max_gflops=gflops0 * 0.99), "max-gflops"),
                        (Gates(max_latency_ms=lat0 * 0.5), "max-latency-ms")]:
        r = copy.deepcopy(report)
        apply_gates(r, gates)
        assert r["passed"] is False
        with pytest.raises(GateFailure, match=name) as err:
            enforce(r)
        assert "\n" not in str(err.value) and err.value.exit_code == 3


def test_baseline_regression_gate(report: dict, tmp_path: Path) -> None:
    base = tmp_path / "prev.json"
    base.write_text(json.dumps(report))
    r = copy.deepcopy(report)
    apply_gates(r, Gates(baseline=base, max_regression=0.10))
    assert r["passed"] is True and any(g["gate"] == "regression-latency" for g in r["gates"])
    faster = copy.deepcopy(report)  # the baseline was twice as fast -> this run regressed by 100 %
    for m in faster["models"]:
        for x in m["runs"]:
            x["latency_ms"]["p50"] /= 2
    base.write_text(json.dumps(faster))
    r = copy.deepcopy(report)
    apply_gates(r, Gates(baseline=base, max_regression=0.10))
    with pytest.raises(GateFailure, match=r"regression-latency.*\+100\.0%"):
        enforce(r)
    r = copy.deepcopy(report)
    apply_gates(r, Gates(baseline=base, max_regression=1.5))  # +100 % allowed under a 150 % limit
    assert r["passed"] is True
    smaller = copy.deepcopy(report)
    smaller["models"][0]["params"] = int(smaller["models"][0]["params"] * 0.8)
    base.write_text(json.dumps(smaller))
    r = copy.deepcopy(report)
    apply_gates(r, Gates(baseline=base))
    with pytest.raises(GateFailure, match="regression-params"):
        enforce(r)
    other = copy.deepcopy(report)
    for m in other["models"]:
        m["name"] = "something-else"
    base.write_text(json.dumps(other))
    with pytest.raises(SegkdError, match="shares no model"):
        apply_gates(copy.deepcopy(report), Gates(baseline=base))
    base.write_text("{not json")
    with pytest.raises(SegkdError, match="not valid JSON"):
        apply_gates(copy.deepcopy(report), Gates(baseline=base))


def test_onnx_file_without_metadata(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    path = tmp_path / "plain.onnx"
    export_temp_onnx(model, (1, 3, 32, 32), path)
    rep = bench_models(BenchConfig(models=[str(path)], inputs=["1x3x32x32"], warmup=0, iters=2, threads=1,
                                   backends=["torch"]))
    (m,) = rep["models"]
    assert m["source"] == "onnx" and m["params_source"] == "onnx_initializers"
    assert (m["name"], m["path"]) == ("plain.onnx", str(path))  # no segkd metadata: named by its file
    assert m["params"] == 4 * 3 * 9 + 4 + 4 * 2 + 2  # BatchNorm folded into the first conv by the exporter
    assert m["complexity"][0]["gflops"] is None and "unavailable" in m["complexity"][0]["flops_source"]
    assert [r["backend"] for r in m["runs"]] == ["onnxruntime"]
    rep2 = copy.deepcopy(rep)
    apply_gates(rep2, Gates(max_gflops=100.0))  # cannot be checked -> fails rather than passing silently
    assert rep2["passed"] is False


# ----------------------------------------------------------------------------------------------- bad input
def test_parsers() -> None:
    assert parse_shape("1x3x512x1024") == (1, 3, 512, 1024) and parse_shape("64X96") == (1, 3, 64, 96)
    assert expand_inputs(["1x3x8x8", "8x8"], [1, 4]) == [(1, 3, 8, 8), (4, 3, 8, 8)]
    assert parse_percent("10%") == pytest.approx(0.1) and parse_percent("2.5") == pytest.approx(0.025)
    assert parse_count("3.8M") == pytest.approx(3.8e6) and parse_count("500k") == 5e5 and parse_count("12") == 12
    for bad in ("1x3x64", "axb", "1x3x0x64", "1x1x64x64", ""):
        with pytest.raises(SegkdError, match="--input"):
            parse_shape(bad)
    with pytest.raises(SegkdError, match="--max-params"):
        parse_count("lots")


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    from segkd.cli import main

    monkeypatch.setattr(sys, "argv", ["segkd", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    cap = capsys.readouterr()
    return int(exc.value.code or 0), cap.out, cap.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["segfromer-b0"], "unknown model 'segfromer-b0'; did you mean segformer-b0"),
        (["segformer-b0", "--device", "cuda"], "--device cuda: CUDA is not available"),
        (["missing/student.safetensors"], "checkpoint file not found"),
        (["nothing.onnx"], "ONNX file not found"),
        (["segformer-b0", "--input", TINY, "--backend", "onnxruntime", "--providers", "cuda", "--iters", "1",
          "--no-flops"], "could not use CUDAExecutionProvider"),
        (["segformer-b0", "--baseline", "nope.json"], "--baseline nope.json: file not found"),
    ],
)
def test_bad_input_is_one_line_exit_1(monkeypatch, capsys, args: list[str], message: str) -> None:
    code, _, err = _cli(monkeypatch, capsys, "bench", *args)
    assert code == 1
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and message in " ".join(lines[-1].split())


@pytest.mark.parametrize("args, message", [
    (["segformer-b0", "--input", "1x3x64"], "--input '1x3x64'"),
    (["segformer-b0", "--batch", "1,0"], "--batch '1,0'"),
    (["segformer-b0", "--backend", "tensorflow"], "--backend 'tensorflow'"),
])
def test_bad_option_values_are_one_line_exit_2(monkeypatch, capsys, args: list[str], message: str) -> None:
    code, _, err = _cli(monkeypatch, capsys, "bench", *args)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert lines[0].endswith("see 'segkd bench --help'")


def test_cli_json_and_gate_exit_codes(monkeypatch, capsys, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    base = ["bench", "segformer-b0", "--input", TINY, "--iters", "2", "--warmup", "0", "--threads", "1"]
    code, stdout, _ = _cli(monkeypatch, capsys, *base, "--json-out", str(out), "--max-params", "4M")
    assert code == 0 and "p50 ms" in stdout and stdout.rstrip().endswith(f"wrote {out}")  # the tables stay
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["gates"][0]["gate"] == "max-params"
    code, stdout, err = _cli(monkeypatch, capsys, *base, "--max-params", "1M", "--no-latency", "--json")
    assert code == 3 and json.loads(stdout)["passed"] is False  # the report still comes, then the gate's exit
    assert err.strip() == "error: max-params: segformer-b0 deploy: 3.719e+06 > 1e+06"
    code, stdout, err = _cli(monkeypatch, capsys, *base, "--no-latency", "--json")
    assert code == 0 and json.loads(stdout)["models"][0]["runs"] == [] and err == ""
    code, _, err = _cli(monkeypatch, capsys, *base, "--no-latency", "--max-latency-ms", "1e9")
    assert code == 3 and "no timed run" in err  # a latency gate with nothing timed fails, never passes


@pytest.mark.parametrize("args, message", [
    (["--json", "report.json"], "error: --json takes no value: it prints the report on stdout (to write report.json, "
                                "use --json-out report.json)"),
    (["--json", "-"], "error: --json takes no value: it prints the report on stdout"),
    (["--json-out", "-"], "error: Invalid value for '--json-out': '-' is not a file; --json prints the JSON on stdout"),
], ids=["json-path", "json-dash", "json-out-dash"])
def test_old_json_spellings_are_one_line_usage_errors(monkeypatch, capsys, args: list[str], message: str) -> None:
    code, stdout, err = _cli(monkeypatch, capsys, "bench", "segformer-b0", "--no-latency", *args)
    assert (code, stdout) == (2, "") and len(err.splitlines()) == 1
    assert err.startswith(message + "; see '") and err.rstrip().endswith(" bench --help'")
    assert not Path("-").exists() and not Path("report.json").exists()


def test_rows_are_named_by_model_with_a_path_only_where_names_collide() -> None:
    from segkd.bench.specs import ModelSpec, name_models

    def spec(name: str, path: str | None) -> ModelSpec:
        return ModelSpec(path or name, name, "zoo" if path is None else "checkpoint", 19, name,
                         path=None if path is None else Path(path))

    cases = [
        ([("deeplabv3-resnet18", "teacher/best.safetensors"), ("segformer-b0", "student/best.safetensors")],
         ["deeplabv3-resnet18", "segformer-b0"]),
        ([("segformer-b0", "runs/a/student/best.safetensors"), ("segformer-b0", "runs/b/student/best.safetensors")],
         ["segformer-b0 (a/student/best.safetensors)", "segformer-b0 (b/student/best.safetensors)"]),
        ([("segformer-b0", None), ("segformer-b0", "student/best.safetensors"), ("segformer-b0", "s.onnx")],
         ["segformer-b0", "segformer-b0 (best.safetensors)", "segformer-b0 (s.onnx)"]),
        ([("plain.onnx", "a/plain.onnx"), ("plain.onnx", "b/plain.onnx")],  # ONNX without metadata: its file name
         ["plain.onnx (a/plain.onnx)", "plain.onnx (b/plain.onnx)"]),
        ([("segformer-b0", "x/m.safetensors"), ("segformer-b0", "./x/m.safetensors")],  # one file twice
         ["segformer-b0 (x/m.safetensors)", "segformer-b0 (./x/m.safetensors)"]),
    ]
    for given, names in cases:
        specs = [spec(n, p) for n, p in given]
        name_models(specs)
        assert [s.name for s in specs] == names


def test_bench_names_checkpoint_rows_by_their_model(monkeypatch, capsys, tmp_path: Path) -> None:
    from segkd.checkpoint import CheckpointMeta, save_checkpoint

    monkeypatch.chdir(tmp_path)
    for role in ("teacher", "student"):
        (tmp_path / role).mkdir()
        save_checkpoint(tmp_path / role / "best.safetensors", create_model("segformer-b0", num_classes=3),
                        CheckpointMeta(model="segformer-b0", num_classes=3))
    args = ["bench", "teacher/best.safetensors", "student/best.safetensors", "--input", "32x32", "--no-latency"]
    code, stdout, err = _cli(monkeypatch, capsys, *args, "--json-out", "r.json")
    assert code == 0, err
    names = ["segformer-b0 (teacher/best.safetensors)", "segformer-b0 (student/best.safetensors)"]
    report = json.loads(Path("r.json").read_text())
    assert [(m["name"], m["path"], m["architecture"]) for m in report["models"]] == [
        (names[0], "teacher/best.safetensors", "segformer-b0"), (names[1], "student/best.safetensors", "segformer-b0")]
    assert [line.split("  ")[0] for line in stdout.splitlines() if line.startswith("segformer-b0")] == names
    # a baseline matches the rows by these names
    code, stdout, err = _cli(monkeypatch, capsys, *args, "--baseline", "r.json")
    assert code == 0, err
    assert f"pass regression-params: {names[1]} deploy: " in stdout


def test_baseline_matches_by_path_and_old_reports_by_file_name(report: dict, tmp_path: Path) -> None:
    new = copy.deepcopy(report)  # this run: a checkpoint of segformer-b0 and the zoo deeplabv3-resnet18
    new["models"][0].update(name="segformer-b0", path="ci/student.safetensors", source="checkpoint")
    new["models"][1]["path"] = None
    old = copy.deepcopy(report)  # a report from before rows were named by model: no `path`, files by file name
    old["models"][0]["name"] = "student.safetensors"
    for m in old["models"]:
        m.pop("path", None)
    moved = copy.deepcopy(new)  # a new-style baseline where the rows had other names (other files benched along)
    moved["models"][0]["name"] = "segformer-b0 (ci/student.safetensors)"
    for base in (old, moved):
        path = tmp_path / "base.json"
        path.write_text(json.dumps(base))
        gates = apply_gates(copy.deepcopy(new), Gates(baseline=path))
        compared = {g["model"] for g in gates if g["gate"] == "regression-params"}
        assert compared == {"segformer-b0", "deeplabv3-resnet18"}, gates


def test_run_bench_command_rejects_bad_baseline_before_timing(tmp_path: Path) -> None:
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"kind": "other"}))
    with pytest.raises(SegkdError, match="not a segkd bench report"):
        run_bench_command(BenchConfig(models=["segformer-b0"]), Gates(baseline=bad))


# ------------------------------------------------------------------------------------------------ train step
def test_train_step_report(monkeypatch, capsys, tmp_path: Path) -> None:
    import jsonschema

    out = tmp_path / "ts.json"
    code, stdout, _ = _cli(monkeypatch, capsys, "bench", "--train-step", "--method", "kd", "--teacher",
                           "segformer-b0", "--student", "segformer-b0", "--input", TINY, "--iters", "1",
                           "--warmup", "0", "--threads", "1", "--num-classes", "5", "--json-out", str(out))
    assert code == 0 and "overhead" in stdout
    data = json.loads(out.read_text())
    jsonschema.validate(data, load_schema())
    (entry,) = data["train_step"]
    assert entry["input"] == [2, 3, 64, 64] and entry["method"] == "kd" and entry["adapter_params"] == 0
    ratio = entry["method_step"]["latency_ms"]["p50"] / entry["lower_bound"]["latency_ms"]["p50"]
    assert entry["overhead_ratio"] == pytest.approx(ratio) and data["models"] == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "kd", "--student", "segformer-b0"], "--train-step needs --teacher"),
        (["--method", "kd", "--teacher", "segformer-b0", "--student", "segformer-b0", "--batch", "1"],
         "batch 1 is too small"),
        (["--method", "c2vkd", "--teacher", "segformer-b0", "--student", "segformer-b0", "--input", TINY],
         "c2vkd needs a cnn teacher"),
        (["--method", "kdd", "--teacher", "segformer-b0", "--student", "segformer-b0"], "unknown method 'kdd'"),
    ],
)
def test_train_step_bad_input(monkeypatch, capsys, args: list[str], message: str) -> None:
    code, _, err = _cli(monkeypatch, capsys, "bench", "--train-step", *args)
    assert code == 1 and message in " ".join(err.split())


def test_checkpoint_and_its_onnx_export_share_flops(tmp_path: Path) -> None:
    from segkd.checkpoint import CheckpointMeta, save_checkpoint
    from segkd.export import ExportConfig, export_checkpoint

    ckpt = tmp_path / "student.safetensors"
    save_checkpoint(ckpt, create_model("segformer-b0", num_classes=5), CheckpointMeta(model="segformer-b0",
                                                                                       num_classes=5))
    onnx_path = tmp_path / "student.onnx"
    export_checkpoint(ckpt, onnx_path, ExportConfig(size="64x64", verify=False))
    rep = bench_models(BenchConfig(models=[str(ckpt), str(onnx_path)], inputs=[TINY], latency=False))
    a, b = rep["models"]
    assert (a["source"], b["source"]) == ("checkpoint", "onnx") and a["num_classes"] == b["num_classes"] == 5
    # both named by the model the checkpoint and the export metadata record, told apart by their files
    assert (a["name"], b["name"]) == ("segformer-b0 (student.safetensors)", "segformer-b0 (student.onnx)")
    assert b["complexity"][0]["gmacs"] == a["complexity"][0]["gmacs"] > 0
    assert "ONNX metadata" in b["complexity"][0]["flops_source"]
    assert abs(b["params"] - a["params"]) / a["params"] < 0.01  # BN folded: a few hundred fewer numbers


def test_torch_compile_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from segkd.bench.latency import bench_torch

    def broken(model: nn.Module, **_: object) -> nn.Module:
        raise RuntimeError("InductorError: C++ compile error\nlong traceback ...")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(SegkdError, match=r"^--backend torch-compile: torch.compile failed on this machine "
                                         r"\(InductorError: C\+\+ compile error\)$"):
        bench_torch(nn.Conv2d(3, 4, 1), (1, 3, 8, 8), torch.device("cpu"), 0, 1, 0.0, 1, compile=True)
