"""Dataset checks: a fast up-front validation for training, and ``segkd data inspect`` that lists every problem."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from segkd.data.datasets import (
    DATASETS,
    SegDataset,
    dataset_info,
    list_split,
    map_label,
    read_label,
)
from segkd.errors import SegkdError


def _header_size(path: Path) -> tuple[int, int]:
    """(W, H) from the file header (no pixel decoding), or a one-line error."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise SegkdError(f"{path}: unreadable image ({type(e).__name__})") from None


def check_pair(ds: SegDataset, index: int, full: bool) -> None:
    """Raise the one-line error of the first problem of pair ``index``."""
    img, lab = ds.pairs[index]
    isize, lsize = _header_size(img), _header_size(lab)
    if isize != lsize:
        raise SegkdError(f"{lab}: label is {lsize[0]}x{lsize[1]} but its image {img.name} is "
                         f"{isize[0]}x{isize[1]} (W x H)")
    if full:
        try:
            with Image.open(img) as im:
                im.load()
        except Exception as e:
            raise SegkdError(f"{img}: unreadable image ({type(e).__name__}: {str(e)[:80]})") from None
        ds.load(index)  # decodes the label and checks its values


def validate_dataset(ds: SegDataset, full: bool = False) -> None:
    """Check every pair before training: headers and sizes always; pixels and label values when ``full``."""
    for i in range(len(ds)):
        check_pair(ds, i, full)


def inspect_dataset(root: str | Path, fmt: str | None = None, num_classes: int | None = None,
                    ignore_index: int = 255, splits: tuple[str, ...] | None = None) -> dict:
    """Splits, image sizes, class pixel frequencies and *every* unreadable or inconsistent file."""
    root = Path(root)
    name, _ = list_split(root, "train", fmt)
    spec = DATASETS.get(name)
    info = dataset_info(root, name, num_classes, ignore_index)
    report: dict = {"root": str(root), "format": name, "num_classes": info.num_classes,
                    "class_names": info.class_names, "ignore_index": ignore_index, "splits": {}, "problems": []}
    lut = spec.lut(ignore_index)
    for split in splits or spec.splits:
        _, listing = list_split(root, split, name)
        if not listing.pairs and all("not found" in p for p in listing.problems):
            continue  # the split does not exist
        report["problems"] += listing.problems
        sizes: Counter = Counter()
        counts = np.zeros(info.num_classes + 1, dtype=np.int64)  # last bin: ignore
        for img, lab in listing.pairs:
            try:
                with Image.open(img) as im:
                    im.load()
                    isize = im.size
            except Exception as e:
                report["problems"].append(f"{img}: unreadable image ({type(e).__name__})")
                continue
            try:
                raw = read_label(lab)
                if name == "cityscapes" and lab.name.endswith("_labelIds.png"):
                    from segkd.data.datasets import _cityscapes_lut_for

                    mapped = map_label(raw, _cityscapes_lut_for(lab, ignore_index), lab, info.num_classes,
                                       ignore_index)
                else:
                    mapped = map_label(raw, lut, lab, info.num_classes, ignore_index)
            except SegkdError as e:
                report["problems"].append(str(e))
                continue
            if (raw.shape[1], raw.shape[0]) != isize:
                report["problems"].append(f"{lab}: label is {raw.shape[1]}x{raw.shape[0]} but its image "
                                          f"{img.name} is {isize[0]}x{isize[1]} (W x H)")
                continue
            sizes[f"{isize[1]}x{isize[0]}"] += 1
            valid = mapped != ignore_index
            counts[: info.num_classes] += np.bincount(mapped[valid].ravel(), minlength=info.num_classes)
            counts[-1] += int((~valid).sum())
        total = int(counts.sum())
        report["splits"][split] = {
            "pairs": len(listing.pairs),
            "sizes_hxw": dict(sizes.most_common()),
            "class_pixels": {n: int(c) for n, c in zip(info.class_names, counts[:-1])},
            "class_share_pct": {n: round(100 * int(c) / total, 3) if total else 0.0
                                for n, c in zip(info.class_names, counts[:-1])},
            "ignore_pixels": int(counts[-1]),
        }
    if not report["splits"]:
        report["problems"].append(f"{root}: no split with images found")
    return report
