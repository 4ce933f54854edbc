"""examples/reproduce_camvid_short.py: seeds, run directories and the paired table cells (no training)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from conftest import load_example


@pytest.fixture(scope="module")
def rc() -> ModuleType:
    return load_example("reproduce_camvid_short.py")


def test_keys_and_dirs(rc: ModuleType, tmp_path: Path) -> None:
    assert rc.key("b0+kd", 0) == "b0+kd"
    assert rc.key("b0+kd", 2) == "b0+kd#s2"
    assert rc.key("teacher-vit", 2) == "teacher-vit"  # teachers run once, shared by every seed
    args = type("A", (), {"out": str(tmp_path)})()
    assert rc.run_dir(args, "b0+kd", 2) == tmp_path / "b0_kd_s2"
    assert rc.run_dir(args, "b0+kd", 0) == tmp_path / "b0_kd"


def test_jobs_run_teachers_once(rc: ModuleType) -> None:
    table = rc.rows("teacher.pth")
    jobs = [(row.name, seed) for row, seed in rc.jobs(table, [0, 1])]
    assert jobs[: len(table)] == [(row.name, 0) for row in table]
    second = [name for name, seed in jobs if seed == 1]
    assert "teacher-vit" not in second and "teacher-cnn" not in second
    assert second[0] == "b0" and "collab" in second


def test_cells_pair_by_seed(rc: ModuleType) -> None:
    results = {"b0": {"final_miou": 0.20}, "b0#s1": {"final_miou": 0.30},
               "b0+kd": {"final_miou": 0.25}, "b0+kd#s1": {"final_miou": 0.31}}
    kd = rc.over_seeds(results, "b0+kd", [0, 1])
    assert kd == [(0, 0.25), (1, 0.31)]
    assert rc.miou_cell(kd) == "28.00 (25.00 / 31.00)"
    assert rc.miou_cell(kd, spread=False) == "28.00"
    # paired: +5 at seed 0, +1 at seed 1 -> mean +3 (an unpaired mean difference would also be +3, but a missing
    # baseline seed must drop that seed, not compare against another seed's run)
    assert rc.delta_cell(kd, rc.over_seeds(results, "b0", [0, 1])) == "+3.00 (+5.00 / +1.00)"
    assert rc.delta_cell(kd, [(0, 0.20)]) == "+5.00"
    assert rc.delta_cell(kd, []) == ""
    assert rc.miou_cell([]) == "—"


def test_docs_keep_hand_written_findings(rc: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "results.md"
    rc.write_docs(path, "# table v1\n")
    assert path.read_text() == "# table v1\n"
    path.write_text(path.read_text() + rc.FINDINGS + "\nwhy C2VKD trails\n")
    rc.write_docs(path, "# table v2\n")
    assert path.read_text() == "# table v2\n\n" + rc.FINDINGS + "\nwhy C2VKD trails\n"
