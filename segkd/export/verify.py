"""Verification of an ONNX export against the PyTorch model it came from.

Cases: random 0..255 images at the export size and (dynamic exports) at a second size with batch 2 and another
aspect ratio; given ``--data ROOT`` the first few real images at the same sizes (``--data synth``: smooth synthetic
scenes instead). Each case reports the max / mean absolute difference of the float output and the label agreement
(argmax over classes; the labels themselves for a ``labels`` export). A static export is also fed another size,
which ONNX Runtime must reject. Gates: ``--atol`` on the max difference and ``--min-agreement`` on every case.
Defaults: fp32 1e-4 and 0.999; fp16 only the agreement gate, 0.99 (fp16 logits differ by ~1e-2, so an absolute
tolerance is opt-in there).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segkd.errors import SegkdError
from segkd.export.runtime import _first_line, create_session

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
LABEL_DIR_NAMES = {"labels", "label", "gt", "gtfine", "gtcoarse", "masks", "mask", "annotations", "ann_dir",
                   "segmentationclass", "segmentationobject", "targets"}


def resolve_gates(cfg: Any) -> tuple[float | None, float, float]:
    """``(atol, rtol, min_agreement)`` after precision-dependent defaults (``rtol``: 1e-5 where an absolute gate
    applies, fp32 or a given ``--atol``; 0 without one); bad values give one-line errors."""
    atol = cfg.atol if cfg.atol is not None else (None if cfg.fp16 else 1e-4)
    rtol = cfg.rtol if cfg.rtol is not None else (0.0 if atol is None else 1e-5)
    agree = cfg.min_agreement if cfg.min_agreement is not None else (0.99 if cfg.fp16 else 0.999)
    if atol is not None and not atol >= 0:
        raise SegkdError(f"--atol {cfg.atol}: must be >= 0")
    if not rtol >= 0:
        raise SegkdError(f"--rtol {cfg.rtol}: must be >= 0")
    if not 0.0 <= agree <= 1.0:
        raise SegkdError(f"--min-agreement {cfg.min_agreement}: must be between 0 and 1")
    return atol, float(rtol), agree


def find_images(root: str | Path, limit: int) -> list[Path]:
    """The first ``limit`` images under ``root``, preferring a ``val`` split and skipping label folders."""
    root = Path(root)
    if not root.is_dir():
        raise SegkdError(f"--data {root}: not a folder (give a dataset root or 'synth')")
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        and not any(part.lower() in LABEL_DIR_NAMES for part in p.relative_to(root).parts[:-1])
    )
    val = [p for p in files if "val" in [s.lower() for s in p.relative_to(root).parts[:-1]]]
    chosen = (val or files)[:limit]
    if not chosen:
        raise SegkdError(f"--data {root}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return chosen


def load_images(paths: Sequence[Path], height: int, width: int) -> Tensor:
    """RGB images resized (bilinear) to ``height x width`` as a float ``N x 3 x H x W`` tensor in 0..255."""
    from PIL import Image

    from segkd.data.datasets import open_image

    out = []
    for p in paths:
        with open_image(p) as im:
            try:
                arr = np.asarray(im.convert("RGB").resize((width, height), Image.BILINEAR), dtype=np.float32)
            except Exception as e:
                raise SegkdError(f"{p}: cannot be read as an image ({_first_line(e)})") from None
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return torch.stack(out)


def synth_images(n: int, height: int, width: int, gen: torch.Generator) -> Tensor:
    """Smooth synthetic scenes (bicubic-upsampled 6x8 colour grids plus mild noise), 0..255."""
    coarse = torch.rand(n, 3, 6, 8, generator=gen) * 255.0
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return (smooth + torch.randn(n, 3, height, width, generator=gen) * 8.0).clamp(0, 255)


def _to_model_input(raw: Tensor, wrapper: nn.Module) -> Tensor:
    """Raw 0..255 RGB -> what the exported graph takes (raw if normalisation is folded, else normalised)."""
    if getattr(wrapper, "fold", False):
        return raw
    return (raw - wrapper.mean255) / wrapper.std255  # type: ignore[operator]


def compare(ref: Tensor, got: np.ndarray, output: str) -> dict[str, Any]:
    """Max/mean abs difference (float outputs) and label agreement of an ORT result against the reference."""
    got_t = torch.from_numpy(np.asarray(got))
    if tuple(got_t.shape) != tuple(ref.shape):
        return {"error": f"output shape {tuple(got_t.shape)} != PyTorch {tuple(ref.shape)}"}
    if output == "labels":
        return {"max_abs_diff": None, "mean_abs_diff": None,
                "label_agreement": float((got_t.long() == ref.long()).float().mean())}
    diff = (got_t.float() - ref.float()).abs()
    agree = (got_t.float().argmax(1) == ref.float().argmax(1)).float().mean()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "label_agreement": float(agree),
            "max_abs_ref": float(ref.float().abs().max())}


def second_size(h: int, w: int, stride: int) -> tuple[int, int]:
    """Another size for dynamic exports: one stride taller, one stride narrower (or wider if too narrow)."""
    return h + stride, (w - stride if w - stride >= stride else w + stride)


def _verification_batches(plan: Any, cfg: Any) -> list[tuple[str, Tensor]]:
    """The named 0..255 RGB batches verification runs: random ones at the export size (and a second size for
    dynamic exports), plus synthetic images or the first ``--num-images`` of ``--data``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    sizes = [(plan.batch, plan.height, plan.width)]
    if not plan.static:
        sizes.append((2, *second_size(plan.height, plan.width, plan.stride)))
    image_paths = find_images(cfg.data, cfg.num_images) if cfg.data and cfg.data != "synth" else []
    batches: list[tuple[str, Tensor]] = []
    for b, h, w in sizes:
        batches.append((f"random {b}x3x{h}x{w}", torch.rand(b, 3, h, w, generator=gen) * 255.0))
        if cfg.data == "synth":
            batches.append((f"synth {b}x3x{h}x{w}", synth_images(b, h, w, gen)))
        elif image_paths:
            imgs = load_images(image_paths, h, w)
            for start in range(0, len(imgs), b):
                chunk = imgs[start:start + b]
                if len(chunk) < b:  # static batch: repeat to fill it
                    chunk = torch.cat([chunk, imgs[: b - len(chunk)]])
                batches.append((f"data {b}x3x{h}x{w} [{start}:{start + len(chunk)}]", chunk))
    return batches


