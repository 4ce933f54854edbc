"""INT8 post-training quantisation of a verified fp32 export, gated on the mIoU it costs.

``segkd export CKPT --int8 --data ROOT``: the fp32 graph is built and verified against PyTorch as usual, then
quantised statically by ``onnxruntime.quantization.quantize_static`` and both graphs are evaluated on
``--eval-split`` through ``segkd eval``'s ONNX path; the INT8 file is written (atomically) only when the mIoU drop
is at most ``--max-miou-drop`` points, otherwise the export fails with exit 3 and nothing is left behind.

Choices (and why):

* **QDQ format, per-channel symmetric int8 weights**, and two activation encodings (``--int8-target``):
  ``tensorrt`` (default) symmetric int8, the explicit-quantisation form TensorRT consumes (it requires zero point
  0); ``cpu`` asymmetric uint8, the U8S8 form ONNX Runtime's x86 kernels are fast at. Measured here on CamVid at
  180x240 (AVX-512 VNNI EPYC, 1 thread): the teacher's S8S8 file ran at about the fp32 ONNX's CPU time, the U8S8
  file at about a third of it (docs/bench-results.md); TensorRT rejects the non-zero zero points of ``cpu``.
* **What is quantised**: Conv, Gemm and MatMul whose second input is a weight (``MatMulConstBOnly``). Everything
  else stays fp32: LayerNormalization, Softmax, every Reduce*, Resize, ArgMax, the elementwise ops (residual Adds,
  GELU's Erf/Mul, the folded normalisation) and the activation x activation MatMuls of attention (query x key and
  attention x value): softmax probabilities and attention logits have long-tailed ranges that one int8 scale per
  tensor represents badly, the known accuracy trap of post-training quantisation of vision transformers. The
  report lists the op types that ended up int8 and fp32 as read back from the quantised graph, not as intended.
* **Biases**: fp32 for ``tensorrt`` (ORT's ``QuantizeBias=False``, onnxruntime >= 1.17): ORT's default stores
  each bias as INT32 behind a DequantizeLinear, a dtype the ONNX-TensorRT parser does not take (its matrix lists
  INT8/FP8/INT4 for DequantizeLinear; 20 such nodes in a SegFormer-B0 export), while TensorRT fuses an fp32 bias
  into the int8 convolution itself. ``cpu`` keeps ORT's INT32 biases, which its fused QLinearConv kernels use.
* **Calibration**: ``--calib-images`` images of ``--calib-split`` (default train, as calibration must not see
  the evaluation split), drawn by a seeded permutation (CamVid's splits are consecutive video frames: the first N
  would be one street) and transformed exactly as ``segkd eval`` transforms them (checkpoint mean/std,
  ``--resize``), so the calibrated ranges are those of the inputs the gate measures. MinMax (default), entropy or
  percentile (99.999 %, ORT's default); entropy and percentile keep every calibration activation in memory.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segkd.errors import GateFailure, SegkdError
from segkd.safeio import segkd_tempdir

CALIB_METHODS = ("minmax", "entropy", "percentile")
INT8_TARGETS = {  # activation type, symmetric activations, description
    "tensorrt": ("QInt8", True, "int8, symmetric, per tensor"),
    "cpu": ("QUInt8", False, "uint8, asymmetric, per tensor"),
}
QUANTIZED_OP_TYPES = ("Conv", "Gemm", "MatMul")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def check_int8_options(cfg: Any) -> None:
    """One-line errors for the INT8 options (before any tracing); ``--data`` is checked by the CLI (usage)."""
    if cfg.data in (None, "synth"):
        raise SegkdError("--int8 needs --data ROOT: a dataset with real training images to calibrate on")
    if cfg.fp16:
        raise SegkdError("--int8 and --fp16 are exclusive: give one precision")
    if cfg.calib_method not in CALIB_METHODS:
        raise SegkdError(f"--calib-method {cfg.calib_method!r}: choose one of {', '.join(CALIB_METHODS)}")
    if cfg.int8_target not in INT8_TARGETS:
        raise SegkdError(f"--int8-target {cfg.int8_target!r}: choose one of {', '.join(INT8_TARGETS)}")
    if cfg.calib_images < 1:
        raise SegkdError(f"--calib-images {cfg.calib_images}: must be >= 1")
    if not cfg.max_miou_drop >= 0:
        raise SegkdError(f"--max-miou-drop {cfg.max_miou_drop}: must be >= 0 (points of mIoU)")
    if cfg.output == "labels":
        raise SegkdError("--int8 with --output labels: the argmax output has no float scores to calibrate; "
                         "export logits or probs")


def calibration_batches(cfg: Any, meta: Any, fold: bool, progress: bool = True) -> tuple[list[np.ndarray], int]:
    """``--calib-images`` inputs of ``--calib-split`` as the exported graph takes them, and how many exist.

    Raises a one-line error naming the count when the split has fewer images than asked."""
    from segkd.engine.evaluate import build_eval_dataset, progress_bar
    from segkd.engine.inference import parse_resize

    resize = parse_resize(cfg.resize)
    dataset = build_eval_dataset(cfg.data, cfg.data_format, cfg.calib_split, resize, meta,
                                 img_suffix=cfg.img_suffix, seg_suffix=cfg.seg_suffix)
    found = len(dataset)  # type: ignore[arg-type]
    if found < cfg.calib_images:
        raise SegkdError(f"--data {cfg.data}: split {cfg.calib_split!r} has {found} images, fewer than "
                         f"--calib-images {cfg.calib_images}")
    order = torch.randperm(found, generator=torch.Generator().manual_seed(cfg.seed))[: cfg.calib_images].tolist()
    mean = torch.tensor(meta.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(meta.std, dtype=torch.float32).view(3, 1, 1)
    out = []
    with progress_bar(progress, len(order), "calibration images") as bar:
        task = bar.add_task("calibration images", total=len(order))
        for i in order:
            image = dataset[i][0].float()
            if fold:  # a folded graph takes 0..255 RGB: undo the eval transform's normalisation
                image = (image * std + mean) * 255.0
            out.append(np.ascontiguousarray(image[None].numpy(), dtype=np.float32))
            bar.advance(task)
    return out, found


class _Reader:
    """``CalibrationDataReader`` over prepared batches, advancing a progress bar as ORT pulls them."""

    def __init__(self, input_name: str, batches: list[np.ndarray], progress: bool) -> None:
        self.input_name, self.batches, self.progress = input_name, batches, progress
        self._iter: Iterator[np.ndarray] | None = None
        self._bar: Any = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        from segkd.engine.evaluate import progress_bar

        if self._iter is None:
            self._iter = iter(self.batches)
            self._bar = progress_bar(self.progress, len(self.batches), "calibrating")
            self._bar.start()
            self._task = self._bar.add_task("calibrating", total=len(self.batches))
        batch = next(self._iter, None)
        if batch is None:
            self._bar.stop()
            return None
        self._bar.advance(self._task)
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._iter = None


def attention_matmuls(model: Any) -> list[str]:
    """Names of MatMul nodes with no constant input (activation x activation: attention scores and mixing)."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def precision_by_op(model: Any) -> tuple[dict[str, int], dict[str, int]]:
    """``(int8, fp32)`` node counts per op type, read from a QDQ graph. int8: a Conv/Gemm/MatMul fed by a
    DequantizeLinear (the integer kernels TensorRT and ONNX Runtime fuse ``DQ -> op -> Q`` into). Every other node
    computes in fp32, also when it happens to sit between a DQ and a Q (e.g. a LayerNormalization whose output
    feeds a quantised MatMul: its input is dequantised and its output re-quantised, but it runs in float)."""
    produced_by_dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    int8: Counter[str] = Counter()
    fp32: Counter[str] = Counter()
    for n in model.graph.node:
        if n.op_type in QDQ_OPS or n.op_type == "Constant":
            continue
        quant = n.op_type in QUANTIZED_OP_TYPES and any(i in produced_by_dq for i in n.input)
        (int8 if quant else fp32)[n.op_type] += 1
    return dict(sorted(int8.items())), dict(sorted(fp32.items()))


