"""Dataset formats behind one registry, and the dataset class they all produce.

A format knows how to recognise its root folder, list (image, label) pairs of a split, name its classes and map
raw label values to train ids (a 256-entry lookup table). Adding a format is one ``Format`` plus one
``DATASETS.add`` call. Pair listing never raises: it returns problems too, so ``segkd data inspect`` can report
every bad file at once while ``build_dataset`` fails on the first with one line naming it.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from segkd.checkpoint import default_palette
from segkd.data import classes as C
from segkd.errors import SegkdError
from segkd.registry import Registry
from segkd.shapes import MAX_PIXELS

# PIL's decompression-bomb limit, set deliberately to segkd's one pixel limit (segkd.shapes.MAX_PIXELS, 64 Mpx):
# PIL warns above it and refuses above twice it; open_image refuses every file above it, from the header alone.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class DatasetInfo:
    format: str
    num_classes: int
    class_names: list[str]
    palette: list[list[int]]
    ignore_index: int = 255


@dataclass
class Listing:
    """Pairs of a split plus the problems met while pairing (missing labels, orphan labels)."""

    pairs: list[tuple[Path, Path]]
    problems: list[str]
    label_suffix: str = ""  # what label names add to their image's (``_mask``), when :func:`label_suffix` found it


def _no_suffix_luts(ignore_index: int) -> dict[str, np.ndarray]:
    return {}


@dataclass(frozen=True)
class Format:
    """How one dataset layout is recognised, paired, named and mapped to train ids.

    ``lut(ignore)`` maps raw label values of every file; ``suffix_luts(ignore)`` overrides it for label files whose
    name ends with a given suffix (Cityscapes ``*_labelIds.png`` next to ``*_labelTrainIds.png``).
    """

    name: str
    detect: Callable[[Path], bool]
    list_split: Callable[[Path, str], Listing]
    classes: Callable[[Path, int | None], tuple[list[str], list[list[int]]]]
    lut: Callable[[int], np.ndarray]
    splits: tuple[str, ...] = ("train", "val")
    suffix_luts: Callable[[int], dict[str, np.ndarray]] = _no_suffix_luts
    find_splits: Callable[[Path], tuple[str, ...]] | None = None  # splits present on disk (default: ``splits``)
    # formats that pair files by name in two folders: (root, split, --img-suffix, --seg-suffix) -> the listing
    list_named: Callable[[Path, str, str | None, str | None], Listing] | None = None

    def splits_in(self, root: Path) -> tuple[str, ...]:
        """The splits ``inspect`` looks at: those found on disk when the format can tell, else the usual ones."""
        found = self.find_splits(root) if self.find_splits else ()
        return found or self.splits


DATASETS: Registry[Format] = Registry("dataset format")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS) if folder.is_dir() else []


def label_suffix(image_stems: set[str], label_stems: list[str]) -> str:
    """The suffix every label name adds to its image's (``NAME_mask.png`` for ``NAME.jpg``: ``_mask``), found
    when no label is named exactly like an image; ``""`` otherwise. It starts at a ``_``, ``-`` or ``.`` of the
    first label's name such that the part before is an image's name, and every label must end with it; a layout
    that mixes conventions then reports its unpaired files as usual."""
    if not label_stems or any(stem in image_stems for stem in label_stems):
        return ""
    first = label_stems[0]
    for i, ch in enumerate(first):
        if ch in "_-." and first[:i] in image_stems and all(stem.endswith(first[i:]) for stem in label_stems):
            return first[i:]
    return ""


NAME_SUFFIX_FORMATS = ("folder", "mmseg")  # the formats --img-suffix/--seg-suffix apply to


def check_name_suffixes(img_suffix: str | None, seg_suffix: str | None) -> None:
    """``--img-suffix``/``--seg-suffix`` as mmseg's ``img_suffix``/``seg_map_suffix``: the end of the file names,
    extension included (``.jpg``, ``_mask.png``); labels are PNG files. One line naming the option otherwise.

    Why the extension is part of it (mmseg's choice): ``NAME_leftImg8bit.png`` and ``NAME.jpg`` are then one
    option each, and the options also pick the files (a folder may hold other files, e.g. colour previews)."""
    for flag, value, exts in (("--img-suffix", img_suffix, IMAGE_EXTS), ("--seg-suffix", seg_suffix, (".png",))):
        if value is None:
            continue
        if "/" in value or "\\" in value or not value.lower().endswith(exts):
            kinds = "an image extension (" + ", ".join(exts) + ")" if len(exts) > 1 else "'.png' (labels are PNG)"
            raise SegkdError(f"{flag} {value!r}: the end of the file names, extension included, ending in {kinds}; "
                             f"e.g. {'.jpg' if flag == '--img-suffix' else '_mask.png'}")


def _files_ending(folder: Path, suffix: str) -> list[tuple[str, Path]]:
    """``(name without suffix, path)`` of the files of ``folder`` whose name ends with ``suffix`` (exactly)."""
    return [(p.name[: -len(suffix)], p) for p in sorted(folder.iterdir())
            if p.is_file() and p.name.endswith(suffix) and len(p.name) > len(suffix)]


def _detected_labels(lab_dir: Path, names: set[str], problems: list[str]) -> tuple[dict[str, Path], str]:
    """The PNG labels of ``lab_dir`` by the name they label, and the suffix :func:`label_suffix` found (non-PNG
    files are problems)."""
    lab_files = _images_in(lab_dir)
    found = label_suffix(names, [p.stem for p in lab_files if p.suffix.lower() == ".png"])
    labels: dict[str, Path] = {}
    for lab in lab_files:
        if lab.suffix.lower() != ".png":
            problems.append(f"{lab}: labels must be PNG files (class indices, losslessly stored)")
        elif lab.stem.endswith(found):
            labels[lab.stem.removesuffix(found)] = lab
    return labels, found


def _suffix_problem(img_dir: Path, lab_dir: Path, images: list[tuple[str, Path]], labels: dict[str, Path],
                    img_suffix: str | None, seg_suffix: str | None, lab_end: str) -> str | None:
    """One line naming the folder and the suffix when an explicit suffix leaves a split without a pair."""
    if img_suffix and not images and any(p.is_file() for p in img_dir.iterdir()):
        return f"{img_dir}: no file name ends with --img-suffix {img_suffix!r}"
    if seg_suffix and not labels and any(p.is_file() for p in lab_dir.iterdir()):
        return f"{lab_dir}: no file name ends with --seg-suffix {seg_suffix!r}"
    if (img_suffix or seg_suffix) and images and labels and not any(n in labels for n, _ in images):
        given = " and ".join(f"{f} {v!r}" for f, v in (("--img-suffix", img_suffix), ("--seg-suffix", seg_suffix))
                             if v)
        name, img = images[0]
        return (f"{lab_dir}: no label pairs with an image of {img_dir} under {given} ({img.name} would need "
                f"{name}{lab_end})")
    return None


def _pair_by_stem(img_dir: Path, lab_dir: Path, img_suffix: str | None = None,
                  seg_suffix: str | None = None) -> Listing:
    """Pair ``img_dir/NAME{img_suffix}`` with ``lab_dir/NAME{seg_suffix}``. Without ``img_suffix`` every image file
    counts and NAME is its stem; without ``seg_suffix`` labels are the PNG files, named NAME or NAME plus the
    suffix :func:`label_suffix` detects. Files that do not end with a given suffix are ignored."""
    problems: list[str] = []
    if not img_dir.is_dir():
        return Listing([], [f"{img_dir}: image folder not found"])
    if not lab_dir.is_dir():
        return Listing([], [f"{lab_dir}: label folder not found"])
    images = _files_ending(img_dir, img_suffix) if img_suffix else [(p.stem, p) for p in _images_in(img_dir)]
    if seg_suffix:
        labels, found, lab_end = dict(_files_ending(lab_dir, seg_suffix)), seg_suffix[:-4], seg_suffix
    else:
        labels, found = _detected_labels(lab_dir, {n for n, _ in images}, problems)
        lab_end = found + ".png"
    wrong = _suffix_problem(img_dir, lab_dir, images, labels, img_suffix, seg_suffix, lab_end)
    if wrong:
        return Listing([], [wrong], found)
    pairs = []
    seen: set[str] = set()
    for name, img in images:
        lab = labels.get(name)
        if name in seen:
            problems.append(f"{img}: another image in {img_dir} has the same name {name!r}")
        elif lab is None:
            problems.append(f"{img}: missing label {lab_dir / (name + lab_end)}")
        else:
            pairs.append((img, lab))
            seen.add(name)
    problems += [f"{p}: label without an image in {img_dir}" for s, p in sorted(labels.items()) if s not in seen]
    return Listing(pairs, problems, found)


def _read_classes_file(root: Path) -> dict | None:
    for name in ("classes.json", "stats.json"):
        p = root / name
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                raise SegkdError(f"{p}: not a valid JSON class file ({str(e).splitlines()[0][:80]})") from None
            if isinstance(data, dict) and "classes" in data:
                return {**data, "_path": p}
    p = root / "classes.txt"
    if p.is_file():
        try:
            text = p.read_text()
        except UnicodeDecodeError as e:
            raise SegkdError(f"{p}: not a UTF-8 text class file ({e.reason} at byte {e.start})") from None
        return {"classes": _class_lines(text, p), "_path": p}
    return None


def _class_lines(text: str, path: Path) -> list[str]:
    """The names of a ``classes.txt``, one per line: line k names class id k, so a blank line between names would
    shift every later id and is refused; blank lines at the end are ignored."""
    lines = [ln.strip() for ln in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [i + 1 for i, ln in enumerate(lines) if not ln]
    if blank:
        raise SegkdError(f"{path}: line {blank[0]} is blank (line k names class id k, so it would shift every later "
                         "class); name the class or remove the line")
    return lines


def _check_unique(names: list[str], src: Path) -> None:
    """Two classes with one name make per-class tables and reports ambiguous: refused, naming both ids."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            raise SegkdError(f"{src}: class name {name!r} is given twice (ids {first[name]} and {i})")
        first[name] = i


def _folder_classes(root: Path, num_classes: int | None) -> tuple[list[str], list[list[int]]]:
    data = _read_classes_file(root)
    if data is not None:
        src = data.get("_path", root)
        raw = data["classes"]
        if not isinstance(raw, list) or not raw:
            raise SegkdError(f"{src}: 'classes' must be a non-empty list of names")
        names = []
        for c in raw:
            name = c if isinstance(c, str) else c.get("name") if isinstance(c, dict) else None
            if not isinstance(name, str):
                raise SegkdError(f"{src}: class entry {c!r} is neither a name nor an object with a 'name'")
            names.append(name)
        _check_unique(names, src)
        if num_classes is not None and num_classes != len(names):
            raise SegkdError(f"{src}: names {len(names)} classes but --num-classes is {num_classes}")
        palette = data.get("palette") or default_palette(len(names))
        ok = isinstance(palette, list) and len(palette) >= len(names) and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in palette[: len(names)])
        if not ok:
            raise SegkdError(f"{src}: 'palette' must hold one [r, g, b] (0..255) per class ({len(names)})")
        return names, [list(c) for c in palette[: len(names)]]
    if num_classes is None:
        raise SegkdError(f"{root}: folder dataset without classes.json/stats.json/classes.txt; pass --num-classes")
    return [f"class{i}" for i in range(num_classes)], default_palette(num_classes)


