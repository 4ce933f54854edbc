"""docs/reproduced/: runs of the protocol trained a second time on a fresh machine reproduce their committed
summaries exactly (initial weights, every periodic val mIoU, per-class IoU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RERUNS = sorted((ROOT / "docs" / "reproduced").glob("*.json"))


def test_there_are_reruns_to_compare() -> None:
    assert len(RERUNS) >= 2


@pytest.mark.parametrize("rerun", RERUNS, ids=lambda p: p.stem)
def test_a_rerun_equals_its_committed_run(rerun: Path) -> None:
    again = json.loads(rerun.read_text())
    first = json.loads((ROOT / "docs" / "runs" / rerun.name).read_text())
    assert again["code"]["commit"] != first["code"]["commit"]  # another code commit ran it
    assert again["initial_weights_sha256"] == first["initial_weights_sha256"]
    assert again["protocol_config"] == first["protocol_config"]
    for role, r in first["roles"].items():
        assert again["roles"][role]["curve"] == r["curve"]  # every periodic validation, exactly
        assert again["roles"][role]["per_class_iou"] == r["per_class_iou"]
        assert again["roles"][role]["miou"] == r["miou"]
