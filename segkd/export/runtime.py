"""A predictor that evaluates an exported model like a zoo model; the strict ONNX Runtime sessions and the export
metadata it reads are :mod:`segkd.onnxrt` (re-exported here, where export, bench and the tests import them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from segkd.checkpoint import CheckpointMeta
from segkd.errors import SegkdError
from segkd.onnxrt import (  # noqa: F401  (re-exported: export, bench and the tests import them from here)
    EXPORT_KEY,
    PROVIDER_NAMES,
    create_session,
    parse_providers,
    probe_providers,
    read_onnx_metadata,
)
from segkd.onnxrt import first_line as _first_line


def load_onnx_predictor(
    path: str | Path, providers: str | Sequence[str] = ("cpu",), threads: int = 0
) -> tuple[Callable[[Tensor], Tensor], CheckpointMeta]:
    """``(predict_fn, meta)`` for a segkd ONNX export, called like a zoo model during evaluation.

    ``predict_fn`` takes the eval pipeline's input (a float ``B x 3 x H x W`` batch normalised with ``meta.mean`` /
    ``meta.std``) and returns float scores ``B x C x h x w`` on the input's device: logits at the model stride for a
    ``logits`` export, probabilities at input size for ``probs``, and one-hot scores at input size for ``labels``
    (so ``argmax(1)`` gives the labels back). A model with folded normalisation takes 0..255 RGB, so the
    normalisation is undone here first. A static export fed another size raises a one-line error.
    """
    meta, export = read_onnx_metadata(path)
    sess = create_session(path, providers, threads=threads)
    input_name = sess.get_inputs()[0].name
    output_kind = export.get("output", "logits")
    folded = bool(export.get("fold_normalize", False))
    mean = torch.tensor(meta.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(meta.std, dtype=torch.float32).view(1, 3, 1, 1)
    num_classes = meta.num_classes

    def predict(x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise SegkdError(f"{path}: expects a B x 3 x H x W batch, got shape {tuple(x.shape)}")
        xin = x.detach().float().cpu()
        if folded:
            xin = (xin * std + mean) * 255.0
        try:
            out = sess.run(None, {input_name: np.ascontiguousarray(xin.numpy())})[0]
        except Exception as e:
            raise SegkdError(f"{path}: ONNX Runtime rejected a {tuple(x.shape)} batch ({_first_line(e)})") from None
        scores = torch.from_numpy(np.asarray(out))
        if output_kind == "labels":
            labels = scores.long().clamp_(0, num_classes - 1)
            scores = torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
        return scores.float().to(x.device)

    return predict, meta