def _fixed(names: list[str], palette: list[list[int]] | None = None):
    def classes(root: Path, num_classes: int | None) -> tuple[list[str], list[list[int]]]:
        if num_classes is not None and num_classes != len(names):
            raise SegkdError(f"{root}: this format has {len(names)} classes, not {num_classes}")
        return list(names), palette or default_palette(len(names))

    return classes


def _subfolders(folder: Path) -> tuple[str, ...]:
    """Names of the sub-folders of ``folder``: train, val, test first, then the rest alphabetically."""
    if not folder.is_dir():
        return ()
    order = {"train": 0, "val": 1, "test": 2}
    return tuple(sorted((p.name for p in folder.iterdir() if p.is_dir()), key=lambda n: (order.get(n, 3), n)))


# ----------------------------------------------------------------------------------------------- the formats
def _split_folders(name: str, images: str, labels: str) -> Format:
    """A layout of ``ROOT/<images>/SPLIT`` and ``ROOT/<labels>/SPLIT`` paired by name (``--img-suffix`` and
    ``--seg-suffix`` apply), classes as for ``folder``."""
    return Format(
        name,
        detect=lambda r: (r / images).is_dir() and (r / labels).is_dir(),
        list_split=lambda r, s: _pair_by_stem(r / images / s, r / labels / s),
        classes=_folder_classes,
        lut=C.identity_lut,
        find_splits=lambda r: _subfolders(r / images),
        list_named=lambda r, s, i, g: _pair_by_stem(r / images / s, r / labels / s, i, g),
    )