def quantize_onnx(fp32_path: Path, int8_path: Path, batches: list[np.ndarray], method: str, progress: bool,
                  target: str = "tensorrt") -> None:
    """Static QDQ quantisation of ``fp32_path`` into ``int8_path`` (see the module docstring for the choices)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(fp32_path))
    input_name = model.graph.input[0].name
    act_type, act_symmetric, _ = INT8_TARGETS[target]
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT's root-logger advice to pre-process: done already (basic opt + shapes)
    try:  # the entropy/percentile calibrators print to stdout, which would corrupt `--json`
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(fp32_path), str(int8_path), _Reader(input_name, batches, progress),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OP_TYPES), per_channel=True,
                reduce_range=False, activation_type=getattr(QuantType, act_type), weight_type=QuantType.QInt8,
                calibrate_method=methods[method], nodes_to_exclude=attention_matmuls(model),
                extra_options={"ActivationSymmetric": act_symmetric, "WeightSymmetric": True,
                               "MatMulConstBOnly": True, "QuantizeBias": target != "tensorrt"},
            )
    except SegkdError:
        raise
    except Exception as e:  # ORT's quantiser raises plain ValueErrors/RuntimeErrors
        from segkd.export.runtime import _first_line

        raise SegkdError(f"INT8 quantisation failed ({_first_line(e)})") from None
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _temp_root(folder: Path) -> Iterator[None]:
    """``tempfile``'s default folder set to ``folder`` for the block (single-threaded CLI use)."""
    old = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = old


