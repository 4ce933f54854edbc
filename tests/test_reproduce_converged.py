"""examples/reproduce_camvid.py (the converged protocol): table statistics by hand, job order, the GPU recipe."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import load_example, random_teacher

from segkd.checkpoint import file_sha256
from segkd.data import synthesize


@pytest.fixture(scope="module")
def rc() -> ModuleType:
    return load_example("reproduce_camvid.py")


def test_paired_delta_with_a_95_percent_t_interval(rc: ModuleType) -> None:
    vals = {"0": {"miou": 0.30}, "1": {"miou": 0.32}, "2": {"miou": 0.34}}
    base = {"0": {"miou": 0.29}, "1": {"miou": 0.30}, "2": {"miou": 0.31}, "3": {"miou": 0.5}}
    # differences +1, +2, +3 points: mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.303 / 1.732 = 2.484
    cell, ds = rc.paired(vals, base)
    assert ds == pytest.approx([1.0, 2.0, 3.0])
    assert cell == "+2.00 [-0.48, +4.48]"
    assert rc.paired({"0": {"miou": 0.3}}, base)[0] == "+1.00 (one seed)"
    assert rc.paired(vals, {})[0] == ""  # no baseline seed: no pairing, never another seed's run
    assert rc.mean_std([30.0, 32.0, 34.0]) == "32.00 ± 2.00" and rc.mean_std([]) == "—"


def test_unpaired_delta_is_a_welch_interval(rc: ModuleType) -> None:
    # a row whose starts are not the baseline's draws: Welch over the two samples, not t over per-seed differences
    vals = {"0": {"miou": 0.30, "start": "unpaired"}, "1": {"miou": 0.32, "start": "unpaired"},
            "2": {"miou": 0.34, "start": "unpaired"}}
    base = {"0": {"miou": 0.29}, "1": {"miou": 0.30}, "2": {"miou": 0.31}}
    # means 32 and 30, variances 4 and 1 (n=3 each): se = sqrt(4/3 + 1/3) = 1.2910; df = (5/3)^2 / ((4/3)^2/2 +
    # (1/3)^2/2) = 2.7778/0.9444 = 2.941; t(0.975, 2.941) = 3.2188 (the t CDF, checked below by integrating the
    # density); half = 3.2188 * 1.2910 = 4.155
    cell, ds = rc.paired(vals, base)
    assert ds == pytest.approx([1.0, 2.0, 3.0])
    assert cell == "unpaired (Welch): +2.00 [-2.16, +6.16]"
    assert rc.t975(3) == 3.182 and rc.t975(30) == pytest.approx(2.042, abs=0.002)
    assert rc.t975(120) == pytest.approx(1.980, abs=0.002)


@pytest.mark.parametrize("df", [1.1, 1.5, 2.941, 7.3])
def test_a_welch_df_gets_the_exact_t_quantile(rc: ModuleType, df: float) -> None:
    # independent of t_cdf: Simpson's rule over Student's density from 0 to t975(df) holds 0.475 of the mass
    def pdf(x: float) -> float:
        return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
            * (1 + x * x / df) ** (-(df + 1) / 2)

    t, n = rc.t975(df), 20000
    h = t / n
    mass = h / 3 * (pdf(0) + pdf(t) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n)))
    assert mass == pytest.approx(0.475, abs=1e-7)
    # df 1 and 2 in closed form: tan(0.475 pi) = 12.7062 and 0.95 * sqrt(2 / (1 - 0.95^2)) = 4.3027; a df just
    # above them lands just below
    assert 12.70 < rc.t975(1.000001) < 12.7063 and 4.30 < rc.t975(2.000001) < 4.3027


def test_summaries_name_the_code_that_ran(rc: ModuleType) -> None:
    v = rc.code_version()
    assert len(v["commit"]) == 40 and isinstance(v["dirty"], bool)


def test_flat_spread_is_the_last_quarter(rc: ModuleType) -> None:
    curve = [(100, 0.10), (1100, 0.50), (1200, 0.40), (1300, 0.41), (1600, 0.395)]
    assert rc.flat_spread(curve, 1600) == pytest.approx(1.5)  # 1200..1600 only: 41.0 - 39.5
    assert rc.flat_spread(curve[:3], 1600) is None  # one point is no curve


def test_jobs_run_the_clean_label_scarce_rows_first(rc: ModuleType) -> None:
    table = rc.rows()
    jobs = [(r if isinstance(r, str) else r.name, s) for r, s in rc.jobs(table)]
    # the baselines first: their first-table runs are not this code's (Row.rerun_legacy)
    assert jobs[:6] == [("quarter-b0", 0), ("b0", 0), ("quarter-b0", 1), ("b0", 1), ("quarter-b0", 2), ("b0", 2)]
    assert jobs[6:10] == [("quarter-kd+unl", 0), ("quarter-cwd+unl", 0), ("quarter-dkd+unl", 0),
                          ("quarter-c2vkd+unl", 0)]
    assert len(jobs) == len(set(jobs))  # no job twice
    by_name = {r.name: r for r in table}
    for r in table:  # every row at each of its seeds, nothing more
        assert sorted(s for n, s in jobs if n == r.name) == list(range(r.seeds)), r.name
    assert {n for n in ("b0", "kd", "cwd", "quarter-b0", "quarter-kd+unl") if by_name[n].seeds == 5} == {
        "b0", "kd", "cwd", "quarter-b0", "quarter-kd+unl"}
    first_b1 = min(i for i, (n, _) in enumerate(jobs) if by_name.get(n) and by_name[n].teacher == "b1")
    assert jobs.index(("teacher:b1", 0)) < first_b1  # the transformer teacher before its rows
    assert [(n, s) for n, s in rc.jobs([by_name["dkd"]], [4])] == [(by_name["dkd"], 4)]  # seeds outside ORDER
    assert by_name["cwd"].opts == {"weight": "0.3", "feature": "true", "feat_weight": "5"}  # CIRKD's B0 weights
    # the rows the paired-start fix changed are rerun, not read from the first table
    assert {r.name for r in table if r.legacy_ok} == {"b0", "kd-online", "dml", "r18", "quarter-b0",
                                                     "quarter-kd+unl-t367", "quarter-c2vkd+unl-t367"}
    # ... but the rows trained alone or online are rerun by this code (their legacy runs shown until then)
    assert {r.name for r in table if r.rerun_legacy} == {"b0", "kd-online", "dml", "r18", "quarter-b0"}
    assert {r.name for r in table if r.data == "quarter" and r.unlabeled and r.teacher == "quarter"} == {
        "quarter-kd+unl", "quarter-cwd+unl", "quarter-dkd+unl", "quarter-c2vkd+unl", "quarter-mnv3-kd+unl"}


def test_gpu_recipe_refuses_without_cuda(rc: ModuleType, capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as e:
        rc.parse(["--gpu-recipe"])
    assert e.value.code == 2 and "--gpu-recipe needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_recipe_dry_run_on_cpu(rc: ModuleType, tmp_path: Path) -> None:
    """The recipe end to end (two spawned lanes: splits, the quarter teacher trained and exported to ONNX as protocol
    steps, teacher caches, train, cached KD with unlabeled images from the checkpoint and from the ONNX teacher;
    committed summaries; the report) for 2 iterations on CPU, on an 8-image synthetic set with a random 'all'
    teacher. Then: summaries count as done on a machine without the run directories, and a restart with another
    teacher for finished rows is refused."""
    import shutil

    data = synthesize(tmp_path / "data", n_train=8, n_val=2, size=(32, 48), num_classes=3, seed=1)
    teacher = random_teacher(tmp_path / "t.safetensors", 3, seed=0)
    out, docs, summ = tmp_path / "runs", tmp_path / "results.md", tmp_path / "summaries"
    base = ["--gpu-recipe", "--dry-run", "--out", str(out), "--data", str(data), "--teacher", str(teacher),
            "--quarter-teacher", "train", "--seeds", "0", "--only",
            "b0,kd,quarter-b0,quarter-kd+unl,quarter-mnv3,quarter-mnv3-kd+unl",
            "--docs", str(docs), "--json", str(tmp_path / "results.json"), "--summaries", str(summ), "--no-progress"]
    assert rc.main(base) == 0
    assert len(list((out / "data" / "camvid-quarter" / "images" / "train").iterdir())) == 2  # every 4th of 8
    assert len(list((out / "data" / "camvid-unlabeled").iterdir())) == 6
    assert (out / "teacher-quarter" / "last.safetensors").is_file()  # lane 0 trained the clean teacher
    text = docs.read_text()
    assert "| quarter-kd+unl | quarter | kd (cache) | 1/4 labelled + 3/4 unlabeled |" in text
    doc = json.loads((tmp_path / "results.json").read_text())
    q = doc["teachers"]["quarter"]
    assert q["sha256"] == file_sha256(out / "teacher-quarter" / "last.safetensors") and len(q["trained_on"]) == 2
    assert 0 <= q["val_miou"] <= 1
    rows = doc["rows"]
    assert rows["quarter-kd+unl"]["0"]["teacher_sha256"] == q["sha256"]
    assert rows["kd"]["0"]["teacher_sha256"] == file_sha256(teacher)
    assert {rows[n]["0"]["start"] for n in ("b0", "kd", "quarter-b0", "quarter-kd+unl", "quarter-mnv3",
                                            "quarter-mnv3-kd+unl")} == {"paired"}
    # the ONNX teacher: the export of the quarter checkpoint, named by its sha256; the summary records both files
    onnx = out / "teacher-quarter-onnx" / f"{q['sha256']}.onnx"
    assert (out / "teacher-quarter-onnx.path").read_text().strip() == str(onnx)
    mnv3 = json.loads((summ / "quarter-mnv3-kd_unl_s0.json").read_text())
    assert mnv3["teacher"] == {"name": "quarter", "sha256": q["sha256"], "format": "onnx",
                               "onnx_sha256": file_sha256(onnx)}
    assert mnv3["protocol_config"]["model"] == "lraspp-mobilenetv3_large_100"
    assert len(mnv3["code"]["commit"]) == 40 and mnv3["threads"] >= 1  # the code version that ran
    assert rows["quarter-mnv3-kd+unl"]["0"]["teacher_onnx_sha256"] == file_sha256(onnx)
    assert doc["stats"]["quarter-mnv3-kd+unl"]["delta"]["baseline"] == "quarter-mnv3"
    assert (out / "teacher-cache-quarter-onnx" / "cache.json").exists()
    assert "| quarter-mnv3-kd+unl | quarter (as ONNX) | kd (cache), ONNX Runtime teacher |" in text
    assert f"ONNX sha256: `{file_sha256(onnx)[:16]}…`" in text
    assert (out / "teacher-cache" / "cache.json").exists() and (out / "teacher-cache-quarter" / "cache.json").exists()
    # a new machine: no run directories, only the committed summaries: nothing is trained again
    kept = shutil.copy(out / "teacher-quarter" / "last.safetensors", tmp_path / "quarter.safetensors")
    shutil.rmtree(out)
    assert rc.main([*base, "--quarter-teacher", str(kept), "--spawn", "1"]) == 0
    assert not (out / "b0_s0").exists() and not (out / "kd_s0").exists()
    # a restart with another teacher for finished rows refuses to mix them, naming the row and both sha256s
    other = random_teacher(tmp_path / "t2.safetensors", 3, seed=1)
    with pytest.raises(SystemExit, match=rf"kd seed 0: .* sha256 {file_sha256(teacher)}.* sha256 "
                                         rf"{file_sha256(other)}"):
        rc.main([*base[:7], str(other), *base[8:], "--spawn", "1"])
    # another split (a held-out set) never reads these summaries
    other_data = synthesize(tmp_path / "data2", n_train=8, n_val=2, size=(32, 48), num_classes=3, seed=2)
    with pytest.raises(SystemExit, match=r"ran on other data \(fingerprint .*use another --summaries"):
        rc.main([*base[:5], str(other_data), *base[6:], "--spawn", "1"])
    # a finished run is only reused when it ran this protocol
    with pytest.raises(SystemExit, match="finished with iters=2"):
        rc.main([*base, "--spawn", "1", "--iters", "3", "--only", "b0"])


def test_top_k_cache_rows_use_their_own_cache(rc: ModuleType, tmp_path: Path) -> None:
    import argparse

    table = rc.rows()
    jobs = [(r if isinstance(r, str) else r.name, s) for r, s in rc.jobs(table)]
    assert jobs[-6:-3] == [("dkd-top2", 0), ("dkd-top2", 1), ("dkd-top2", 2)]  # after everything but transkd-4x
    by_name = {r.name: r for r in table}
    args = argparse.Namespace(out=str(tmp_path), data="d", no_progress=True, protocol=rc.Protocol())
    for name, full in (("kd-top2", "kd"), ("dkd-top2", "dkd")):
        top, ref = (rc.config(by_name[n], 0, args, teacher=Path("t.pth")) for n in (name, full))
        assert top.cache_topk == 2 and ref.cache_topk == 0
        assert top.teacher_cache == f"{ref.teacher_cache}-top2"  # never the full cache's folder
        # the same run as the full-cache row in everything else (paired: same student start, same crops)
        same = {k: v for k, v in vars(ref).items() if k not in ("out", "teacher_cache", "cache_topk")}
        assert same == {k: v for k, v in vars(top).items() if k not in ("out", "teacher_cache", "cache_topk")}
        assert rc.protocol_config(top)["cache_topk"] == 2 and by_name[name].baseline == "b0"
    # summaries written before the field existed still count for the full-cache rows
    rec = {"seed": 0, "protocol_config": {k: v for k, v in rc.protocol_config(ref).items() if k != "cache_topk"}}
    rc.check_summary(rec, by_name["dkd"], ref, None, tmp_path)
    with pytest.raises(SystemExit, match="finished with cache_topk=0"):
        rc.check_summary({"seed": 0, "protocol_config": rc.protocol_config(ref)}, by_name[name], top, None, tmp_path)
    line = rc._row_line(by_name["kd-top2"], "kd-top2", {}, {})
    assert "| kd (top-2 cache) |" in line and "not run yet" in line


def test_the_timm_student_rows(rc: ModuleType, tmp_path: Path) -> None:
    """quarter-mnv3 is quarter-b0 with the LR-ASPP MobileNetV3 student; quarter-mnv3-kd+unl is quarter-kd+unl with
    that student and the quarter teacher given as ONNX (its own cache folder), paired with quarter-mnv3. In the
    run order they follow kd-top2, which follows the kd/cwd group."""
    import argparse

    table = rc.rows()
    by_name = {r.name: r for r in table}
    jobs = [(r if isinstance(r, str) else r.name, s) for r, s in rc.jobs(table)]
    start = jobs.index(("cwd", 2)) + 1
    assert jobs[start:start + 9] == [("kd-top2", 0), ("kd-top2", 1), ("kd-top2", 2),
                                     ("quarter-mnv3", 0), ("quarter-mnv3-kd+unl", 0), ("quarter-mnv3", 1),
                                     ("quarter-mnv3-kd+unl", 1), ("quarter-mnv3", 2), ("quarter-mnv3-kd+unl", 2)]
    assert jobs[start + 9] == ("b0", 3)
    alone, kd = by_name["quarter-mnv3"], by_name["quarter-mnv3-kd+unl"]
    assert (alone.seeds, kd.seeds, kd.baseline, kd.teacher, kd.onnx) == (3, 3, "quarter-mnv3", "quarter", True)
    args = argparse.Namespace(out=str(tmp_path), data="d", no_progress=True, protocol=rc.Protocol())
    onnx = tmp_path / "teacher-quarter-onnx" / "abc.onnx"
    pairs = (("quarter-mnv3", "quarter-b0", None), ("quarter-mnv3-kd+unl", "quarter-kd+unl", onnx))
    for name, ref_name, teacher in pairs:
        cfg = rc.config(by_name[name], 1, args, teacher=teacher)
        ref = rc.config(by_name[ref_name], 1, args, teacher=Path("q.safetensors") if teacher else None)
        assert cfg.model == "lraspp-mobilenetv3_large_100" and ref.model == "segformer-b0"
        differ = {k for k in vars(ref) if vars(ref)[k] != vars(cfg)[k]}
        assert differ == ({"model", "out"} | ({"teacher", "teacher_weights", "teacher_cache"} if teacher else set()))
    assert (cfg.teacher, cfg.teacher_weights) == (None, str(onnx))  # an ONNX file is its own model
    assert cfg.teacher_cache == f"{ref.teacher_cache}-onnx" and cfg.unlabeled == ref.unlabeled
    assert rc.row_spec(kd) == {**rc.row_spec(by_name["quarter-kd+unl"]), "teacher_format": "onnx"}
    assert "teacher_format" not in rc.row_spec(by_name["quarter-kd+unl"])  # committed summaries keep matching
    line = rc._row_line(kd, kd.name, {}, {})
    assert "| quarter-mnv3-kd+unl | quarter (as ONNX) | kd (cache), ONNX Runtime teacher | 1/4 labelled + 3/4 " \
           "unlabeled | not run yet |" in line


def test_a_rerun_rows_legacy_run_does_not_count_as_done(rc: ModuleType, tmp_path: Path) -> None:
    import argparse
    import types

    by_name = {r.name: r for r in rc.rows()}
    args = argparse.Namespace(summaries=str(tmp_path), data_fingerprint=None)
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "quarter-b0_s0.json").write_text("{}")  # the first table's run of a rerun row
    cfg = types.SimpleNamespace(out=str(tmp_path / "no-run-yet"))
    assert by_name["quarter-b0"].legacy_ok and by_name["quarter-b0"].rerun_legacy
    assert rc.job_done(by_name["quarter-b0"], 0, cfg, args) is False  # trained again by this code


def test_a_run_by_code_that_recorded_no_commit_is_run_again(rc: ModuleType, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import types

    row = {r.name: r for r in rc.rows()}["quarter-kd+unl"]
    args = argparse.Namespace(summaries=str(tmp_path), data_fingerprint=None)
    (tmp_path / "quarter-kd_unl_s0.json").write_text("{}")  # no "code": made before the protocol's commit
    cfg = types.SimpleNamespace(out=str(tmp_path / "no-run-yet"), teacher_weights=None)
    assert rc.job_done(row, 0, cfg, args) is False
    (tmp_path / "quarter-kd_unl_s0.json").write_text(json.dumps({"code": {"commit": "0" * 40}}))
    checked: list[str] = []
    monkeypatch.setattr(rc, "check_summary", lambda rec, *a: checked.append(rec["code"]["commit"]))
    assert rc.job_done(row, 0, cfg, args) is True and checked == ["0" * 40]  # a summary that names its code is done


def test_each_teacher_cache_is_prebuilt_by_its_row_reading_the_most_taps(rc: ModuleType, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # a fresh machine: kd (logits) ran first and built the quarter cache without layer4, cwd was then refused
    import argparse

    import segkd.runs.distill as distill

    by_name = {r.name: r for r in rc.rows()}
    jobs = [(by_name[n], 0) for n in ("quarter-kd+unl", "quarter-cwd+unl", "quarter-dkd+unl", "kd", "c2vkd",
                                      "kd-top2", "b0")]
    done = {("c2vkd", 0)}  # a finished run never causes a build
    args = argparse.Namespace(out=str(tmp_path), data=str(tmp_path / "camvid"), jobs=jobs, protocol=rc.Protocol(),
                              no_progress=True)
    monkeypatch.setattr(rc, "teacher_path", lambda name, a, onnx=False: tmp_path / f"{name}.safetensors")
    monkeypatch.setattr(rc, "job_done", lambda row, seed, cfg, a: (row.name, seed) in done)
    built: list[tuple[str, str]] = []
    monkeypatch.setattr(distill, "prepare_distill_data", lambda cfg: built.append((Path(cfg.teacher_cache).name,
                                                                                    cfg.method)))
    rc.prebuild_caches(args)
    assert sorted(built) == [("teacher-cache", "kd"), ("teacher-cache-quarter", "cwd"), ("teacher-cache-top2", "kd")]


def test_the_unlabeled_images_are_scored_with_their_labels_and_the_folder_is_idempotent(rc: ModuleType,
                                                                                         tmp_path: Path) -> None:
    src = tmp_path / "src"
    for sub in ("images", "labels"):
        (src / sub / "train").mkdir(parents=True)
        for i in range(8):
            (src / sub / "train" / f"f{i}.png").write_bytes(sub.encode())
    (src / "stats.json").write_text("{}")
    root = rc.unlabeled_with_labels(tmp_path / "out", str(src))
    names = sorted(p.name for p in (root / "images" / "train").iterdir())
    assert names == ["f1.png", "f2.png", "f3.png", "f5.png", "f6.png", "f7.png"]  # every 4th is the labelled quarter
    assert sorted(p.name for p in (root / "labels" / "train").iterdir()) == names
    assert (root / "labels" / "train" / "f1.png").read_bytes() == b"labels"
    (root / "images" / "train" / "f7.png").unlink()  # a build cut short is completed, a finished one left as is
    assert rc.unlabeled_with_labels(tmp_path / "out", str(src)) == root
    assert len(list((root / "images" / "train").iterdir())) == 6 and (root / "stats.json").is_symlink()


def test_row_stats_say_which_code_ran_each_side_and_the_baseline_mean_the_delta_uses(rc: ModuleType) -> None:
    def run(miou: float, code: str | None) -> dict[str, object]:
        return {"miou": miou, "spread": None, "code": code, "start": "paired"}

    row = {r.name: r for r in rc.rows()}["kd"]
    res = {"b0": {"0": run(0.40, "a" * 40), "1": run(0.42, "a" * 40), "2": run(0.50, "b" * 40)},
           "kd": {"0": run(0.41, None), "1": run(0.44, "a" * 40)}}
    st = rc.row_stats([row], res)["kd"]
    assert st["code"] == {"aaaaaaa": 1, "unrecorded": 1}
    d = st["delta"]
    assert d["seeds"] == ["0", "1"] and d["baseline_mean"] == pytest.approx(41.0)  # seeds 0-1, not b0's 44.0
    assert d["baseline_code"] == {"aaaaaaa": 2} and d["per_seed"] == pytest.approx([1.0, 2.0])


def test_bonferroni_intervals_over_each_baselines_paired_family(rc: ModuleType) -> None:
    """delta.bonferroni: the family is every row with a paired Δ over >= 2 seeds against the same baseline; each
    interval uses t at 1 - 0.05 / (2 m). df 2: t_p = (2p - 1) sqrt(2 / (1 - (2p - 1)^2)) in closed form."""
    def run(miou: float) -> dict[str, object]:
        return {"miou": miou, "spread": None, "code": None, "start": "paired"}

    table = {r.name: r for r in rc.rows()}
    res = {"b0": {s: run(0.40) for s in "012"},
           "kd": {"0": run(0.41), "1": run(0.42), "2": run(0.43)},  # +1, +2, +3
           "cwd": {"0": run(0.40), "1": run(0.42), "2": run(0.44)},  # 0, +2, +4
           "dkd": {"0": run(0.45)},  # one seed: not in the family
           "dml": {"0": {**run(0.41), "start": "NOT PAIRED"}, "1": run(0.42)},  # Welch: not in the family
           "quarter-b0": {s: run(0.30) for s in "012"},  # another baseline: a family of its own
           "quarter-kd+unl": {"0": run(0.31), "1": run(0.33), "2": run(0.35)}}
    rows = [table[n] for n in ("kd", "cwd", "dkd", "dml", "quarter-kd+unl")]
    st = rc.row_stats(rows, res)
    assert "bonferroni" not in st["dkd"]["delta"] and "bonferroni" not in st["dml"]["delta"]
    q1 = st["quarter-kd+unl"]["delta"]["bonferroni"]  # m = 1: the plain 95 % interval
    assert q1["m"] == 1 and q1["family"] == ["quarter-kd+unl"]
    assert q1["ci"] == pytest.approx(st["quarter-kd+unl"]["delta"]["ci95"], rel=1e-3)
    b = st["kd"]["delta"]["bonferroni"]
    assert b["m"] == 2 and b["family"] == ["cwd", "kd"] and b["level"] == pytest.approx(0.975)
    q = 2 * (1 - 0.025 / 2) - 1
    t = q * math.sqrt(2 / (1 - q * q))  # 6.205
    assert rc.t_quantile(1 - 0.025 / 2, 2) == pytest.approx(t, rel=1e-9)
    assert b["ci"] == pytest.approx([2 - t / math.sqrt(3), 2 + t / math.sqrt(3)])
    assert st["cwd"]["delta"]["bonferroni"]["ci"] == pytest.approx([2 - 2 * t / math.sqrt(3), 2 + 2 * t / math.sqrt(3)])
    assert rc.t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)


def test_a_row_is_also_compared_with_the_rows_it_names(rc: ModuleType) -> None:
    def run(miou: float) -> dict[str, object]:
        return {"miou": miou, "spread": None, "code": None, "start": "paired"}

    table = {r.name: r for r in rc.rows()}
    assert table["transkd"].also == ("kd-b1",)
    res = {"b0": {s: run(0.40) for s in "012"}, "kd-b1": {"0": run(0.41), "1": run(0.43), "2": run(0.42)},
           "transkd": {"0": run(0.45), "1": run(0.46), "2": run(0.48)}}
    vs = rc.row_stats([table["transkd"], table["kd-b1"]], res)["transkd"]["vs"]["kd-b1"]
    assert vs["per_seed"] == pytest.approx([4.0, 3.0, 6.0]) and vs["seeds"] == ["0", "1", "2"]
    assert vs["mean"] == pytest.approx(13 / 3) and vs["paired_starts"]
    half = 4.303 * statistics.stdev([4.0, 3.0, 6.0]) / math.sqrt(3)
    assert vs["ci95"] == pytest.approx([13 / 3 - half, 13 / 3 + half])
    # pairing is by seed, not by position: seeds 2 and 0 of transkd-ea against kd-b1's 0-2 given in another order
    res["transkd-ea"] = {"2": run(0.47), "0": run(0.44)}
    res["kd-b1"] = {"2": run(0.42), "1": run(0.43), "0": run(0.41)}
    st = rc.row_stats([table["transkd-ea"], table["kd-b1"]], res)
    ea = st["transkd-ea"]["vs"]["kd-b1"]
    assert ea["seeds"] == ["0", "2"] and ea["per_seed"] == pytest.approx([3.0, 5.0]) and ea["mean"] == pytest.approx(4)
    assert "vs" not in st["kd-b1"]  # a row without `also` is compared with its baseline only


def test_a_row_gain_is_compared_with_another_rows_gain_seed_by_seed(rc: ModuleType) -> None:
    def run(miou: float, start: str = "paired") -> dict[str, object]:
        return {"miou": miou, "spread": None, "code": None, "start": start}

    table = {r.name: r for r in rc.rows()}
    assert table["transkd-4x"].gain_vs == ("transkd",)
    res = {"b0": {"0": run(0.40), "1": run(0.42), "2": run(0.41)},
           "transkd": {"0": run(0.47), "1": run(0.48), "2": run(0.47)},  # gains +7, +6, +6
           "b0-4x": {"0": run(0.52), "1": run(0.54), "2": run(0.52)},
           "transkd-4x": {"2": run(0.52), "0": run(0.51), "1": run(0.52)}}  # gains -1, -2, 0 (seed order scrambled)
    rows = [table[n] for n in ("b0", "transkd", "b0-4x", "transkd-4x")]
    g = rc.row_stats(rows, res)["transkd-4x"]["gain_vs"]["transkd"]
    assert g["baselines"] == ["b0-4x", "b0"] and g["seeds"] == ["0", "1", "2"] and g["paired_starts"]
    assert g["per_seed"] == pytest.approx([-8.0, -8.0, -6.0]) and g["mean"] == pytest.approx(-22 / 3)
    half = 4.303 * statistics.stdev([-8.0, -8.0, -6.0]) / math.sqrt(3)
    assert g["ci95"] == pytest.approx([-22 / 3 - half, -22 / 3 + half], abs=1e-3)
    # a seed missing from any of the four rows drops out; an unpaired start makes the comparison unpaired (Welch)
    del res["b0"]["1"]
    res["transkd"]["2"] = run(0.47, "unpaired")
    g = rc.row_stats(rows, res)["transkd-4x"]["gain_vs"]["transkd"]
    assert g["seeds"] == ["0", "2"] and not g["paired_starts"]
    # the comparison needs both rows' baselines
    assert "gain_vs" not in rc.row_stats([table["transkd-4x"]], {k: res[k] for k in ("transkd-4x", "b0-4x")})[
        "transkd-4x"]


def test_flatness_counts_the_seeds_within_the_limit_per_schedule(rc: ModuleType) -> None:
    def run(spread: float | None) -> dict[str, object]:
        return {"miou": 0.4, "spread": spread, "code": None, "start": "paired"}

    table = list(rc.rows())
    res = {"b0": {"0": run(1.5), "1": run(2.0), "2": run(2.01)},  # the limit itself passes
           "collab (peer)": {"0": run(0.5)},  # a peer counts with its row's schedule
           "cwd-4x": {"0": run(3.0), "1": run(None)},  # no curve: not counted
           "b0-4x": {"0": run(1.0)}}
    assert rc.flatness(table, res) == {"limit": 2.0, "1x": {"flat": 3, "seeds": 4}, "4x": {"flat": 1, "seeds": 2}}


def test_transkd_4x_is_transkd_at_b0_4x_schedule(rc: ModuleType, tmp_path: Path) -> None:
    """transkd-4x (queued last) is the transkd row with four times the iterations, paired with b0-4x."""
    import argparse

    table = rc.rows()
    jobs = [(r if isinstance(r, str) else r.name, s) for r, s in rc.jobs(table)]
    assert jobs[-3:] == [("transkd-4x", 0), ("transkd-4x", 1), ("transkd-4x", 2)]
    by_name = {r.name: r for r in table}
    row = by_name["transkd-4x"]
    assert (row.method, row.teacher, row.cache, row.baseline, row.schedule) == ("transkd", "b1", False, "b0-4x", 4)
    args = argparse.Namespace(out=str(tmp_path), data="d", no_progress=True, protocol=rc.Protocol())
    four, one, base = (rc.config(by_name[n], 0, args, teacher=Path("t.pth")) for n in ("transkd-4x", "transkd",
                                                                                       "b0-4x"))
    assert four.iters == 4 * one.iters == base.iters and four.val_every == base.val_every
    assert {k: v for k, v in vars(four).items() if k not in ("out", "iters", "val_every")} == \
        {k: v for k, v in vars(one).items() if k not in ("out", "iters", "val_every")}
