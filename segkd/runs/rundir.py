"""A run directory's lifecycle: what may be written where, and which run a resume state continues.

Run directory::

    run.json          run id, command, provenance, the config, parameter counts, (at the end) the summary
    config.yaml       the resolved options (input paths absolute): ``--config RUN/config.yaml --out NEW`` repeats it
    metrics.jsonl     one JSON object per line ({"type": "train"|"val"|"error", "iter", ...})
    last.safetensors  best.safetensors        (peer_last / peer_best for a second deploy model)
    resume.pt         everything --resume needs for an exact continuation (bound to the run by its run id)

Rules (docs/faults.md, "Run directories and resume"), each a one-line refusal before anything is written:

* ``--out DIR`` must be new, empty, or a segkd run of the same command that stopped before its first resume state
  (restarted from iteration 0). A directory holding anything else is the user's: it is refused, naming what is
  there; a finished run or one with a resume state is refused too (continue it with ``--resume``).
* ``--config FILE`` is never overwritten: a run whose ``--out`` would write ``FILE`` as its config.yaml is refused.
* A resume state continues only the run that wrote it: every run gets a random id, written to run.json,
  config.yaml and resume.pt; a resume.pt whose id is not its directory's run.json's (a file copied from another
  run), or that sits without a run.json, is refused. A run of the other command is named as such.
* ``--resume`` restores the run's own settings; only what is typed with it changes: the machine options
  (``--workers``, ``--device``, ...) and ``--iters N``, which extends (or shortens) the schedule: the poly LR is
  then recomputed over N iterations from the current one on (the note says the LR before and after).

Choices: the id is a random 128-bit hex string (uuid4), not a hash of the config, because two runs of the same
config in two folders are two runs. Directories and states written before run ids existed (no id on either side)
are accepted as before.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from segkd.checkpoint import atomic_write_text
from segkd.engine.config import CONFIG_FILE, MACHINE_OPTIONS, TrainConfig
from segkd.engine.hooks import METRICS_FILE, RUN_FILE, ckpt_name
from segkd.engine.schedule import lr_factor
from segkd.engine.state import RESUME_FILE, load_resume, resolve_resume_path
from segkd.errors import SegkdError
from segkd.runlock import LOCK_FILE, acquire_run_lock
from segkd.safeio import os_error_message, remove_orphan_tmps

__all__ = ["CONFIG_FILE", "METRICS_FILE", "RESUME_FILE", "RUN_FILE", "RunStart", "ckpt_name", "finished_run",
           "locked", "open_run", "run_dir_of", "write_resolved_config"]


@dataclass
class RunStart:
    """What a run starts from: the config to run with, the resume state (None: from iteration 0) and what binds
    the run (``run_info``: its id and command, saved in run.json and resume.pt)."""

    cfg: TrainConfig
    state: dict[str, Any] | None
    run_info: dict[str, Any] = field(default_factory=dict)


def command_kind(command: str) -> str:
    """``segkd train`` or ``segkd distill`` from a run's command (``segkd distill --method kd``)."""
    return " ".join(str(command).split()[:2])


