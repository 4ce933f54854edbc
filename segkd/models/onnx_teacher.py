"""A distillation teacher given as an ONNX file (``segkd distill --teacher-weights MODEL.onnx``), run by ONNX Runtime.

:class:`OnnxTeacher` stands where a zoo teacher stands (a frozen :class:`~segkd.models.SegModel` with no parameters):
``teacher(images)`` takes the run's normalised batch and returns logits ``B x C x h x w`` at the ONNX model's own
stride, which every method and the teacher cache resize as they resize a zoo teacher's. It has no taps
(``feature_info`` is empty): the methods that read teacher features are refused before any data is read
(:func:`onnx_refusal`).

What the file must be, and where its facts come from (choices, not dictated by a spec):

* **One float output**, the logits (float32, float16 or float64; read as float32). Two outputs, a non-float output
  (a ``labels`` export) or a segkd ``probs`` export are refused in one line naming the file: there is no general
  way to tell which of two outputs are the logits, and distilling softmax probabilities as logits would be wrong.
* **Input normalisation**: a segkd export's metadata (``segkd export``'s mean/std, or 0..255 RGB when it folded the
  normalisation); for any other file, ``--teacher-mean/--teacher-std`` in the units of segkd's ``mean``/``std``
  (RGB scaled to [0, 1]; a model taking 0..255 RGB is mean ``0,0,0`` std ``1/255``). Required then: a wrong guess
  would distil a silently worse teacher. The run's batch is converted per channel, ``x_t = x * s_r / s_t +
  (m_r - m_t) / s_t``, and passed as it is when the two agree (so a segkd export of the run's own normalisation
  sees exactly the run's input).
* **Class count**: the metadata's, else the channel count of the output of one probe forward; compared with the
  dataset's in one line.
* **Output stride**: the metadata's ``output_stride``, else the probe's input height over its output height. The
  probe runs a zero image of 64 x 64 (the static size for a static-shape model): a multiple of 32, which every
  common segmentation backbone accepts.
* A model whose batch dimension is fixed at 1 is run image by image.

Identity for the teacher cache: the file's sha256 is the weights key (as for a checkpoint); :attr:`cache_name`
adds what the file alone does not fix, the normalisation given by flags.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from segkd.errors import SegkdError
from segkd.models.base import SegModel
from segkd.onnxrt import create_session, first_line, segkd_onnx_metadata

PROBE = 64
FLOAT_TYPES = {"tensor(float)", "tensor(float16)", "tensor(double)"}


def is_onnx_path(path: str | Path | None) -> bool:
    """Whether ``--teacher-weights`` names an ONNX file (by its suffix, as ``segkd eval`` decides)."""
    return path is not None and Path(path).suffix.lower() == ".onnx"


def parse_triple(text: str | Sequence[float], option: str, positive: bool = False) -> tuple[float, float, float]:
    """``"0.5,0.5,0.5"`` (or three numbers) -> a tuple of three finite floats; a one-line error naming ``option``."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        vals = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in vals):
        kind = "positive " if positive else ""
        raise SegkdError(f"{option} {text!r}: expected three {kind}numbers (RGB in [0, 1] units), e.g. 0.5,0.5,0.5")
    return vals  # type: ignore[return-value]


