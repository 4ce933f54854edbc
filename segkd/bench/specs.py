"""Parsing what ``segkd bench`` is asked to measure: models (zoo names, checkpoints, ONNX files) and input shapes."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from segkd import shapes
from segkd.errors import SegkdError

BACKENDS = ("torch", "torch-compile", "onnxruntime")


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``--input``: ``1x3x512x1024`` (B x C x H x W) or ``512x1024`` (batch 1, RGB)."""
    return shapes.parse_shape(text, "--input", allow_hw=True)


def parse_batches(text: str | None) -> list[int] | None:
    """``"1,8"`` -> [1, 8]; ``None`` keeps each ``--input``'s own batch size."""
    if text is None or not text.strip():
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit()) or int(part) < 1:  # isdigit() alone takes '²', int() does not
            raise SegkdError(f"--batch {text!r}: expected positive integers separated by commas (e.g. 1,8)")
        if int(part) not in out:
            out.append(int(part))
    return out


def expand_inputs(inputs: list[str], batches: list[int] | None) -> list[tuple[int, int, int, int]]:
    """Every ``--input`` at every ``--batch`` (or its own batch), duplicates removed, order kept."""
    out: list[tuple[int, int, int, int]] = []
    for text in inputs:
        b, c, h, w = parse_shape(text)
        for bb in batches or [b]:
            shapes.check_pixels(h, w, f"--batch {bb} with --input {text}", batch=bb)
            s = (bb, c, h, w)
            if s not in out:
                out.append(s)
    return out


