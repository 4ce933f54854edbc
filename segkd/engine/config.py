"""Run configuration: :class:`TrainConfig` is the one definition of every ``train``/``distill`` option.

Each field carries its help text and CLI spelling (:func:`option`); ``segkd train`` and ``segkd distill`` generate
their options from the dataclass (:mod:`segkd.cliopts`), so an option is written once. A run can also be
described by an **experiment config file** (YAML, TOML or JSON: a mapping of option names to values, with
``method_opts`` a nested mapping), given as ``--config FILE``; flags typed on the command line override it. Every
run writes its resolved configuration to ``RUN_DIR/config.yaml``, so ``--config RUN_DIR/config.yaml --out NEW``
repeats it.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from segkd.data.datasets import check_name_suffixes
from segkd.engine.distributed import check_device
from segkd.engine.schedule import lr_factor
from segkd.engine.task import OptimConfig
from segkd.errors import SegkdError
from segkd.options import IMG_SUFFIX_HELP, SEG_SUFFIX_HELP, option
from segkd.shapes import parse_hw

CONFIG_FILE = "config.yaml"
CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")
# what a finished run may keep (--keep): the checkpoints and the resume state (all are written while it runs)
KEEP_CHOICES = ("best", "last", "resume")


# --seed: a signed 64-bit integer. torch.manual_seed takes [-2^63, 2^64); the run adds the rank, epoch and iteration
# to the seed, so the top half of torch's range is kept as headroom (a 23-digit seed was an OverflowError).
SEED_RANGE = (-(2**63), 2**63 - 1)


def max_workers() -> int:
    """The most DataLoader workers a run may ask for: 4 per logical CPU, at least 32. Each worker is a process
    holding a copy of the dataset object; far above the CPU count they only cost memory (``--workers 100000`` forked
    until 9 GB were gone)."""
    return max(32, 4 * (os.cpu_count() or 1))


def check_machine_values(workers: int | None = None, seed: int | None = None, device: str | None = None,
                         threads: int | None = None) -> None:
    """The range checks shared by every config (train, distill, eval, export): one line naming the option, before
    any process, thread or tensor is made."""
    if workers is not None and not 0 <= workers <= max_workers():
        raise SegkdError(f"--workers must be between 0 and {max_workers()} (4 per CPU on this machine), got {workers}")
    if threads is not None and not 1 <= threads <= max_workers():
        raise SegkdError(f"--threads must be between 1 and {max_workers()}, got {threads}")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise SegkdError(f"--seed must be a signed 64-bit integer ({SEED_RANGE[0]}..{SEED_RANGE[1]}), got {seed}")
    if device is not None:
        check_device(device)


@dataclass
class TrainConfig:
    """Everything a training run depends on; recorded in run.json, config.yaml, the resume file and every
    checkpoint."""

    model: str = option("segformer-b0", "Zoo model to train, e.g. segformer-b0.", "--model", "-m", required=True)
    data: str = option("synth", "Dataset root, or 'synth' for the built-in procedural dataset.", path="dir")
    data_format: str | None = option(None, "Dataset format (default: detected from the root).")
    img_suffix: str | None = option(None, IMG_SUFFIX_HELP)
    seg_suffix: str | None = option(None, SEG_SUFFIX_HELP)
    num_classes: int | None = option(None, "Classes, for the 'folder' format.")
    ignore_index: int = option(255, "Label value ignored by the loss and the metrics.")
    out: str = option("runs/train", "Run directory for checkpoints and logs.", "--out", "-o", path="out")
    iters: int = option(2000, "Optimiser steps.")
    batch: int = option(8, "Images per forward pass, summed over all processes.")
    accum: int = option(1, "Micro-batches accumulated per optimiser step.")
    optimizer: str = option("adamw", "adamw or sgd.")
    lr: float | None = option(None, "Peak LR (default 2e-4 adamw, 0.01 sgd).")
    wd: float | None = option(None, "Weight decay (default 0.01 adamw, 5e-4 sgd).")
    head_lr_mult: float | None = option(None, "LR multiplier of the decode head (default 10 adamw, 1 sgd).")
    momentum: float = option(0.9, "SGD momentum.")
    warmup: int = option(0, "Linear warm-up iterations.")
    warmup_ratio: float = option(1e-6, "LR factor at the start of the warm-up.")
    poly_power: float = option(1.0, "Power of the poly LR decay.")
    crop: str | None = option(None, "Random crop HxW (padded with the ignore index).")
    resize: str | None = option(None, "Resize images to HxW before augmenting and for validation.")
    scale: str = option("0.5,2.0", "Random rescale range MIN,MAX ('1' disables).")
    flip: bool = option(True, "Random horizontal flip.")
    jitter: bool = option(True, "Photometric jitter.")
    val_every: int = option(500, "Validate and checkpoint every N iterations (and at the end).")
    val_batch: int = option(1, "Validation images per forward pass.")
    log_every: int = option(10, "Log the training loss (metrics.jsonl, and a plain line when there is no progress "
                            "bar) every N iterations.", machine=True)
    amp: bool = option(False, "Mixed precision: bf16 on CPU, fp16 + grad scaler on CUDA.")
    channels_last: bool = option(False, "channels_last memory format.")
    clip_grad: float | None = option(None, "Clip the gradient norm of each part to X.")
    workers: int = option(2, "DataLoader worker processes.", machine=True)
    seed: int = option(0, "Seed of initialisation, data order and augmentation.")
    pretrained: str | None = option(None, "Local backbone weights file (never downloaded).", path="file")
    device: str = option("auto", "auto, cpu or cuda.", machine=True)
    sync_bn: bool = option(False, "SyncBatchNorm across processes under torchrun.")
    aux_weight: float = option(0.4, "Weight of DeepLabV3's auxiliary head loss (0 = no aux head).")
    train_split: str = option("train", "Split trained on.")
    val_split: str = option("val", "Split validated on.")
    val_labels: str = option("resized", "Score validation against labels 'resized' with --resize, or at their "
                             "'native' size (logits upsampled).")
    progress: bool = option(True, "A progress bar on a terminal; --no-progress prints plain log lines.",
                            machine=True)
    threads: int | None = option(None, "CPU threads for torch and an ONNX teacher's ONNX Runtime (default: theirs).",
                                 machine=True)
    keep: str = option("best,last,resume", "What a finished run keeps: best, last, resume (comma-separated); all "
                       "are written while it runs. resume.pt is about 3x a checkpoint.", machine=True)

    def check(self) -> None:
        """One-line errors for impossible values, before anything is built."""
        if not str(self.out).strip():
            raise SegkdError("--out must name a directory, got an empty string (it would write into the current "
                             "directory)")
        self.check_inputs()
        positive = {"iters": self.iters, "batch": self.batch, "accum": self.accum, "val_every": self.val_every,
                    "val_batch": self.val_batch, "log_every": self.log_every}
        for name, value in positive.items():
            if value < 1:
                raise SegkdError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        check_machine_values(self.workers, self.seed, self.device, self.threads)
        self.kept()
        for f in fields(self):  # nan/inf reach the optimiser or the loss otherwise (the CLI refuses them earlier)
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SegkdError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise SegkdError(f"--clip-grad must be > 0, got {self.clip_grad}")
        if self.aux_weight < 0:
            raise SegkdError(f"--aux-weight must be >= 0, got {self.aux_weight}")
        lr_factor(0, self.iters, self.warmup, self.poly_power, self.warmup_ratio)
        for opt in ("crop", "resize"):
            if getattr(self, opt) is not None:
                parse_hw(getattr(self, opt), f"--{opt}")
        parse_scale(self.scale)
        check_name_suffixes(self.img_suffix, self.seg_suffix)
        if self.val_labels not in ("resized", "native"):
            raise SegkdError(f"--val-labels must be resized or native, got {self.val_labels!r}")

    def check_inputs(self) -> None:
        """Every input path option (``option(path="file"|"dir")``) names what exists; the error says when the
        value came from a ``--config`` file."""
        for f in fields(self):
            kind, value = f.metadata.get("path"), getattr(self, f.name)
            if kind not in ("file", "dir") or value is None or (f.name == "data" and value == "synth"):
                continue
            path = Path(value)
            if path.is_dir() if kind == "dir" else path.is_file():
                continue
            what = "dataset folder" if f.name == "data" else "folder" if kind == "dir" else "file"
            hint = " (use --data synth for the built-in synthetic set)" if f.name == "data" else ""
            found = "is not a " + ("folder" if kind == "dir" else "file") if path.exists() else "not found"
            raise SegkdError(f"{flag_of(f)} {value}{self.origin(f.name)}: {what} {found}{hint}")

    def origin(self, name: str) -> str:
        """`` (from --config FILE ...)`` when the value of ``name`` came from a config file (for error lines)."""
        source = getattr(self, "sources", {}).get(name)
        return f" (from {source}; relative paths are read from the current directory)" if source else ""

    def kept(self) -> set[str]:
        """The ``--keep`` choices as a set (one-line error for an unknown or empty one)."""
        items = {k.strip() for k in str(self.keep).split(",") if k.strip()}
        bad = sorted(items - set(KEEP_CHOICES))
        if bad or not items:
            raise SegkdError(f"--keep must be a comma-separated list of {', '.join(KEEP_CHOICES)}, got {self.keep!r}")
        return items

    def optim(self) -> OptimConfig:
        return OptimConfig.make(self.optimizer, self.lr, self.wd, self.head_lr_mult, momentum=self.momentum)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def flag_of(f: Any) -> str:
    """The long CLI flag of a config field (``--student`` for distill's ``model``)."""
    longs = [x for x in f.metadata.get("flags", ()) if x.startswith("--")]
    return max(longs, key=len) if longs else f"--{f.name.replace('_', '-')}"


def parse_scale(text: str) -> tuple[float, float]:
    """``"0.5,2.0"`` -> ``(0.5, 2.0)``; ``"1"`` or ``"1,1"`` disables rescaling."""
    try:
        vals = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise SegkdError(f"--scale must be MIN,MAX (e.g. 0.5,2.0), got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or not all(map(math.isfinite, vals)) or vals[0] <= 0 or not vals[0] <= vals[1] <= 16:
        raise SegkdError(f"--scale must be MIN,MAX with 0 < MIN <= MAX <= 16, got {text!r}")
    return vals[0], vals[1]


def machine_options(cls: type = TrainConfig) -> tuple[str, ...]:
    """The options that describe the machine, not the run: on ``--resume`` they come from the new command line."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("machine"))


MACHINE_OPTIONS = machine_options()


# ------------------------------------------------------------------------------------------- config files
def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML/TOML/JSON config file, or a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SegkdError(f"--config {path}: file not found" if not path.exists() else
                         f"--config {path}: not a file")
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        raise SegkdError(f"--config {path}: expected a .yaml, .yml, .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SegkdError(f"{path}: not a text file (UTF-8 expected)") from None
    kind = {".yml": "YAML", ".yaml": "YAML", ".toml": "TOML", ".json": "JSON"}[path.suffix.lower()]
    try:
        data = _parse(text, kind)
    except SegkdError:
        raise
    except Exception as e:  # each parser has its own error type; all become one line naming the file
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise SegkdError(f"{path}: not valid {kind} ({reason})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SegkdError(f"{path}: expected a mapping of option names to values, got a {type(data).__name__}")
    return data


def _parse(text: str, kind: str) -> Any:
    if kind == "YAML":

        return yaml.safe_load(text)  # safe_load: plain data only, never a Python object
    if kind == "TOML":
        try:
            import tomllib  # optional: the stdlib has it from Python 3.11
        except ImportError:  # Python 3.10
            raise SegkdError("TOML config files need Python 3.11 or newer (tomllib); use YAML or JSON") from None
        return tomllib.loads(text)
    return json.loads(text)


def config_values(cls: type, data: dict[str, Any], source: str,
                  siblings: Callable[[], Sequence[type]] | None = None) -> dict[str, Any]:
    """``data`` (a config file's mapping) checked against the fields of ``cls`` and converted to their types;
    unknown keys and wrong types are one-line errors naming ``source`` and the key. ``siblings`` gives the config
    classes of the other run commands (only called for an unknown key: their modules are not imported otherwise),
    so a distill option in a train file says so."""
    hints = typing.get_type_hints(cls)
    names = {f.name: f.name for f in fields(cls)}
    # a field may also be named by its flag: `student` (distill's --student) is the field `model`
    names.update({flag[2:].replace("-", "_"): f.name for f in fields(cls) for flag in f.metadata.get("flags", ())
                  if flag.startswith("--")})
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = names.get(str(raw_key).replace("-", "_"))
        if key is None:
            key = str(raw_key).replace("-", "_")
            hint = _unknown_hint(cls, key, siblings() if siblings else ())
            raise SegkdError(f"{source}: unknown option {raw_key!r} for {_command_of(cls)}{hint}")
        if key in out:
            raise SegkdError(f"{source}: option {key!r} is given twice (as {raw_key!r} too)")
        out[key] = _coerce(value, hints[key], f"{source}: {key}")
    return out


def _command_of(cls: type) -> str:
    return "segkd distill" if any(f.name == "method" for f in fields(cls)) else "segkd train"


def _unknown_hint(cls: type, key: str, siblings: Sequence[type]) -> str:
    for other in siblings:
        if other is not cls and key in {f.name for f in fields(other)}:
            return f" (a {_command_of(other).split()[-1]} option: run this file with {_command_of(other)} --config)"
    close = difflib.get_close_matches(key, [f.name for f in fields(cls)], n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """A config-file value as the field type: YAML/TOML give native types; numbers also come as strings (YAML
    reads ``6e-4`` as a string) and sizes as numbers (``crop: 64``)."""
    args = typing.get_args(typ)
    if type(None) in args:
        if value is None:
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise SegkdError(f"{where} must be true or false, got {value!r}")
    if typ in (int, float):
        kind = "an integer" if typ is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise SegkdError(f"{where} must be {kind}, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise SegkdError(f"{where} must be {kind}, got {value!r}") from None
        if not math.isfinite(number):
            raise SegkdError(f"{where} must be a finite number, got {value!r}")
        if typ is float:
            return number
        if not number.is_integer():
            raise SegkdError(f"{where} must be an integer, got {value!r}")
        return int(value) if isinstance(value, int) else int(number)
    if typ is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise SegkdError(f"{where} must be a string, got {value!r}")
        return str(value)
    if typing.get_origin(typ) is dict or typ is dict:
        if not isinstance(value, dict):
            raise SegkdError(f"{where} must be a mapping of KEY: VALUE, got {value!r}")
        return {str(k): _option_text(v, f"{where}.{k}") for k, v in value.items()}
    raise SegkdError(f"{where}: unsupported value {value!r}")


def _option_text(value: Any, where: str) -> str:
    """A method option from a config file as the text ``--method-opt KEY=VALUE`` would give (one converter)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)
    raise SegkdError(f"{where} must be a number, string, boolean or list of numbers, got {value!r}")
