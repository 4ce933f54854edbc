"""Self-describing checkpoints: safetensors weights with segkd's JSON metadata in the header.

A segkd checkpoint is one ``.safetensors`` file. Its header metadata holds one key, ``segkd``, whose value is the
JSON of :class:`CheckpointMeta` (model name and kwargs, classes, palette, input normalisation, ignore index, segkd
version, the producing command's arguments and metrics). Every command can therefore rebuild the model from the
file alone. Writes are atomic (temp file in the same folder, fsync, rename), so a crash never leaves a torn file.
Foreign ``.pth``/``.pt`` files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from segkd import __version__
from segkd.errors import SegkdError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMAT_VERSION = 1
META_KEY = "segkd"


def default_palette(n: int) -> list[list[int]]:
    """The PASCAL VOC bit-interleaved palette: distinct, deterministic colours for any class count."""
    palette = []
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette


@dataclass
class CheckpointMeta:
    """What a checkpoint says about itself. ``mean``/``std`` are for RGB scaled to [0, 1]. ``input_size`` is the
    size the model was trained and validated at (``{"crop": [h, w] | None, "resize": [h, w] | None, "val_labels":
    "resized" | "native"}``, :func:`segkd.shapes.trained_size`); empty in checkpoints written before it existed."""

    model: str
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    ignore_index: int = 255
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    input_size: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    segkd_version: str = __version__
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = [f"class{i}" for i in range(self.num_classes)]
        if not self.palette:
            self.palette = default_palette(self.num_classes)
        if len(self.class_names) != self.num_classes:
            raise SegkdError(f"{len(self.class_names)} class names given for {self.num_classes} classes")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str, source: str = "checkpoint") -> CheckpointMeta:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SegkdError(f"{source}: segkd metadata is not valid JSON ({e.msg})") from None
        known = {f.name for f in fields(cls)}
        missing = {"model", "num_classes"} - set(data)
        if missing:
            raise SegkdError(f"{source}: segkd metadata lacks {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in data.items() if k in known})


def _umask() -> int:
    """The process umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; the file must get what open() would give it
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:  # read-only, disk full...: name the target (not the temp file) and say what is left
        err = OSError(e.errno, e.strerror or str(e), str(path))
        err.add_note(f"the previous {path.name} is kept unchanged" if path.exists() else f"{path} was not written")
        raise err from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _plain_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # clone: safetensors refuses tensors that share storage; contiguous CPU copies are what it stores
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(path: str | Path, model: nn.Module | Mapping[str, Tensor], meta: CheckpointMeta) -> Path:
    """Write weights + metadata atomically. ``model`` may be a module or a state dict."""
    from safetensors.torch import save

    state = model.state_dict() if isinstance(model, nn.Module) else model
    data = save(_plain_state(state), metadata={META_KEY: meta.to_json()})
    return atomic_write_bytes(path, data)


def read_safetensors(path: str | Path, tensors: bool = True) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors (unless ``tensors=False``: header only) and raw metadata of a safetensors file, or a one-line error."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SegkdError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            data = {k: fh.get_tensor(k) for k in fh.keys()} if tensors else {}
    except Exception as e:  # safetensors raises its own error types for truncated/garbage files
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise SegkdError(f"{path}: not a readable safetensors file ({reason})") from None
    return data, meta


def _segkd_meta(raw: dict[str, str], path: str | Path) -> CheckpointMeta:
    if META_KEY not in raw:
        raise SegkdError(f"{path}: a safetensors file without segkd metadata; import it first with `segkd convert`")
    return CheckpointMeta.from_json(raw[META_KEY], source=str(path))


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], CheckpointMeta]:
    """Weights and metadata of a segkd checkpoint."""
    tensors, raw = read_safetensors(path)
    return tensors, _segkd_meta(raw, path)


def read_meta(path: str | Path) -> CheckpointMeta:
    """Only the metadata (reads the header, not the tensors)."""
    return _segkd_meta(read_safetensors(path, tensors=False)[1], path)


def load_state_checked(model: nn.Module, state: Mapping[str, Tensor], source: str, strict: bool = True) -> None:
    """``load_state_dict`` with one-line errors naming the first bad key (and both shapes on a mismatch)."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise SegkdError(
                f"{source}: key {key!r} has shape {tuple(value.shape)} but the model expects {tuple(own[key].shape)}"
            )
    if strict:
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing:
            raise SegkdError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing in all)")
        if unexpected:
            raise SegkdError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    model.load_state_dict(dict(state), strict=strict)


def load_refusal(e: Exception, fix: str = "save a state_dict of tensors (torch.save(model.state_dict(), path)) "
                 "instead") -> str:
    """What ``torch.load(weights_only=True)`` refused, in one short clause (its own message is a page long)."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())
    if m := re.search(r"Unsupported global: GLOBAL ([\w.]+)", text):
        return (f"refused: it pickles the Python object {m[1]}, and segkd loads weights only, never code from a "
                f"file; {fix}")
    if m := re.search(r"WeightsUnpickler error: (.+?)(?: Check the documentation|$)", text):
        return (f"refused: not plain tensors (the weights-only unpickler stopped at: {m[1].strip()}), e.g. a raw "
                f"Python pickle; {fix}")
    return text[:160] or type(e).__name__


def torch_load_weights(path: str | Path) -> dict[str, Any]:
    """A foreign ``.pth``/``.pt``/``.bin`` loaded safely (``weights_only=True``), or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise SegkdError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of raw pickles before refusing them
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise SegkdError(f"{path}: cannot be read as a PyTorch weights file ({load_refusal(e)})") from None
    if not isinstance(obj, dict):
        raise SegkdError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