def _run_case(sess: Any, input_name: str, wrapper: nn.Module, name: str, raw: Tensor, atol: float | None,
              min_agreement: float, rtol: float = 0.0) -> dict[str, Any]:
    """One batch through PyTorch and ONNX Runtime, compared; ``passed`` against the gates: label agreement, and
    max |diff| <= atol + rtol x max |PyTorch output| (``allowed_abs_diff``)."""
    x = _to_model_input(raw, wrapper)
    with torch.inference_mode():
        ref = wrapper(x)
    try:
        got = sess.run(None, {input_name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]
    except Exception as e:
        case = {"case": name, "error": f"ONNX Runtime failed: {_first_line(e)}"}
    else:
        case = {"case": name, **compare(ref, got, wrapper.output)}
        if atol is not None and case.get("max_abs_ref") is not None:
            case["allowed_abs_diff"] = atol + rtol * case["max_abs_ref"]
    case["passed"] = "error" not in case and case["label_agreement"] >= min_agreement and (
        "allowed_abs_diff" not in case or case["max_abs_diff"] <= case["allowed_abs_diff"])
    return case


def _static_probe(sess: Any, input_name: str, plan: Any) -> dict[str, Any]:
    """A static export must refuse another input size (one stride taller)."""
    shape = [plan.batch, 3, plan.height + plan.stride, plan.width]
    try:
        sess.run(None, {input_name: torch.zeros(*shape).numpy()})
    except Exception as e:
        return {"shape": shape, "rejected": True, "reason": _first_line(e)}
    return {"shape": shape, "rejected": False, "reason": ""}


def verify_onnx(
    path: str | Path,
    wrapper: nn.Module,
    plan: Any,
    cfg: Any,
    providers: Sequence[str] = ("cpu",),
    atol: float | None = 1e-4,
    min_agreement: float = 0.999,
    rtol: float = 0.0,
) -> dict[str, Any]:
    """Run every case through ONNX Runtime and PyTorch; returns the cases, the providers used and the verdict."""
    sess = create_session(path, providers, threads=cfg.threads)
    input_name = sess.get_inputs()[0].name
    cases = [_run_case(sess, input_name, wrapper, name, raw, atol, min_agreement, rtol)
             for name, raw in _verification_batches(plan, cfg)]
    failure = next((_failure_text(c, atol, min_agreement, rtol) for c in cases if not c["passed"]), "")
    static_probe = _static_probe(sess, input_name, plan) if plan.static else None
    if static_probe is not None and not static_probe["rejected"]:
        shape = "x".join(map(str, static_probe["shape"]))
        failure = failure or f"static export accepted another size {shape}"
    return {
        "providers_requested": list(providers),
        "providers_used": sess.get_providers(),
        "atol": atol,
        "rtol": rtol,
        "min_agreement": min_agreement,
        "cases": cases,
        "static_other_size": static_probe,
        "passed": not failure,
        "failure": failure,
    }


def _failure_text(case: dict[str, Any], atol: float | None, min_agreement: float, rtol: float = 0.0) -> str:
    if "error" in case:
        return f"{case['case']}: {case['error']}"
    parts = []
    if "allowed_abs_diff" in case and case["max_abs_diff"] > case["allowed_abs_diff"]:
        parts.append(f"max |diff| {case['max_abs_diff']:.3g} > {case['allowed_abs_diff']:.3g} (--atol {atol:g} + "
                     f"--rtol {rtol:g} x max |output| {case['max_abs_ref']:.3g})")
    if case["label_agreement"] < min_agreement:
        parts.append(f"label agreement {case['label_agreement']:.5f} < --min-agreement {min_agreement:g}")
    return f"{case['case']}: " + "; ".join(parts)
