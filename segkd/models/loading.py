"""Zoo models rebuilt from segkd checkpoints (kept out of :mod:`segkd.checkpoint`, which knows files, not models),
and teachers loaded from a segkd or a foreign checkpoint with every weight in place."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from segkd.checkpoint import META_KEY, CheckpointMeta, load_state_checked, read_checkpoint, read_safetensors
from segkd.errors import SegkdError
from segkd.models import MODELS, SegModel, check_model_kwargs, create_model
from segkd.models.base import is_training_only
from segkd.models.convert import convert_checkpoint


def model_from_state(state: dict[str, Tensor], meta: CheckpointMeta, source: str) -> SegModel:
    """The zoo model ``meta`` names with ``state`` loaded strictly (the training-only DeepLabV3 aux head, which
    deploy checkpoints leave out, is ignored when present); ``meta`` is attached as ``model.segkd_meta``."""
    if meta.model not in MODELS:
        raise SegkdError(f"{source}: metadata names the model {meta.model!r}, which is not in segkd's zoo")
    check_model_kwargs(meta.model, meta.model_kwargs, f"{source}: metadata model_kwargs")
    model = create_model(meta.model, num_classes=meta.num_classes, **meta.model_kwargs)
    load_state_checked(model, {k: v for k, v in state.items() if not is_training_only(model, k)}, source)
    model.segkd_meta = meta  # type: ignore[attr-defined]
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> SegModel:
    """Rebuild a zoo model from a segkd checkpoint alone, in eval mode; the metadata is ``model.segkd_meta``."""
    state, meta = read_checkpoint(path)
    return model_from_state(state, meta, str(path)).to(device).eval()  # type: ignore[return-value]


def teacher_named_by(path: str | Path) -> str | None:
    """The zoo model a segkd checkpoint's metadata names (so ``--teacher`` may be left out), or ``None`` for a
    foreign checkpoint."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    raw = read_safetensors(path, tensors=False)[1]
    return CheckpointMeta.from_json(raw[META_KEY], source=str(path)).model if META_KEY in raw else None


def load_teacher(name: str, path: str | Path, num_classes: int, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> SegModel:
    """A teacher with every weight loaded: a segkd checkpoint of ``name`` (strict), or a foreign checkpoint that
    ``segkd convert`` understands with no key missing or left over. Anything else is refused in one line."""
    path = Path(path)
    canonical = MODELS.canonical(name)
    meta: CheckpointMeta | None = None
    if path.suffix == ".safetensors":
        state, raw = read_safetensors(path)
        if META_KEY in raw:
            meta = CheckpointMeta.from_json(raw[META_KEY], source=str(path))
    if meta is not None:
        if MODELS.canonical(meta.model) != canonical:
            raise SegkdError(f"--teacher-weights {path}: a {meta.model} checkpoint, but --teacher is {name}")
        model = model_from_state(state, meta, f"--teacher-weights {path}")
        if mean is not None and std is not None and (
                any(abs(a - b) > 1e-6 for a, b in zip(meta.mean, mean, strict=True))
                or any(abs(a - b) > 1e-6 for a, b in zip(meta.std, std, strict=True))):
            raise SegkdError(f"--teacher-weights {path}: trained with mean/std {meta.mean}/{meta.std}, but the run "
                             f"normalises with {list(mean)}/{list(std)}")
    else:
        model, _, report = convert_checkpoint(path, canonical, num_classes=None)
        bad = [(label, keys) for label, keys in (("missing", report.missing), ("unexpected", report.unplaced))
               if keys]
        if bad:
            label, keys = bad[0]
            raise SegkdError(f"--teacher-weights {path}: {len(keys)} {label} key(s) for {canonical} (first "
                             f"{keys[0]!r}); refusing a partially loaded teacher")
    if model.num_classes != num_classes:
        raise SegkdError(f"--teacher-weights {path}: the teacher predicts {model.num_classes} classes, the dataset "
                         f"has {num_classes}")
    return model.eval().requires_grad_(False)  # type: ignore[return-value]
