"""ONNX Runtime sessions that fail loudly, and a predictor that evaluates an exported model like a zoo model.

ONNX Runtime falls back to the CPU without raising when a requested GPU provider cannot load (onnxruntime-gpu on a
machine without CUDA lists CUDA/TensorRT as *available*, then runs on the CPU; microsoft/onnxruntime #23372). So
every session here is checked after creation: each provider the user asked for must appear in
``session.get_providers()``, otherwise a one-line :class:`SegkdError` names what was asked and what ran.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from segkd.checkpoint import META_KEY, CheckpointMeta
from segkd.errors import SegkdError

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
EXPORT_KEY = "segkd.export"


def parse_providers(providers: str | Sequence[str]) -> tuple[str, ...]:
    """``"cpu"``, ``"cuda,cpu"`` or a sequence of short names -> validated short names (order kept)."""
    items = [p.strip().lower() for p in (providers.split(",") if isinstance(providers, str) else providers)]
    items = [p for p in items if p]
    if not items:
        raise SegkdError("--providers: give at least one of cpu, cuda, tensorrt")
    for p in items:
        if p not in PROVIDER_NAMES:
            raise SegkdError(f"--providers: unknown provider {p!r}; choose from {', '.join(PROVIDER_NAMES)}")
    return tuple(dict.fromkeys(items))


def _provider_list(short: Sequence[str], trt_options: dict[str, Any] | None) -> list[Any]:
    """The ORT provider list: the asked providers in order, then CPU so unsupported subgraphs still have a home."""
    names = [PROVIDER_NAMES[p] for p in short]
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
    out: list[Any] = []
    for name in names:
        if name == "TensorrtExecutionProvider" and trt_options:
            out.append((name, trt_options))
        else:
            out.append(name)
    return out


def create_session(
    path: str | Path,
    providers: str | Sequence[str] = ("cpu",),
    threads: int = 0,
    trt_options: dict[str, Any] | None = None,
) -> Any:
    """An ``InferenceSession`` whose real providers include every requested one, else a one-line error.

    ``threads`` sets ``intra_op_num_threads`` (0 = ORT's default). ORT's own provider-loading chatter (C++ log and
    the Python "EP Error ... Falling back" banner) is silenced and replaced by our single line.
    """
    import onnxruntime as ort

    short = parse_providers(providers)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    wants_gpu = any(p != "cpu" for p in short)
    captured = io.StringIO()
    if wants_gpu:
        ort.set_default_logger_severity(4)  # the "Failed to load library" lines; our check below reports it
    try:
        with contextlib.redirect_stdout(captured):
            sess = ort.InferenceSession(str(path), opts, providers=_provider_list(short, trt_options))
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        raise SegkdError(f"{path}: ONNX Runtime cannot load the model ({_first_line(e)})") from None
    finally:
        if wants_gpu:
            ort.set_default_logger_severity(2)
    used = sess.get_providers()
    missing = [PROVIDER_NAMES[p] for p in short if PROVIDER_NAMES[p] not in used]
    if missing:
        text = captured.getvalue().replace("*", "").replace("EP Error", "").strip()
        hint = _first_line(re.sub(r"^/\S+:\d+ .*?\) (?=[A-Z])", "", text))  # drop ORT's C++ source location
        raise SegkdError(
            f"--providers {','.join(short)}: ONNX Runtime could not use {', '.join(missing)} on this machine "
            f"(the session fell back to {', '.join(used)}; no silent CPU fallback)" + (f": {hint}" if hint else "")
        )
    return sess


def probe_providers(providers: str | Sequence[str]) -> None:
    """Fail early (one line) when a requested provider cannot run here, using a one-node model, before any export."""
    import onnx
    from onnx import TensorProto, helper

    from segkd.safeio import segkd_tempdir

    short = parse_providers(providers)
    if all(p == "cpu" for p in short):
        return
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with segkd_tempdir("probe") as tmp:
        path = tmp / "probe.onnx"
        onnx.save(model, str(path))
        create_session(path, short)


def _first_line(obj: object, limit: int = 160) -> str:
    text = str(obj).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:limit]
    return type(obj).__name__ if isinstance(obj, BaseException) else ""


def read_onnx_metadata(path: str | Path) -> tuple[CheckpointMeta, dict[str, Any]]:
    """The checkpoint metadata and export details a segkd export stores in ``metadata_props``."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise SegkdError(f"{path}: file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise SegkdError(f"{path}: not a readable ONNX file ({_first_line(e)})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props or EXPORT_KEY not in props:
        raise SegkdError(f"{path}: an ONNX file without segkd metadata; export it with `segkd export`")
    meta = CheckpointMeta.from_json(props[META_KEY], source=str(path))
    try:
        export = json.loads(props[EXPORT_KEY])
    except json.JSONDecodeError as e:
        raise SegkdError(f"{path}: segkd export metadata is not valid JSON ({e.msg})") from None
    return meta, export


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
