"""Zoo models rebuilt from segkd checkpoints (kept out of :mod:`segkd.checkpoint`, which knows files, not models)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from segkd.checkpoint import CheckpointMeta, load_state_checked, read_checkpoint
from segkd.models import SegModel, check_model_kwargs, create_model


def model_from_state(state: dict[str, Tensor], meta: CheckpointMeta, source: str) -> SegModel:
    """The zoo model ``meta`` names with ``state`` loaded strictly (the training-only DeepLabV3 aux head, which
    deploy checkpoints leave out, is ignored when present); ``meta`` is attached as ``model.segkd_meta``."""
    from segkd.errors import SegkdError
    from segkd.models import MODELS

    if meta.model not in MODELS:
        raise SegkdError(f"{source}: metadata names the model {meta.model!r}, which is not in segkd's zoo")
    check_model_kwargs(meta.model, meta.model_kwargs, f"{source}: metadata model_kwargs")
    model = create_model(meta.model, num_classes=meta.num_classes, **meta.model_kwargs)
    load_state_checked(model, {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}, source)
    model.segkd_meta = meta  # type: ignore[attr-defined]
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> SegModel:
    """Rebuild a zoo model from a segkd checkpoint alone, in eval mode; the metadata is ``model.segkd_meta``."""
    state, meta = read_checkpoint(path)
    return model_from_state(state, meta, str(path)).to(device).eval()  # type: ignore[return-value]
