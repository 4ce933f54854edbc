"""examples/reproduce_camvid.py (the converged protocol): table statistics by hand, job order, the GPU recipe."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import load_example

from segkd.checkpoint import CheckpointMeta, save_checkpoint
from segkd.data import synthesize
from segkd.models import create_model


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


def test_flat_spread_is_the_last_quarter(rc: ModuleType) -> None:
    curve = [(100, 0.10), (1100, 0.50), (1200, 0.40), (1300, 0.41), (1600, 0.395)]
    assert rc.flat_spread(curve, 1600) == pytest.approx(1.5)  # 1200..1600 only: 41.0 - 39.5
    assert rc.flat_spread(curve[:3], 1600) is None  # one point is no curve


def test_jobs_put_resnet_rows_last_and_skip_notes(rc: ModuleType) -> None:
    table = rc.rows()
    jobs = [(r.name, s) for r, s in rc.jobs(table, [0, 1])]
    assert jobs[0] == ("b0", 0) and ("b0", 1) in jobs
    assert [n for n, _ in jobs[-4:]] == ["r18", "collab", "r18", "collab"]
    # every method row at every seed before any diagnostic; each diagnostic at the first seed before the others
    first_extra = next(i for i, (n, _) in enumerate(jobs) if n in rc.EXTRA)
    assert all(n in rc.MAIN for n, _ in jobs[:first_extra]) and len(jobs[:first_extra]) == 2 * len(rc.MAIN)
    assert jobs[first_extra:first_extra + 3] == [("kd-online", 0), ("kd-mask", 0), ("dml", 0)]
    assert all(n != "transkd" for n, _ in jobs)  # a note row, not a job
    names = {r.name for r in table}
    assert {"b0", "kd", "cwd", "dkd", "c2vkd", "c2vkd+ce", "dml", "collab", "quarter-b0", "quarter-kd+unl",
            "quarter-c2vkd+unl"} <= names
    cwd = next(r for r in table if r.name == "cwd")
    assert cwd.opts == {"weight": "0.3", "feature": "true", "feat_weight": "5"}  # CIRKD's SegFormer-B0 weights


def test_gpu_recipe_refuses_without_cuda(rc: ModuleType, capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as e:
        rc.parse(["--gpu-recipe"])
    assert e.value.code == 2 and "--gpu-recipe needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_recipe_dry_run_on_cpu(rc: ModuleType, tmp_path: Path) -> None:
    """The recipe end to end (two spawned lanes: splits, teacher cache, train, cached KD with unlabeled images;
    then the report) for 2 iterations on CPU, on an 8-image synthetic set with a random teacher."""
    data = synthesize(tmp_path / "data", n_train=8, n_val=2, size=(32, 48), num_classes=3, seed=1)
    teacher = tmp_path / "t.safetensors"
    torch.manual_seed(0)
    save_checkpoint(teacher, create_model("deeplabv3-resnet18", num_classes=3),
                    CheckpointMeta(model="deeplabv3-resnet18", num_classes=3))
    out, docs = tmp_path / "runs", tmp_path / "results.md"
    code = rc.main(["--gpu-recipe", "--dry-run", "--out", str(out), "--data", str(data), "--teacher", str(teacher),
                    "--seeds", "0", "--only", "b0,kd,quarter-b0,quarter-kd+unl,transkd", "--docs", str(docs),
                    "--json", str(tmp_path / "results.json"), "--no-progress"])
    assert code == 0
    assert len(list((out / "data" / "camvid-quarter" / "images" / "train").iterdir())) == 2  # every 4th of 8
    assert len(list((out / "data" / "camvid-unlabeled").iterdir())) == 6
    text = docs.read_text()
    assert "| quarter-kd+unl | kd (cache) | 1/4 labelled + 3/4 unlabeled |" in text
    assert "| transkd |" in text and "not run: TransKD needs a transformer teacher" in text
    assert (out / "kd_s0" / "run.json").exists() and (out / "teacher-cache" / "cache.json").exists()
    # a finished run is only reused when it ran this protocol
    with pytest.raises(SystemExit, match="finished with iters=2"):
        rc.main(["--gpu-recipe", "--dry-run", "--spawn", "1", "--iters", "3", "--out", str(out), "--data", str(data),
                 "--teacher", str(teacher), "--seeds", "0", "--only", "b0", "--docs", str(docs), "--json",
                 str(tmp_path / "results.json"), "--no-progress"])