DATASETS.add("folder", _split_folders("folder", "images", "labels"))
DATASETS.add("mmseg", _split_folders("mmseg", "img_dir", "ann_dir"))  # MMSegmentation's custom dataset layout

DATASETS.add("camvid", Format(
    "camvid",
    detect=lambda r: (r / "train").is_dir() and (r / "trainannot").is_dir(),
    list_split=lambda r, s: _pair_by_stem(r / s, r / f"{s}annot"),
    classes=_fixed(C.CAMVID_CLASSES, C.CAMVID_PALETTE),
    lut=partial(C.void_lut, C.CAMVID_VOID),
    splits=("train", "val", "test"),
))


def _cityscapes_split(root: Path, split: str) -> Listing:
    img_root, gt_root = root / "leftImg8bit" / split, root / "gtFine" / split
    if not img_root.is_dir():
        return Listing([], [f"{img_root}: image folder not found"])
    pairs, problems = [], []
    for city in sorted(p for p in img_root.iterdir() if p.is_dir()):
        for img in sorted(city.glob("*_leftImg8bit.png")):
            stem = img.name.removesuffix("_leftImg8bit.png")
            lab = gt_root / city.name / f"{stem}_gtFine_labelTrainIds.png"
            if not lab.is_file():
                lab = gt_root / city.name / f"{stem}_gtFine_labelIds.png"
            if lab.is_file():
                pairs.append((img, lab))
            else:
                problems.append(f"{img}: missing label {gt_root / city.name / (stem + '_gtFine_labelTrainIds.png')}")
    return Listing(pairs, problems)