def note(text: str) -> None:
    """One line on stderr from the process that owns the run directory (rank 0 under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, file=sys.stderr, flush=True)


def run_dir_of(cfg: TrainConfig | None, resume: str | Path | None) -> Path:
    """The directory a run writes: ``--out``, or the ``--resume`` directory (the folder of a resume file)."""
    if resume is None:
        assert cfg is not None
        return Path(cfg.out)
    return Path(resume).parent if Path(resume).is_file() else Path(resume)


def segkd_run(run_dir: Path) -> dict[str, Any] | None:
    """The run.json of a segkd run in ``run_dir``, or None when there is none (or it is not segkd's)."""
    try:
        doc = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and str(doc.get("command", "")).startswith("segkd ") and isinstance(
        doc.get("config"), dict)
    return doc if ok else None


def finished_run(out: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` of a run directory whose run has finished (it then holds a ``summary``), else None."""
    doc = segkd_run(Path(out))
    return doc if doc is not None and "summary" in doc else None


@contextmanager
def locked(run_dir: Path, option: str) -> Iterator[None]:
    """Hold the run directory's lock (a second run on it is refused) with the temp files of writes killed earlier
    removed; an ``OSError`` inside (read-only, disk full) becomes one line saying what is kept."""
    lock = acquire_run_lock(run_dir, option, enabled=int(os.environ.get("RANK", "0")) == 0)
    try:
        if lock.fd is not None:
            count, size = remove_orphan_tmps(run_dir)
            if count:
                note(f"note: removed {count} temp file(s) ({size / 1e6:.1f} MB) left in {run_dir} by interrupted "
                     "writes")
        yield
    except OSError as e:
        raise SegkdError(f"{os_error_message(e)}; {_kept_state(run_dir)}") from None
    finally:
        lock.release()


def _kept_state(run_dir: Path) -> str:
    """What a run stopped by an OSError leaves to continue from (for its one-line error)."""
    path = run_dir / RESUME_FILE
    try:
        iteration = load_resume(path)["iteration"] if path.is_file() else None
    except SegkdError:
        iteration = None
    if iteration is None:
        return "training stopped before any resume state was saved"
    return f"training stopped; {path} (iteration {iteration}) is intact: continue with --resume {run_dir}"


# ------------------------------------------------------------------------------------------------ a new run
def open_run(cfg: TrainConfig, resume: str | Path | None, command: str, config_file: str | Path | None = None,
             overrides: dict[str, Any] | None = None) -> RunStart:
    """The checked start of a run of ``command`` (``segkd train`` / ``segkd distill``): see the module docstring.

    ``overrides`` are the options typed with ``--resume`` (machine options and ``iters``); None (the Python API)
    takes every machine option from ``cfg``, as segkd always did."""
    if resume is None:
        return _fresh(cfg, command, config_file)
    return _resumed(cfg, Path(resume), command, overrides)


def _fresh(cfg: TrainConfig, command: str, config_file: str | Path | None) -> RunStart:
    cfg.check()
    out = Path(cfg.out)
    if config_file is not None and Path(config_file).resolve() == (out / CONFIG_FILE).resolve():
        raise SegkdError(f"--config {config_file} is the config.yaml this run would write into --out {out}; "
                         "choose another --out (a run never overwrites the file it was given)")
    doc = _own_run(out, command)
    if doc is not None:
        _refuse_finished(out, doc, "choose another --out")
        if (out / RESUME_FILE).exists():
            raise SegkdError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
        note(f"note: {out} holds a run stopped before its first resume state was saved: starting it again from "
             "iteration 0 (its checkpoints will be replaced)")
    resolve_paths(cfg)
    return RunStart(cfg, None, {"run_id": uuid.uuid4().hex, "command": command})


def _own_run(out: Path, command: str) -> dict[str, Any] | None:
    """The run.json of the ``command`` run in ``out``; None for a new or empty directory; a refusal for a
    directory holding anything else (item 1 of issue 23: the user's files are never replaced)."""
    doc = segkd_run(out)
    if doc is None:
        present = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
        if present:
            shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
            raise SegkdError(f"--out {out} is not empty and holds no segkd run ({shown}); choose a new or empty "
                             "directory")
        return None
    kind = command_kind(doc["command"])
    if kind != command:
        raise SegkdError(f"--out {out} holds a {kind} run, not a {command} one; choose another --out")
    return doc


def _refuse_finished(run_dir: Path, doc: dict[str, Any], advice: str) -> None:
    """A finished run is never restarted over its results (whether or not ``--keep`` kept its resume state)."""
    if "summary" in doc:
        kept = "" if (run_dir / RESUME_FILE).exists() else " (its resume state was not kept)"
        raise SegkdError(f"{run_dir} holds a finished run{kept}; {advice}")


def resolve_paths(cfg: TrainConfig) -> None:
    """Make the path options of ``cfg`` (``option(path=...)``: inputs and the teacher cache) absolute, so run.json,
    config.yaml and resume.pt repeat and resume from any directory (``out`` stays as typed: it is the run itself,
    and a repeat names a new one)."""
    for f in fields(cfg):
        kind, value = f.metadata.get("path"), getattr(cfg, f.name)
        if value is None or kind is None or f.name == "out" or (f.name == "data" and value == "synth"):
            continue
        setattr(cfg, f.name, str(Path(value).expanduser().resolve()))


# ---------------------------------------------------------------------------------------------------- resume
def _resumed(cfg: TrainConfig, resume: Path, command: str, overrides: dict[str, Any] | None) -> RunStart:
    run_dir = run_dir_of(cfg, resume)
    doc = segkd_run(run_dir)
    if doc is not None and command_kind(doc["command"]) != command:
        kind = command_kind(doc["command"])
        raise SegkdError(f"{run_dir} holds a {kind} run; continue it with {kind} --resume {run_dir}")
    if resume.is_dir() and not (resume / RESUME_FILE).exists() and doc is not None:
        _refuse_finished(run_dir, doc, "it cannot be continued")
        return _restart(cfg, run_dir, doc, overrides, command)
    path = resolve_resume_path(resume)
    state = load_resume(path)
    run_info = _check_binding(state, doc, run_dir, path, command)
    saved = _saved_config(cfg, state["config"], overrides)
    saved.out = str(run_dir)
    saved.check()
    done = int(state["iteration"])
    if overrides and "iters" in overrides and done < int(overrides["iters"]) != int(state["config"]["iters"]):
        run_info = _extend(run_info, doc, state, saved, run_dir)
    elif overrides and "iters" in overrides and int(overrides["iters"]) <= done:
        raise SegkdError(f"--iters {overrides['iters']}: the run in {run_dir} is already at iteration {done}; give "
                         f"more than {done} to extend its schedule")
    elif done >= saved.iters:
        raise SegkdError(f"{run_dir}: the run already finished ({done}/{saved.iters} iterations); extend it with "
                         f"--resume {run_dir} --iters N (N > {done})")
    return RunStart(saved, state, run_info)


def _saved_config(cfg: TrainConfig, saved: dict[str, Any], overrides: dict[str, Any] | None) -> TrainConfig:
    """The run's own config with only ``overrides`` applied (None: every machine option from ``cfg``)."""
    out = type(cfg).from_dict(saved)
    chosen = {name: getattr(cfg, name) for name in MACHINE_OPTIONS} if overrides is None else overrides
    for name, value in chosen.items():
        setattr(out, name, value)
    return out


def _state_command(state: dict[str, Any]) -> str:
    """The command that wrote a resume state (states from before run ids: told apart by their config)."""
    run = state.get("run") if isinstance(state.get("run"), dict) else {}
    if run.get("command"):
        return str(run["command"])
    return "segkd distill" if "method" in state.get("config", {}) else "segkd train"


def _check_binding(state: dict[str, Any], doc: dict[str, Any] | None, run_dir: Path, path: Path,
                   command: str) -> dict[str, Any]:
    """The run_info of the run ``state`` continues, or a one-line refusal of a stranger (see the module
    docstring)."""
    run = dict(state.get("run") or {}) if isinstance(state.get("run"), dict) else {}
    kind = _state_command(state)
    if doc is None:
        raise SegkdError(f"{path}: no {RUN_FILE} beside it, so it cannot be told to belong to {run_dir}; a resume "
                         "state continues only in the run directory that wrote it")
    sid, did = run.get("run_id"), doc.get("run_id")
    if sid != did:
        raise SegkdError(f"{path} belongs to another run ({kind}, run id {sid or 'none'}) than {run_dir / RUN_FILE} "
                         f"(run id {did or 'none'}); a resume state continues only the run that wrote it")
    if kind != command:
        raise SegkdError(f"{run_dir} holds a {kind} run; continue it with {kind} --resume {run_dir}")
    return {"run_id": sid or uuid.uuid4().hex, "command": command, **{k: v for k, v in doc.items()
                                                                      if k == "extensions"}}


def _extend(run_info: dict[str, Any], doc: dict[str, Any] | None, state: dict[str, Any], cfg: TrainConfig,
            run_dir: Path) -> dict[str, Any]:
    """``--resume DIR --iters N``: the schedule is recomputed over N iterations; say how the LR continues and
    record it in run.json (``extensions``)."""
    done, old = int(state["iteration"]), int(state["config"]["iters"])
    before = lr_factor(done, old, cfg.warmup, cfg.poly_power, cfg.warmup_ratio)
    after = lr_factor(done, cfg.iters, cfg.warmup, cfg.poly_power, cfg.warmup_ratio)
    note(f"note: --iters {cfg.iters}: {run_dir} continues at iteration {done} with its schedule changed from {old} "
         f"to {cfg.iters} iterations; the poly LR is recomputed over {cfg.iters} (x{before:.3g} -> x{after:.3g} of "
         f"the peak LR at iteration {done}, 0 at {cfg.iters}), so it will not equal a run started with --iters "
         f"{cfg.iters}")
    history = list((doc or {}).get("extensions", []))
    return {**run_info, "extensions": [*history, {"at": done, "from": old, "to": cfg.iters,
                                                  "lr_factor": [before, after]}]}


def _restart(cfg: TrainConfig, run_dir: Path, doc: dict[str, Any], overrides: dict[str, Any] | None,
             command: str) -> RunStart:
    """``--resume`` of a run killed before its first resume state (e.g. during its first checkpoint): what it did
    cannot be continued exactly, so it restarts from iteration 0 with the settings its run.json recorded."""
    try:
        saved = _saved_config(cfg, doc["config"], overrides)
    except (KeyError, TypeError) as e:
        raise SegkdError(f"{run_dir / RUN_FILE}: not a readable segkd run.json ({e})") from None
    saved.out = str(run_dir)
    saved.check()
    note(f"note: {run_dir} has no resume state (the run stopped before its first one was saved): restarting it "
         "from iteration 0 with the settings of its run.json")
    return RunStart(saved, None, {"run_id": doc.get("run_id") or uuid.uuid4().hex, "command": command})


# ------------------------------------------------------------------------------------------------ config.yaml
def write_resolved_config(cfg: TrainConfig, run_dir: str | Path, command: str, run_id: str | None = None) -> Path:
    """``RUN_DIR/config.yaml``: every option of the run as resolved (defaults, file, flags; input paths absolute),
    atomically written; the run id in a comment (a config file holds options only)."""
    path = Path(run_dir) / CONFIG_FILE
    header = (f"# {command}: the resolved configuration of this run. Repeat it with\n"
              f"#   {command.split(' --')[0]} --config {path} --out NEW_RUN_DIR\n")
    if run_id:
        header += f"# run_id: {run_id}\n"
    if any(f.name == "method" for f in fields(cfg)):
        header += "# model is the student (--student)\n"
    body = yaml.safe_dump({f.name: getattr(cfg, f.name) for f in fields(cfg)}, sort_keys=False,
                          default_flow_style=False, allow_unicode=True)
    return atomic_write_text(path, header + body)