@dataclass(frozen=True)
class OnnxInput:
    """How the ONNX model wants its input: normalisation (RGB in [0, 1] units), 0..255 scaling, where it came from."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale255: bool = False
    source: str = "segkd export metadata"


class OnnxTeacher(SegModel):
    """A frozen logits-only teacher backed by an ONNX Runtime session (see the module docstring)."""

    family = "onnx"  # type: ignore[assignment]  # neither CNN nor transformer as far as segkd knows

    def __init__(self, path: Path, session: Any, num_classes: int, output_stride: int, model_input: OnnxInput,
                 run_mean: Sequence[float], run_std: Sequence[float], model: str | None = None) -> None:
        super().__init__(f"onnx:{model or path.name}", num_classes)
        self.path, self.session, self.output_stride = path, session, output_stride
        self.model_input = model_input
        self.input_name = session.get_inputs()[0].name
        self.per_image = session.get_inputs()[0].shape[0] == 1
        self.cache_name = "onnx" + (f":{model}" if model else "") + (
            "" if model else f" mean={list(model_input.mean)} std={list(model_input.std)}")
        self._affine = _input_affine(model_input, run_mean, run_std)

    def forward(self, x: Tensor, taps: bool = False) -> Tensor:
        if taps:
            raise SegkdError(f"{self.path}: an ONNX teacher gives logits only, no feature taps")
        xin = x.detach().float().cpu()
        if self._affine is not None:
            scale, shift = self._affine
            xin = xin * scale + shift
        arr = np.ascontiguousarray(xin.numpy())
        chunks = [arr[i:i + 1] for i in range(len(arr))] if self.per_image else [arr]
        outs = [self._run(c) for c in chunks]
        return torch.from_numpy(np.concatenate(outs) if len(outs) > 1 else outs[0]).float().to(x.device)

    def _run(self, arr: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(self.session.run(None, {self.input_name: arr})[0])
        except Exception as e:  # ORT raises its own InvalidArgument/Fail types
            raise SegkdError(f"{self.path}: ONNX Runtime rejected a {tuple(arr.shape)} batch ({first_line(e)})"
                             ) from None


def _input_affine(inp: OnnxInput, run_mean: Sequence[float], run_std: Sequence[float]) -> tuple[Tensor, Tensor] | None:
    """``(scale, shift)`` taking the run's normalised input to the model's (``None``: the same normalisation)."""
    m_r, s_r = torch.tensor(run_mean, dtype=torch.float64), torch.tensor(run_std, dtype=torch.float64)
    m_t, s_t = torch.tensor(inp.mean, dtype=torch.float64), torch.tensor(inp.std, dtype=torch.float64)
    if inp.scale255:  # the model normalises inside: it takes RGB in 0..255
        m_t, s_t = torch.zeros(3, dtype=torch.float64), torch.full((3,), 1 / 255, dtype=torch.float64)
    if torch.equal(m_r, m_t) and torch.equal(s_r, s_t):
        return None
    scale, shift = s_r / s_t, (m_r - m_t) / s_t
    return scale.float().view(1, 3, 1, 1), shift.float().view(1, 3, 1, 1)


def _check_graph(path: Path, session: Any) -> None:
    """One float output and one image input, else one line naming the file."""
    outs, ins = session.get_outputs(), session.get_inputs()
    if len(outs) != 1:
        raise SegkdError(f"--teacher-weights {path}: an ONNX teacher must have one output (its logits); this one has "
                         f"{len(outs)} ({', '.join(o.name for o in outs)})")
    if outs[0].type not in FLOAT_TYPES:
        raise SegkdError(f"--teacher-weights {path}: output {outs[0].name!r} is {outs[0].type}, not float logits "
                         "(a labels export? export the teacher's logits)")
    if len(ins) != 1 or len(ins[0].shape) != 4:
        raise SegkdError(f"--teacher-weights {path}: an ONNX teacher must take one B x 3 x H x W image input")


def _model_input(path: Path, export: dict[str, Any] | None, meta: Any, mean: Sequence[float] | None,
                 std: Sequence[float] | None) -> OnnxInput:
    """The input normalisation: the segkd export's, else the flags' (required for a foreign file)."""
    if export is not None:
        if mean is not None or std is not None:
            raise SegkdError(f"--teacher-weights {path}: a segkd export records its normalisation "
                             f"({meta.mean}/{meta.std}); --teacher-mean/--teacher-std are for other ONNX files")
        if export.get("output", "logits") != "logits":
            raise SegkdError(f"--teacher-weights {path}: a segkd {export.get('output')!r} export; distillation needs "
                             "the logits (segkd export --output logits)")
        return OnnxInput(tuple(meta.mean), tuple(meta.std), bool(export.get("fold_normalize", False)))
    if mean is None or std is None:
        raise SegkdError(f"--teacher-weights {path}: an ONNX file segkd did not write; give its input normalisation "
                         "with --teacher-mean and --teacher-std (RGB in [0, 1] units)")
    return OnnxInput(tuple(mean), tuple(std), source="--teacher-mean/--teacher-std")  # type: ignore[arg-type]


def _probe(path: Path, session: Any) -> tuple[int, int]:
    """``(classes, output stride)`` from one forward of a zero image (module docstring)."""
    shape = session.get_inputs()[0].shape
    h, w = (shape[2], shape[3]) if all(isinstance(d, int) for d in shape[2:]) else (PROBE, PROBE)
    x = np.zeros((1, 3, h, w), np.float32)
    try:
        out = session.run(None, {session.get_inputs()[0].name: x})[0]
    except Exception as e:
        raise SegkdError(f"--teacher-weights {path}: ONNX Runtime cannot run a 1x3x{h}x{w} probe ({first_line(e)})"
                         ) from None
    if out.ndim != 4 or out.shape[2] < 1:
        raise SegkdError(f"--teacher-weights {path}: output shape {tuple(out.shape)} for a 1x3x{h}x{w} input, not "
                         "B x classes x h x w logits")
    return int(out.shape[1]), max(1, round(h / out.shape[2]))


def load_onnx_teacher(path: str | Path, num_classes: int, run_mean: Sequence[float], run_std: Sequence[float],
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      providers: str | Sequence[str] = ("cpu",), gpu: int | None = None,
                      threads: int = 0) -> OnnxTeacher:
    """The :class:`OnnxTeacher` of ``path`` for a run normalising with ``run_mean``/``run_std`` on a dataset of
    ``num_classes``; ``mean``/``std`` describe a foreign file's input; ``threads``: ONNX Runtime's intra-op threads
    (the run's ``--threads``; 0 = its default). Each mismatch is one line naming the file."""
    path = Path(path)
    found = segkd_onnx_metadata(path)
    meta, export = found if found is not None else (None, None)
    model_input = _model_input(path, export, meta, mean, std)
    session = create_session(path, providers, threads=threads, gpu=gpu)
    _check_graph(path, session)
    classes, stride = _probe(path, session)
    if meta is not None:
        classes, stride = meta.num_classes, int(export.get("output_stride", stride))  # type: ignore[union-attr]
    if classes != num_classes:
        raise SegkdError(f"--teacher-weights {path}: the teacher predicts {classes} classes, the dataset has "
                         f"{num_classes}")
    teacher = OnnxTeacher(path, session, classes, stride, model_input, run_mean, run_std,
                          meta.model if meta is not None else None)
    return teacher.eval().requires_grad_(False)  # type: ignore[return-value]
