"""A procedural segmentation dataset, generated in seconds: the embedded default of the quickstart and tests.

Each image is a smooth, noisy background (class 0) with 3-7 shapes (discs, rotated rectangles, triangles,
ellipses) of the other classes drawn over each other. A class is recognisable by its colour *and* its texture
(stripes at a class angle and frequency), but every instance jitters its colour and the whole image gets sensor noise
and a random illumination, so a small model reaches a meaningful, not perfect, mIoU in a few hundred iterations.

Defaults: 96x128 images (HxW), 160 train / 40 val, 6 classes, written in about 3 s on one core. The size is chosen
for a 2-core CPU quickstart: a DeepLabV3-ResNet18 or SegFormer-B0 step at batch 8 stays well under a second.
Image ``i`` depends only on the seed, ``i``, the size and the class count, so a set is identical whatever
the counts asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from segkd.checkpoint import atomic_write_text, default_palette
from segkd.errors import SegkdError

SYNTH_VERSION = 1
SHAPE_NAMES = ["background", "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def _class_style(k: int, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    colour = rng.uniform(40, 215, size=3)
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(0.15, 0.6)
    return colour, angle, freq


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    r = rng.uniform(0.08, 0.25) * min(h, w)
    if kind == 0:  # disc
        return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    if kind == 1:  # rotated rectangle
        a = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
        v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        return (np.abs(u) < r) & (np.abs(v) < r * rng.uniform(0.4, 1.0))
    if kind == 2:  # triangle
        pts = rng.uniform(-r, r, size=(3, 2)) * 1.5 + [cx, cy]
        def side(p, q):
            return (xx - p[0]) * (q[1] - p[1]) - (yy - p[1]) * (q[0] - p[0])
        s1, s2, s3 = side(pts[0], pts[1]), side(pts[1], pts[2]), side(pts[2], pts[0])
        return ((s1 >= 0) & (s2 >= 0) & (s3 >= 0)) | ((s1 <= 0) & (s2 <= 0) & (s3 <= 0))
    # ellipse
    a = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
    v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
    return (u / r) ** 2 + (v / (r * rng.uniform(0.3, 0.8))) ** 2 < 1


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int = 4) -> np.ndarray:
    small = rng.uniform(0, 1, size=(cells, cells, 3)).astype(np.float32)
    return np.array(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)


def render(index: int, size: tuple[int, int], num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (uint8 H x W x 3) and label (uint8 H x W) number ``index`` of a synthetic set."""
    h, w = size
    styles = [_class_style(k, np.random.default_rng([seed, 10_000 + k])) for k in range(num_classes)]
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 0.6 * _smooth_noise(rng, h, w) + 0.4 * styles[0][0]
    lab = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(3, 8))):
        k = int(rng.integers(1, num_classes))
        mask = _shape_mask(int(rng.integers(0, 4)), yy, xx, rng, h, w)
        colour, angle, freq = styles[k]
        colour = colour + rng.normal(0, 18, size=3)
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq + rng.uniform(0, 6.28))
        tex = colour[None, None, :] + 35 * stripes[..., None]
        img[mask] = tex[mask]
        lab[mask] = k
    img = img * rng.uniform(0.75, 1.2) + rng.normal(0, 14, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), lab


def synthesize(out_dir: str | Path, n_train: int = 160, n_val: int = 40, size: tuple[int, int] = (96, 128),
               num_classes: int = 6, seed: int = 0, progress: bool = False, replace: bool = True) -> Path:
    """Write a ``folder``-layout dataset (images/, labels/, classes.json) to ``out_dir`` and return it.

    Files are ``images/{train,val}/{split}_NNNNN.png`` (RGB) and ``labels/...`` (one-channel class indices);
    ``classes.json`` holds the names and palette. An earlier synthetic set in ``out_dir`` is replaced; with
    ``replace=False`` (``segkd data synth`` without ``--force``, the rule ``train`` applies to a run directory) it
    is refused instead. Any other non-empty folder is always refused.
    """
    check_synth_options(n_train, n_val, size, num_classes, seed)
    out = Path(out_dir)
    _prepare_out(out, replace)
    from segkd.data.inspect import progress_bar

    for split, n, offset in (("train", n_train, 0), ("val", n_val, 1_000_000)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        with progress_bar(progress, f"writing {split}", n) as track:
            for i in track(range(n)):
                img, lab = render(offset + i, size, num_classes, seed)
                Image.fromarray(img).save(out / "images" / split / f"{split}_{i:05d}.png")
                Image.fromarray(lab).save(out / "labels" / split / f"{split}_{i:05d}.png")
    meta = {"classes": SHAPE_NAMES[:num_classes], "palette": default_palette(num_classes), "ignore_index": 255,
            "source": f"segkd synthetic v{SYNTH_VERSION}", "seed": seed, "size": list(size)}
    atomic_write_text(out / "classes.json", json.dumps(meta, indent=1))  # last: marks the set complete
    return out


def check_synth_options(n_train: int, n_val: int, size: tuple[int, int], num_classes: int, seed: int) -> None:
    """One-line errors for the options of a synthetic set, before any folder is made (``--size`` within segkd's
    pixel limit: 100000x100000 was a numpy allocation traceback after the folders were created)."""
    from segkd.shapes import parse_hw

    if not 2 <= num_classes <= len(SHAPE_NAMES):
        raise SegkdError(f"--num-classes must be 2..{len(SHAPE_NAMES)} for synthetic data, got {num_classes}")
    h, w = parse_hw(size, "--size")
    if n_train < 1 or n_val < 1 or min(h, w) < 16:
        raise SegkdError("synthetic data needs >= 1 train and val image (--train, --val) and a --size of at least "
                         "16x16")
    if not 0 <= seed < 2**63:  # numpy's SeedSequence takes non-negative entropy only
        raise SegkdError(f"--seed must be between 0 and {2**63 - 1} for synthetic data, got {seed}")


def _prepare_out(out: Path, replace: bool) -> None:
    """An empty or new folder is used as is; an earlier synthetic set is replaced when ``replace`` is set;
    anything else is refused."""
    if out.exists() and not out.is_dir():
        raise SegkdError(f"{out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    marker = out / "classes.json"
    try:
        earlier = json.loads(marker.read_text()).get("source", "") if marker.is_file() else ""
    except ValueError:
        earlier = ""
    if not str(earlier).startswith("segkd synthetic"):
        raise SegkdError(f"{out}: folder is not empty and holds no earlier synthetic set; choose another --out")
    if not replace:
        raise SegkdError(f"{out} already holds a synthetic set; pass --force to replace it or choose another --out")
    marker.unlink()
    for sub in ("images", "labels"):
        shutil.rmtree(out / sub, ignore_errors=True)


def cache_root() -> Path:
    return Path(os.environ.get("SEGKD_CACHE", Path.home() / ".cache" / "segkd"))


def default_synth_root(**kwargs) -> Path:
    """The embedded default dataset, generated once into the cache (atomically: temp folder then rename)."""
    key = json.dumps({"v": SYNTH_VERSION, **kwargs}, sort_keys=True)
    target = cache_root() / f"synth-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (target / "classes.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synth-", dir=target.parent))
    try:
        synthesize(tmp, **kwargs)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_data_root(data: str | Path) -> Path:
    """``"synth"`` -> the embedded default dataset; anything else must be an existing folder."""
    if str(data) == "synth":
        return default_synth_root()
    root = Path(data)
    if not root.is_dir():
        raise SegkdError(f"{root}: dataset folder not found (use --data synth for the built-in synthetic set)")
    return root
