"""Read a finished or unfinished run directory (run.json, metrics.jsonl, distill.json) into one plain record."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segkd.errors import SegkdError
from segkd.runs.rundir import METRICS_FILE, RUN_FILE, ckpt_name

DISTILL_FILE = "distill.json"


@dataclass
class Run:
    """What one run directory holds. ``summary`` is ``None`` while the run is unfinished (or was killed)."""

    path: Path
    name: str
    command: str
    config: dict[str, Any]
    classes: list[str]
    deploy_params: dict[str, int]
    summary: dict[str, Any] | None
    distill: dict[str, Any] | None
    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def method(self) -> str:
        """The distillation method, or ``supervised`` for a ``segkd train`` run."""
        return str(self.config.get("method") or "supervised")

    @property
    def last_iter(self) -> int:
        """The last iteration the run logged (its summary's count when finished)."""
        if self.summary is not None:
            return int(self.summary.get("iterations", 0))
        its = [int(r.get("iter", 0)) for r in self.train + self.val]
        return max(its, default=0)

    @property
    def models(self) -> list[str]:
        """Deploy model names (``student``, and ``peer`` for online methods), in the order the run lists them."""
        names = list(self.deploy_params)
        for rec in self.val:
            if rec.get("model") and rec["model"] not in names:
                names.append(rec["model"])
        return names or ["student"]

    def label(self, model: str) -> str:
        """The run's name, suffixed with the model when the run has more than one deploy model."""
        return self.name if len(self.models) == 1 else f"{self.name}:{model}"

    def val_of(self, model: str) -> list[dict[str, Any]]:
        return [r for r in self.val if r.get("model", "student") == model]

    def final(self, model: str) -> dict[str, Any] | None:
        """The final validation metrics: the summary's, else the last val record logged (unfinished runs)."""
        if self.summary is not None and model in self.summary.get("final", {}):
            return self.summary["final"][model]
        recs = self.val_of(model)
        return recs[-1] if recs else None

    def best(self, model: str) -> dict[str, Any] | None:
        """``{"miou", "iteration", "per_class_iou"}`` of the best validation: the summary's pick when finished, else
        the highest val record; ``per_class_iou`` comes from that iteration's val record (``None`` if not logged)."""
        recs = self.val_of(model)
        pick = (self.summary or {}).get("best", {}).get(model)
        if pick is None:
            scored = [r for r in recs if r.get("miou") is not None]
            if not scored:
                return None
            top = max(scored, key=lambda r: r["miou"])
            pick = {"miou": top["miou"], "iteration": top["iter"]}
        at = next((r for r in recs if r.get("iter") == pick["iteration"]), None)
        return {"miou": pick["miou"], "iteration": pick["iteration"],
                "per_class_iou": at.get("per_class_iou") if at else None}

    def checkpoint(self, model: str, kind: str = "best") -> Path | None:
        """``best``/``last`` checkpoint of ``model`` if it exists (an unfinished run may not have one yet)."""
        path = self.path / ckpt_name(model, kind)
        return path if path.is_file() else None

    def size(self) -> tuple[int, int]:
        """The input size the run trained at: its crop, else its resize, else 512x512 (as ``distill.json``)."""
        from segkd.shapes import parse_hw

        return parse_hw(self.config.get("crop") or self.config.get("resize") or "512x512", "--crop")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SegkdError(f"{path}: {what} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise SegkdError(f"{path}: {what} is not a JSON object")
    return doc


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train records, val records)`` of metrics.jsonl; a torn last line (a killed run) is skipped."""
    train, val = [], []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("type") == "train":
            train.append(rec)
        elif isinstance(rec, dict) and rec.get("type") == "val":
            val.append(rec)
    return train, val


def read_run(path: str | Path) -> Run:
    """One run directory, or a one-line error naming it when it is not a segkd run."""
    path = Path(path)
    if not path.is_dir():
        raise SegkdError(f"{path}: not a run directory (no such folder)")
    for needed in (RUN_FILE, METRICS_FILE):
        if not (path / needed).is_file():
            raise SegkdError(f"{path}: not a segkd run directory (no {needed})")
    doc = _read_json(path / RUN_FILE, RUN_FILE)
    if not isinstance(doc.get("config"), dict):
        raise SegkdError(f"{path / RUN_FILE}: no 'config' object; not written by segkd train/distill")
    distill = _read_json(path / DISTILL_FILE, DISTILL_FILE) if (path / DISTILL_FILE).is_file() else None
    train, val = read_metrics(path / METRICS_FILE)
    return Run(path=path, name=path.resolve().name, command=str(doc.get("command", "")), config=doc["config"],
               classes=list(doc.get("classes") or []), deploy_params=dict(doc.get("deploy_params") or {}),
               summary=doc.get("summary"), distill=distill, train=train, val=val)


def read_runs(paths: list[str | Path]) -> list[Run]:
    """Every run, named by its folder (with its parent folder too where two runs share a name)."""
    runs = [read_run(p) for p in paths]
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
    return runs
