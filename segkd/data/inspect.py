"""Dataset checks: a fast up-front validation for training, and ``segkd data inspect`` that lists every problem."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np

from segkd.data.datasets import (
    DATASETS,
    SegDataset,
    check_label_mode,
    dataset_info,
    list_split,
    open_image,
)
from segkd.errors import SegkdError

T = TypeVar("T")


@contextmanager
def progress_bar(enabled: bool, description: str, total: int) -> Iterator:
    """A transient rich bar on stderr (stdout stays clean for ``--json``), or a no-op when off or not a terminal."""
    from rich.console import Console

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda it: it
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def track(it: Iterable[T]) -> Iterator[T]:
            for x in it:
                yield x
                bar.advance(task)

        yield track


def _header(path: Path, what: str) -> tuple[tuple[int, int], str]:
    """``((W, H), mode)`` from the file header only (no pixel decoding), or a one-line error."""
    with open_image(path, what) as im:
        return im.size, im.mode


def check_pair(ds: SegDataset, index: int, full: bool) -> None:
    """Raise the one-line error of the first problem of pair ``index``.

    Cheap mode reads the two file headers: both files exist and open, the label has one channel and the sizes
    agree. ``full`` also decodes both files and checks every label value (what ``ds[index]`` would raise).
    """
    img, lab = ds.pairs[index]
    isize, _ = _header(img, "image")
    lsize, lmode = _header(lab, "label")
    check_label_mode(lab, lmode)
    if isize != lsize:
        raise SegkdError(f"{lab}: label is {lsize[0]}x{lsize[1]} but its image {img.name} is "
                         f"{isize[0]}x{isize[1]} (W x H)")
    if full:
        ds.load(index)  # decodes image and label, checks sizes and label values


def validate_dataset(ds: SegDataset, full: bool = False, progress: bool = False) -> None:
    """Check every pair before training, failing on the first problem with one line naming the file.

    Pairing (every image has its label) was checked when the dataset was built; this reads every header (existence,
    readability, one-channel labels, equal sizes), and with ``full`` decodes every file and checks label values.
    """
    with progress_bar(progress, f"checking {ds.split}", len(ds)) as track:
        for i in track(range(len(ds))):
            check_pair(ds, i, full)


def inspect_dataset(root: str | Path, fmt: str | None = None, num_classes: int | None = None,
                    ignore_index: int = 255, splits: tuple[str, ...] | None = None,
                    progress: bool = False, img_suffix: str | None = None, seg_suffix: str | None = None) -> dict:
    """Splits, image sizes, class pixel frequencies and *every* unreadable or inconsistent file; files named as
    ``img_suffix``/``seg_suffix`` say (``--img-suffix``/``--seg-suffix``, :func:`~segkd.data.datasets.list_split`).

    Unlike ``build_dataset``/``validate_dataset`` it never stops at a problem: each one is one line in
    ``report["problems"]`` and the statistics cover the pairs that loaded. A split that does not exist is skipped.
    """
    root = Path(root)
    name, _ = list_split(root, "train", fmt, img_suffix, seg_suffix)
    spec = DATASETS.get(name)
    info = dataset_info(root, name, num_classes, ignore_index)
    report: dict = {"root": str(root), "format": name, "num_classes": info.num_classes,
                    "class_names": info.class_names, "ignore_index": ignore_index, "img_suffix": img_suffix,
                    "seg_suffix": seg_suffix, "splits": {}, "problems": []}
    wanted = splits or spec.splits_in(root)
    missing: list[str] = []
    for split in wanted:
        _, listing = list_split(root, split, name, img_suffix, seg_suffix)
        if not listing.pairs and not listing.problems:  # the split's folders exist but hold no image
            report["problems"].append(f"{root}: split {split!r} has no images (its folders are empty)")
            continue
        if not listing.pairs and all("not found" in p for p in listing.problems):
            missing += listing.problems  # the split does not exist; said only if no split does
            continue
        report["problems"] += listing.problems
        ds = SegDataset(listing.pairs, info, spec.lut(ignore_index), None, split=split,
                        suffix_luts=spec.suffix_luts(ignore_index))
        sizes: Counter = Counter()
        counts = np.zeros(info.num_classes + 1, dtype=np.int64)  # last bin: ignore
        bad = 0
        with progress_bar(progress, f"reading {split}", len(ds)) as track:
            for i in track(range(len(ds))):
                try:
                    img, lab = ds.load(i)
                except SegkdError as e:
                    report["problems"].append(str(e))
                    bad += 1
                    continue
                sizes[f"{img.shape[0]}x{img.shape[1]}"] += 1
                valid = lab != ignore_index
                counts[: info.num_classes] += np.bincount(lab[valid].ravel(), minlength=info.num_classes)
                counts[-1] += int((~valid).sum())
        total = int(counts.sum())
        report["splits"][split] = {
            "pairs": len(listing.pairs),
            "label_suffix": listing.label_suffix,
            "bad_pairs": bad,
            "sizes_hxw": dict(sizes.most_common()),
            "class_pixels": {n: int(c) for n, c in zip(info.class_names, counts[:-1])},
            "class_share_pct": {n: round(100 * int(c) / total, 3) if total else 0.0
                                for n, c in zip(info.class_names, counts[:-1])},
            "ignore_pixels": int(counts[-1]),
            "ignore_share_pct": round(100 * int(counts[-1]) / total, 3) if total else 0.0,
        }
    if not report["splits"]:
        report["problems"].append(f"{root}: no split with images found (looked for {', '.join(wanted)})")
        report["problems"] += missing
    return report