DATASETS.add("cityscapes", Format(
    "cityscapes",
    detect=lambda r: (r / "leftImg8bit").is_dir() and (r / "gtFine").is_dir(),
    list_split=_cityscapes_split,
    classes=_fixed(C.CITYSCAPES_CLASSES, C.CITYSCAPES_PALETTE),
    lut=C.identity_lut,  # *_labelTrainIds.png already hold train ids
    suffix_luts=lambda ignore: {"_labelIds.png": C.cityscapes_id_lut(ignore)},
))


def _ade_root(root: Path) -> Path:
    return root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root


DATASETS.add("ade20k", Format(
    "ade20k",
    detect=lambda r: (_ade_root(r) / "images").is_dir() and (_ade_root(r) / "annotations").is_dir(),
    list_split=lambda r, s: _pair_by_stem(
        _ade_root(r) / "images" / {"train": "training", "val": "validation"}.get(s, s),
        _ade_root(r) / "annotations" / {"train": "training", "val": "validation"}.get(s, s),
    ),
    classes=_fixed(C.ADE20K_CLASSES, C.ADE20K_PALETTE),
    lut=C.reduce_zero_label_lut,
))


def _voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() and (cand / "SegmentationClass").is_dir():
            return cand
    return root


def _voc_split(root: Path, split: str) -> Listing:
    base = _voc_root(root)
    lst = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not lst.is_file():
        return Listing([], [f"{lst}: split list not found"])
    pairs, problems = [], []
    for name in (ln.strip() for ln in lst.read_text().splitlines()):
        if not name:
            continue
        img, lab = base / "JPEGImages" / f"{name}.jpg", base / "SegmentationClass" / f"{name}.png"
        if not img.is_file():
            problems.append(f"{img}: image listed in {lst.name} not found")
        elif not lab.is_file():
            problems.append(f"{img}: missing label {lab}")
        else:
            pairs.append((img, lab))
    return Listing(pairs, problems)


DATASETS.add("voc", Format(
    "voc",
    detect=lambda r: (_voc_root(r) / "SegmentationClass").is_dir(),
    list_split=_voc_split,
    classes=_fixed(C.VOC_CLASSES, C.VOC_PALETTE),
    lut=C.identity_lut,  # palettised PNGs hold class indices; 255 (object borders) is the ignore index
))

DETECT_ORDER = ("cityscapes", "ade20k", "voc", "camvid", "mmseg", "folder")


def detect_format(root: str | Path) -> str:
    """The format of a dataset root folder, or a one-line error listing what was looked for."""
    root = Path(root)
    if not root.is_dir():
        raise SegkdError(f"{root}: dataset folder not found")
    for name in DETECT_ORDER:
        if DATASETS.get(name).detect(root):
            return name
    raise SegkdError(f"{root}: no known dataset layout (folder: images/ + labels/; mmseg: img_dir/ + ann_dir/; "
                     "camvid: train/ + trainannot/; "
                     "cityscapes: leftImg8bit/ + gtFine/; ade20k: ADEChallengeData2016/; voc: SegmentationClass/)")