def parse_backends(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        for b in item.split(","):
            b = b.strip().lower()
            if not b:
                continue
            if b not in BACKENDS:
                raise SegkdError(f"--backend {b!r}: choose from {', '.join(BACKENDS)}")
            if b not in out:
                out.append(b)
    if not out:
        raise SegkdError("--backend: give at least one of " + ", ".join(BACKENDS))
    return out


def parse_nonnegative(text: str, option: str, kind: str = "number", example: str = "",
                      shown: str | None = None) -> float:
    """A finite number >= 0 (a gate's limit); one line naming ``option`` and ``shown`` (default ``text``)."""
    shown = text if shown is None else shown
    try:
        value = float(text)
    except ValueError:
        raise SegkdError(f"{option} {shown!r}: expected a {kind}{example}") from None
    if not (math.isfinite(value) and value >= 0):
        raise SegkdError(f"{option} {shown!r}: must be a finite {kind} >= 0")
    return value


def parse_percent(text: str) -> float:
    """``"10%"`` or ``"10"`` -> 0.10 (always percent)."""
    raw = text.strip().rstrip("%").strip()
    return parse_nonnegative(raw, "--max-regression", "percentage", " such as 10%", shown=text) / 100.0


@dataclass
class ModelSpec:
    """One MODEL argument, resolved. ``module`` is set for zoo names and checkpoints; ``onnx_path`` for ONNX.
    ``name`` is the model's zoo name (for an ONNX file without segkd metadata, its file name) until
    :func:`name_models` makes the names of one run distinct."""

    arg: str
    name: str
    source: str  # "zoo" | "checkpoint" | "onnx"
    num_classes: int | None
    architecture: str | None
    module: nn.Module | None = None
    onnx_path: Path | None = None
    path: Path | None = None
    notes: list[str] = field(default_factory=list)
    onnx_meta: dict[str, Any] | None = None


def _looks_like_path(arg: str) -> bool:
    return "/" in arg or "\\" in arg or Path(arg).suffix.lower() in (".onnx", ".safetensors", ".pth", ".pt", ".bin")


def resolve_model(arg: str, num_classes: int | None) -> ModelSpec:
    """A zoo name (aliases allowed), a segkd ``.safetensors`` checkpoint or an ``.onnx`` file, or a one-line error."""
    from segkd.models import MODELS, create_model

    path = Path(arg)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise SegkdError(f"{arg}: ONNX file not found")
        arch, k, meta = _onnx_architecture(path)
        return ModelSpec(arg, arch or path.name, "onnx", k, arch, onnx_path=path, path=path, onnx_meta=meta)
    if path.is_file() or _looks_like_path(arg):
        if not path.is_file():
            raise SegkdError(f"{arg}: checkpoint file not found")
        if path.suffix.lower() != ".safetensors":
            raise SegkdError(f"{arg}: not a segkd checkpoint (.safetensors) or an .onnx file; "
                             "import foreign checkpoints with `segkd convert`")
        from segkd.models.loading import load_model

        model = load_model(path).deploy_form()  # timed and counted as deployed (reparameterised encoders fused)
        meta = model.segkd_meta  # type: ignore[attr-defined]
        if num_classes is not None and num_classes != meta.num_classes:
            raise SegkdError(f"--num-classes {num_classes}: {arg} has {meta.num_classes} classes")
        return ModelSpec(arg, meta.model, "checkpoint", meta.num_classes, meta.model, module=model, path=path)
    name = MODELS.canonical(arg)
    k = 19 if num_classes is None else num_classes
    return ModelSpec(arg, name, "zoo", k, name, module=create_model(name, num_classes=k).deploy_form())


def name_models(specs: list[ModelSpec]) -> None:
    """Make the names of one run distinct: where rows share a model name (two checkpoints of one model, a zoo name
    and a checkpoint of it), each file's name gets the shortest suffix of its path that tells it from the other
    files of that name, e.g. ``deeplabv3-resnet18 (teacher/best.safetensors)``. Unique names stay as they are."""
    groups: dict[str, list[ModelSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.name, []).append(spec)
    for group in groups.values():
        files = [s for s in group if s.path is not None]
        if len(group) < 2:
            continue
        for spec in files:
            assert spec.path is not None
            others = [o.path for o in files if o is not spec and o.path is not None]
            spec.name = f"{spec.name} ({_distinguishing_suffix(spec.path, others) or spec.arg})"


def _distinguishing_suffix(path: Path, others: list[Path]) -> str | None:
    """The last components of ``path`` (as few as possible) that no path in ``others`` ends with; None when one of
    them is the same file."""
    parts = Path(os.path.abspath(path)).parts
    other_parts = [Path(os.path.abspath(o)).parts for o in others]
    for k in range(1, len(parts) + 1):
        if all(o[-k:] != parts[-k:] for o in other_parts):
            return "/".join(parts[-k:])
    return None


def _onnx_architecture(path: Path) -> tuple[str | None, int | None, dict[str, Any] | None]:
    """The zoo architecture and class count recorded by ``segkd export`` in the ONNX metadata, if any."""
    import json

    import onnx

    from segkd.checkpoint import META_KEY

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends for garbage files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise SegkdError(f"{path}: not a readable ONNX file ({first})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        return None, None, None
    try:
        meta = json.loads(props[META_KEY])
        export = json.loads(props.get("segkd.export", "{}"))
    except json.JSONDecodeError:
        return None, None, None
    if not isinstance(meta, dict) or "model" not in meta or "num_classes" not in meta:
        return None, None, None
    return str(meta["model"]), int(meta["num_classes"]), {"meta": meta, "export": export}


def onnx_param_count(path: Path) -> int:
    """Elements of the weight initializers (after the exporter's BN folding): floating-point ones, and in a
    quantised (QDQ) graph the integer tensors a DequantizeLinear turns back into weights; the quantisation scales
    and zero points are not parameters."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    qparams = {i for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:]}
    dequantized = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    total = 0
    for init in model.graph.initializer:
        if init.name in qparams or not (init.data_type in floats or init.name in dequantized):
            continue
        n = 1
        for d in init.dims:
            n *= int(d)
        total += n
    return total


def onnx_precision(onnx_meta: dict[str, Any] | None) -> str:
    """``int8``, ``fp16`` or ``fp32`` as ``segkd export`` recorded it (``fp32`` for foreign files)."""
    export = (onnx_meta or {}).get("export", {})
    return "int8" if export.get("int8") else "fp16" if export.get("fp16") else "fp32"