def evaluate_miou(path: Path, cfg: Any, progress: bool) -> tuple[float, int]:
    """mIoU (points) and image count of an ONNX file on ``--eval-split`` through ``segkd eval``'s ONNX path."""
    from segkd.engine.evaluate import run_eval

    result = run_eval(path, data=cfg.data, data_format=cfg.data_format, split=cfg.eval_split, resize=cfg.resize,
                      img_suffix=cfg.img_suffix, seg_suffix=cfg.seg_suffix, device="cpu", progress=progress)
    return 100.0 * float(result.miou), int(result.n_images)


def build_int8(onnx_model: Any, out: Path, cfg: Any, calibration: tuple[list[np.ndarray], int],
               progress: bool = True) -> dict[str, Any]:
    """Quantise the finished fp32 ``onnx_model`` (metadata included) on ``calibration`` (from
    :func:`calibration_batches`), gate it on mIoU and write ``out``.

    Returns the ``int8`` section of the export report; raises :class:`GateFailure` (nothing written) when the
    drop exceeds ``--max-miou-drop``."""
    import json

    import onnx

    from segkd.checkpoint import atomic_write
    from segkd.export.runtime import EXPORT_KEY

    batches, found = calibration
    with segkd_tempdir("int8") as tmp:
        fp32_path, int8_path = tmp / "fp32.onnx", tmp / "int8.onnx"
        onnx.save(onnx_model, str(fp32_path))
        with _temp_root(tmp):  # ORT's quantiser makes scratch folders of its own: inside ours, swept with it
            quantize_onnx(fp32_path, int8_path, batches, cfg.calib_method, progress, cfg.int8_target)
        qmodel = onnx.load(str(int8_path))
        int8_ops, fp32_ops = precision_by_op(qmodel)
        info: dict[str, Any] = {
            "format": "QDQ",
            "target": cfg.int8_target,
            "activations": INT8_TARGETS[cfg.int8_target][2],
            "weights": "int8, symmetric, per channel",
            "quantized_op_types": int8_ops,
            "fp32_op_types": fp32_ops,
            "calibration": {"method": cfg.calib_method, "split": cfg.calib_split, "images": len(batches),
                            "images_in_split": found, "seed": cfg.seed, "resize": cfg.resize},
        }
        props = {p.key: p.value for p in qmodel.metadata_props}
        export = json.loads(props[EXPORT_KEY])
        export["int8"] = {k: info[k] for k in ("format", "target", "activations", "weights", "calibration")}
        for p in qmodel.metadata_props:
            if p.key == EXPORT_KEY:
                p.value = json.dumps(export, sort_keys=True)
        qmodel.metadata_props.add(key="segkd.precision", value="int8")
        onnx.checker.check_model(qmodel)
        onnx.save(qmodel, str(int8_path))
        miou_fp32, n_eval = evaluate_miou(fp32_path, cfg, progress)
        miou_int8, _ = evaluate_miou(int8_path, cfg, progress)
        drop = miou_fp32 - miou_int8
        info.update(eval_split=cfg.eval_split, eval_images=n_eval, miou_fp32=round(miou_fp32, 4),
                    miou_int8=round(miou_int8, 4), miou_drop=round(drop, 4), max_miou_drop=cfg.max_miou_drop,
                    bytes_fp32=fp32_path.stat().st_size, bytes_int8=int8_path.stat().st_size,
                    passed=drop <= cfg.max_miou_drop)
        if not info["passed"]:
            raise GateFailure(f"INT8 gate failed, nothing written to {out}: mIoU on {cfg.eval_split!r} "
                              f"{miou_fp32:.2f} fp32 -> {miou_int8:.2f} int8, drop {drop:.2f} > --max-miou-drop "
                              f"{cfg.max_miou_drop:g}")
        atomic_write(out, lambda dst: dst.write_bytes(int8_path.read_bytes()))
    return info