# ----------------------------------------------------------------------------------------------- the dataset
def short_reason(e: Exception) -> str:
    """An exception as a short single-line reason."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:80]}" if text else type(e).__name__


@contextmanager
def open_image(path: Path, what: str = "image") -> Iterator[Image.Image]:
    """``Image.open(path)`` (header read, pixels not decoded) with segkd's pixel limit: a file above
    :data:`~segkd.shapes.MAX_PIXELS` is refused naming it, before any decoding (PIL's warning becomes this error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found[1]):,} pixels" if found else "too many pixels"
        raise SegkdError(f"{path}: {what} of {size}, above segkd's limit of {MAX_PIXELS:,} (8192x8192; see "
                         "docs/data.md)") from None
    except Exception as e:  # PIL raises several types for broken files
        raise SegkdError(f"{path}: unreadable {what} ({short_reason(e)})") from None
    with im:
        yield im


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 H x W x 3, or a one-line error naming the file."""
    with open_image(path) as im:
        try:
            return np.array(im.convert("RGB"))
        except Exception as e:  # PIL raises several types for broken files
            raise SegkdError(f"{path}: unreadable image ({short_reason(e)})") from None


LABEL_MODES = ("L", "P", "I", "I;16", "1")


def check_label_mode(path: Path, mode: str) -> None:
    if mode not in LABEL_MODES:
        raise SegkdError(f"{path}: label image has mode {mode}; expected one channel of class indices "
                         "(convert colour-coded masks to indices first)")


def read_label(path: Path) -> np.ndarray:
    """Raw label values H x W (palettised PNGs give their indices), or a one-line error naming the file."""
    with open_image(path, "label") as im:
        check_label_mode(path, im.mode)
        try:
            arr = np.array(im)
        except Exception as e:
            raise SegkdError(f"{path}: unreadable label ({short_reason(e)})") from None
    return arr.astype(np.uint8) if arr.dtype == bool else arr


def map_label(raw: np.ndarray, lut: np.ndarray, path: Path, num_classes: int, ignore_index: int) -> np.ndarray:
    """Apply the format's lookup table and check every value is a class or the ignore index."""
    if raw.size and (raw.min() < 0 or raw.max() > 255):
        v = int(raw.min()) if raw.min() < 0 else int(raw.max())
        raise SegkdError(f"{path}: label value {v} outside 0..255")
    lab = lut[raw.astype(np.int64)]
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= num_classes))
    if bad.any():
        v = int(raw[bad][0])
        raise SegkdError(f"{path}: label value {v} is neither a class (0..{num_classes - 1}) "
                         f"nor the ignore index {ignore_index}")
    return lab


DECODED_BUDGET_BYTES = 512 * 2**20  # per process; CamVid's 367 training images at 180x240 take 63 MB


def item_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """The augmentation stream of one item, a function of ``(seed, epoch, index)`` only (``stream`` > 0 gives other
    datasets of the same run, e.g. unlabelled images, their own). SeedSequence entropy must be non-negative: a
    negative ``--seed`` is folded into 64 bits."""
    return np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, epoch, index] + ([stream] if stream else []))


Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]


