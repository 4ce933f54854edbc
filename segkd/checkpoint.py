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
import math
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
        """The metadata of a file, checked against :func:`check_meta_schema` (one line naming ``source``)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SegkdError(f"{source}: segkd metadata is not valid JSON ({e.msg})") from None
        if not isinstance(data, dict):
            raise SegkdError(f"{source}: segkd metadata must be a JSON object, got {type(data).__name__}")
        check_meta_schema(data, source)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------------- the metadata schema
MAX_CLASSES = 65536  # the most a 16-bit label PNG can name; a crafted 10^12 would build a head of terabytes


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _rgb_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(_is_int(c) and 0 <= c <= 255 for c in v)


# field -> (test, what it must be); the type-only fields (nothing in them reaches an allocation or a model)
_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: isinstance(v, str) and bool(v), "a zoo model name"),
    "num_classes": (lambda v: _is_int(v) and 1 <= v <= MAX_CLASSES, f"an integer from 1 to {MAX_CLASSES}"),
    "class_names": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of names"),
    "palette": (lambda v: isinstance(v, list) and all(_rgb_list(c) for c in v), "a list of [r, g, b] (0..255)"),
    "mean": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_number, v)), "3 finite numbers"),
    "std": (lambda v: isinstance(v, list) and len(v) == 3 and all(_is_number(x) and x > 0 for x in v),
            "3 positive numbers"),
    "ignore_index": (_is_int, "an integer"),
    "model_kwargs": (lambda v: isinstance(v, dict), "a mapping of model options"),
    "args": (lambda v: isinstance(v, dict), "a mapping"),
    "metrics": (lambda v: isinstance(v, dict), "a mapping"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "segkd_version": (lambda v: isinstance(v, str), "a string"),
    "format_version": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
}


def check_meta_schema(data: dict[str, Any], source: str) -> None:
    """Refuse metadata a crafted or damaged file could carry, before anything is built from it: each field of
    :class:`CheckpointMeta` of its type and range, the class names and the palette one per class.

    Choice on unknown keys: a key this version does not know is ignored when the file's ``format_version`` is
    this one or older (newer segkd versions add descriptive keys, such as the trained input size, that an older
    reader can skip safely); a file of a newer format version is refused, since its known keys may mean something
    else. Unknown keys inside ``model_kwargs`` are never safe (they change the architecture): they are checked
    against the model's constructor by :func:`segkd.models.check_model_kwargs` when the model is built.
    """
    missing = {"model", "num_classes"} - set(data)
    if missing:
        raise SegkdError(f"{source}: segkd metadata lacks {', '.join(sorted(missing))}")
    for key, (ok, what) in _SCHEMA.items():
        if key in data and not ok(data[key]):
            raise SegkdError(f"{source}: metadata {key} must be {what}, got {_short(data[key])}")
    version = data.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise SegkdError(f"{source}: written in checkpoint format {version} by segkd {data.get('segkd_version', '?')}"
                         f"; this segkd {__version__} reads format {FORMAT_VERSION} and older: upgrade segkd")
    n = data["num_classes"]
    if data.get("class_names") and len(data["class_names"]) != n:
        raise SegkdError(f"{source}: metadata class_names has {len(data['class_names'])} names for {n} classes")
    if data.get("palette") and len(data["palette"]) < n:  # extra colours are unused; a missing one fails colorize
        raise SegkdError(f"{source}: metadata palette has {len(data['palette'])} colours for {n} classes")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


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
        from segkd.safeio import tmp_prefix

        fd, tmp_name = tempfile.mkstemp(prefix=tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
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


def load_state_checked(model: nn.Module, state: Mapping[str, Tensor], source: str, strict: bool = True,
                       exact_dtype: bool = True) -> None:
    """``load_state_dict`` with one-line errors naming the first bad key (both shapes on a mismatch, both dtypes
    when they differ). ``exact_dtype`` (segkd's own checkpoints): every tensor has its parameter's dtype, since
    ``load_state_dict`` would cast silently (an int32 relabel of float bytes evaluated as garbage). Without it
    (foreign weights: fp16 releases, torchvision files whose BatchNorm counters are float) a value is cast to its
    parameter's dtype, except integer or boolean tensors where the model has floating-point weights."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            continue
        if tuple(own[key].shape) != tuple(value.shape):
            raise SegkdError(
                f"{source}: key {key!r} has shape {tuple(value.shape)} but the model expects {tuple(own[key].shape)}"
            )
        want = own[key].dtype
        if value.dtype != want and (exact_dtype or want.is_floating_point and not value.dtype.is_floating_point):
            raise SegkdError(f"{source}: tensor {key!r} is {str(value.dtype).removeprefix('torch.')} but the model's "
                             f"parameter is {str(want).removeprefix('torch.')}")
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
    # torch < 2.6: "Unsupported global: GLOBAL x"; 2.6+: "Trying to load unsupported GLOBAL posix.system whose
    # module posix is blocked" (the os.system payload): both name the object the pickle would have called
    if m := re.search(r"GLOBAL ([\w.]+)", text):
        return (f"refused: it pickles the Python object {m[1]}, and segkd loads weights only, never code from a "
                f"file; {fix}")
    if m := re.search(r"WeightsUnpickler error: (.+?)(?: Check the documentation|$)", text):
        return (f"refused: not plain tensors (the weights-only unpickler stopped at: {m[1].strip()}), e.g. a raw "
                f"Python pickle; {fix}")
    return _torch_reason(text) or type(e).__name__


def _torch_reason(text: str) -> str:
    """torch's own reason without its generic preamble (the weights_only history lesson) and documentation link:
    the whole specific sentence, never cut mid-way."""
    text = re.sub(r"^Weights only load failed\..*?trusted source\.\s*", "", text)
    text = re.sub(r"Please file an issue .*?use case:\s*", "", text)
    text = re.sub(r"\s*Check the documentation of torch\.load.*$", "", text)
    return text.strip()


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
