"""The one builder of teacher targets from a teacher forward: online distillation, the teacher cache and
``segkd bench --train-step`` all get what the teacher says about images from :func:`teacher_targets`.

The teacher runs in eval mode under ``torch.inference_mode()``; its outputs are cloned (inference tensors cannot
enter autograd) and only the taps asked for are kept. The cache stores these targets per whole image and warps
them onto each crop (:func:`segkd.methods.teacher_cache.cached_targets`), which is why ``size`` exists: the cache
serves logits at the crop's pixel grid, so ``bench --train-step --teacher-cache`` builds them at the label size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from segkd.engine.batch import TeacherTargets
from segkd.models import SegOutput
from segkd.models.base import upsample_logits


def model_outputs(model: nn.Module, images: Tensor, taps: bool) -> SegOutput:
    """``model(images)`` as a :class:`~segkd.models.SegOutput` (with every tap when ``taps``)."""
    out = model(images, taps=True) if taps else model(images)
    return out if isinstance(out, SegOutput) else SegOutput(out)


def teacher_targets(teacher: nn.Module, taps: Iterable[str], images: Tensor,
                    size: tuple[int, int] | None = None) -> TeacherTargets:
    """The teacher's logits (at its own stride, or upsampled to ``size``) and the named ``taps`` (concrete tap
    names) for ``images``, computed without autograd and cloned."""
    first = next(teacher.parameters(), None)
    if first is not None and first.device != images.device:
        teacher.to(images.device)
    teacher.eval()
    keep = set(taps)
    with torch.inference_mode():
        out = model_outputs(teacher, images, bool(keep))
        logits = upsample_logits(out.logits, size) if size is not None else out.logits
    return TeacherTargets(logits.clone(), {k: out.tap(k).clone() for k in sorted(keep)})