class SegDataset(Dataset):
    """(image, label) pairs of one split. Items are ``(float 3 x H x W normalised, int64 H x W)``.

    Augmentation randomness is a function of ``(seed, epoch, index)`` only (``set_epoch``), so a run reproduces with
    any number of workers and after a resume.
    """

    def __init__(self, pairs: list[tuple[Path, Path]], info: DatasetInfo, lut: np.ndarray,
                 transform: Transform | None, seed: int = 0, split: str = "train",
                 suffix_luts: dict[str, np.ndarray] | None = None) -> None:
        self.pairs = pairs
        self.info = info
        self.lut = lut
        self.suffix_luts = dict(suffix_luts or {})
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.split = split
        self.memory_budget = DECODED_BUDGET_BYTES
        self._decoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._decoded_bytes = 0

    def lut_for(self, label: Path) -> np.ndarray:
        """The raw value -> train id table of one label file."""
        for suffix, lut in self.suffix_luts.items():
            if label.name.endswith(suffix):
                return lut
        return self.lut

    @property
    def names(self) -> list[str]:
        """File stems of the images, in item order (prediction files are named after them)."""
        return [img.stem for img, _ in self.pairs]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw image (uint8 H x W x 3) and mapped label (int64 H x W), checked.

        Decoded pairs are kept in memory (per process) while they fit in ``memory_budget`` bytes: small datasets
        are then decoded once per run instead of once per epoch (PNG decoding was about 40 % of a 60x80 step's
        data time on CamVid). Callers get their own copies."""
        hit = self._decoded.get(index)
        if hit is not None:
            return hit[0].copy(), hit[1].astype(np.int64)
        img, lab = self._read(index)
        size = img.nbytes + lab.size
        if self._decoded_bytes + size <= self.memory_budget and 0 <= lab.min() and lab.max() <= 255:
            self._decoded[index] = (img.copy(), lab.astype(np.uint8))
            self._decoded_bytes += size
        return img, lab

    def __getstate__(self) -> dict:  # DataLoader workers start with an empty memory cache of their own
        return {**self.__dict__, "_decoded": {}, "_decoded_bytes": 0}

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img_path, lab_path = self.pairs[index]
        img = read_image(img_path)
        raw = read_label(lab_path)
        if raw.shape[:2] != img.shape[:2]:
            raise SegkdError(f"{lab_path}: label is {raw.shape[1]}x{raw.shape[0]} but its image {img_path.name} "
                             f"is {img.shape[1]}x{img.shape[0]} (W x H)")
        return img, map_label(raw, self.lut_for(lab_path), lab_path, self.info.num_classes, self.info.ignore_index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, lab = self.load(index)
        rng = item_rng(self.seed, self.epoch, index)
        if self.transform is None:
            from segkd.data.transforms import to_tensors

            return to_tensors(img, lab)
        return self.transform(img, lab, rng)


def list_split(root: str | Path, split: str, fmt: str | None = None, img_suffix: str | None = None,
               seg_suffix: str | None = None) -> tuple[str, Listing]:
    """``(format name, pairs + pairing problems)`` of one split; detects the format unless ``fmt`` names it.
    ``img_suffix``/``seg_suffix`` (:func:`check_name_suffixes`) apply to the formats that pair files by name."""
    root = Path(root)
    name = DATASETS.canonical(fmt) if fmt else detect_format(root)
    spec = DATASETS.get(name)
    if img_suffix is None and seg_suffix is None:
        return name, spec.list_split(root, split)
    if spec.list_named is None:
        flag = "--img-suffix" if img_suffix is not None else "--seg-suffix"
        raise SegkdError(f"{flag}: {root} is a {name} dataset, whose file names its format fixes; the option "
                         f"applies to the {' and '.join(NAME_SUFFIX_FORMATS)} formats")
    return name, spec.list_named(root, split, img_suffix, seg_suffix)


def dataset_info(root: str | Path, fmt: str, num_classes: int | None = None, ignore_index: int = 255) -> DatasetInfo:
    """Class names and palette of a dataset root in format ``fmt`` (a folder's class file, or the standard table)."""
    names, palette = DATASETS.get(fmt).classes(Path(root), num_classes)
    return DatasetInfo(fmt, len(names), names, palette, ignore_index)


def build_dataset(root: str | Path, split: str = "train", fmt: str | None = None, transform: Transform | None = None,
                  num_classes: int | None = None, ignore_index: int = 255, seed: int = 0,
                  img_suffix: str | None = None, seg_suffix: str | None = None) -> SegDataset:
    """A split of a dataset root, its format detected unless ``fmt`` names it, its files named as
    ``img_suffix``/``seg_suffix`` say (:func:`list_split`). Fails on the first bad pairing."""
    root = Path(root)
    if not root.is_dir():
        raise SegkdError(f"{root}: dataset folder not found")
    name, listing = list_split(root, split, fmt, img_suffix, seg_suffix)
    if listing.problems:
        raise SegkdError(listing.problems[0] + (f" (+{len(listing.problems) - 1} more problems; run `segkd data "
                                                  "inspect`)" if len(listing.problems) > 1 else ""))
    if not listing.pairs:
        raise SegkdError(f"{root}: split {split!r} of this {name} dataset has no images")
    info = dataset_info(root, name, num_classes, ignore_index)
    spec = DATASETS.get(name)
    return SegDataset(listing.pairs, info, spec.lut(ignore_index), transform, seed, split,
                      spec.suffix_luts(ignore_index))
