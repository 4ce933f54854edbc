"""ONNX Runtime sessions that fail loudly, and the metadata a segkd export stores: the ground floor that
``segkd export``/``bench``/``eval`` (through :mod:`segkd.export.runtime`) and an ONNX teacher
(:mod:`segkd.models.onnx_teacher`) share.

ONNX Runtime falls back to the CPU without raising when a requested GPU provider cannot load (onnxruntime-gpu on a
machine without CUDA lists CUDA/TensorRT as *available*, then runs on the CPU; microsoft/onnxruntime #23372). So
every session here is checked after creation: each provider the user asked for must appear in
``session.get_providers()``, otherwise a one-line :class:`SegkdError` names what was asked and what ran.

Why this module sits on floor 0 (docs/architecture.md): the distillation teacher of ``--teacher-weights
MODEL.onnx`` is built by the runs layer, below export; the session code is plain ONNX Runtime with no segkd model
in it, so it moves down rather than the teacher reaching up.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segkd.checkpoint import META_KEY, CheckpointMeta
from segkd.errors import SegkdError
from segkd.safeio import segkd_tempdir

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


def _provider_list(short: Sequence[str], trt_options: dict[str, Any] | None, gpu: int | None = None) -> list[Any]:
    """The ORT provider list: the asked providers in order, then CPU so unsupported subgraphs still have a home;
    ``gpu`` (a CUDA device index) goes to the CUDA and TensorRT providers as their ``device_id``."""
    names = [PROVIDER_NAMES[p] for p in short]
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
    out: list[Any] = []
    for name in names:
        opts = dict(trt_options or {}) if name == "TensorrtExecutionProvider" else {}
        if gpu is not None and name != "CPUExecutionProvider":
            opts["device_id"] = gpu
        out.append((name, opts) if opts else name)
    return out


def create_session(
    path: str | Path,
    providers: str | Sequence[str] = ("cpu",),
    threads: int = 0,
    trt_options: dict[str, Any] | None = None,
    gpu: int | None = None,
) -> Any:
    """An ``InferenceSession`` whose real providers include every requested one, else a one-line error.

    ``threads`` sets ``intra_op_num_threads`` (0 = ORT's default); ``gpu`` the CUDA device of GPU providers (a
    DDP rank's own; ``None``: ORT's default, device 0). ORT's own provider-loading chatter (C++ log and
    the Python "EP Error ... Falling back" banner) is silenced and replaced by our single line.
    """
    import onnxruntime as ort  # lazy CLI start: ORT loads only for ONNX work, train/distill never pay for it

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
            sess = ort.InferenceSession(str(path), opts, providers=_provider_list(short, trt_options, gpu))
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        raise SegkdError(f"{path}: ONNX Runtime cannot load the model ({first_line(e)})") from None
    finally:
        if wants_gpu:
            ort.set_default_logger_severity(2)
    used = sess.get_providers()
    missing = [PROVIDER_NAMES[p] for p in short if PROVIDER_NAMES[p] not in used]
    if missing:
        text = captured.getvalue().replace("*", "").replace("EP Error", "").strip()
        hint = first_line(re.sub(r"^/\S+:\d+ .*?\) (?=[A-Z])", "", text))  # drop ORT's C++ source location
        raise SegkdError(
            f"--providers {','.join(short)}: ONNX Runtime could not use {', '.join(missing)} on this machine "
            f"(the session fell back to {', '.join(used)}; no silent CPU fallback)" + (f": {hint}" if hint else "")
        )
    return sess


def probe_providers(providers: str | Sequence[str]) -> None:
    """Fail early (one line) when a requested provider cannot run here, using a one-node model, before any export."""
    import onnx  # lazy CLI start: onnx loads only for ONNX work
    from onnx import TensorProto, helper  # lazy CLI start (as above)

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


def first_line(obj: object, limit: int = 160) -> str:
    text = str(obj).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:limit]
    return type(obj).__name__ if isinstance(obj, BaseException) else ""


def segkd_onnx_metadata(path: str | Path) -> tuple[CheckpointMeta, dict[str, Any]] | None:
    """The checkpoint metadata and export details a segkd export stores in ``metadata_props``, or ``None`` for an
    ONNX file segkd did not write (a readable one: an unreadable file is a one-line error)."""
    import onnx  # lazy CLI start: onnx loads only for ONNX work

    path = Path(path)
    if not path.is_file():
        raise SegkdError(f"{path}: file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise SegkdError(f"{path}: not a readable ONNX file ({first_line(e)})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props or EXPORT_KEY not in props:
        return None
    meta = CheckpointMeta.from_json(props[META_KEY], source=str(path))
    try:
        export = json.loads(props[EXPORT_KEY])
    except json.JSONDecodeError as e:
        raise SegkdError(f"{path}: segkd export metadata is not valid JSON ({e.msg})") from None
    return meta, export


def read_onnx_metadata(path: str | Path) -> tuple[CheckpointMeta, dict[str, Any]]:
    """:func:`segkd_onnx_metadata` of a file that must be a segkd export (``segkd eval MODEL.onnx``)."""
    found = segkd_onnx_metadata(path)
    if found is None:
        raise SegkdError(f"{path}: an ONNX file without segkd metadata; export it with `segkd export`")
    return found
