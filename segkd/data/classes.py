"""Class names, palettes and label-value tables of the standard formats.

Names and colours live in ``class_tables.json`` beside this file (mmseg's orders, so checkpoints trained elsewhere
line up class by class); the lookup tables below turn raw label values into train ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_TABLES: dict = json.loads((Path(__file__).with_name("class_tables.json")).read_text())


def class_table(fmt: str) -> tuple[list[str], list[list[int]]]:
    """``(names, palette)`` of a standard format (copies, so callers may edit them)."""
    t = _TABLES[fmt]
    return list(t["classes"]), [list(c) for c in t["palette"]]


CITYSCAPES_CLASSES, CITYSCAPES_PALETTE = class_table("cityscapes")
ADE20K_CLASSES, ADE20K_PALETTE = class_table("ade20k")
VOC_CLASSES, VOC_PALETTE = class_table("voc")
CAMVID_CLASSES, CAMVID_PALETTE = class_table("camvid")

# Cityscapes labelIds -> trainIds (cityscapesScripts' labels.py); every other id is ignored
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                            25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CAMVID_VOID = 11  # SegNet's CamVid annotations: 0..10 classes, 11 = void


def identity_lut(ignore_index: int) -> np.ndarray:
    """A 256-entry lookup table that keeps every label value (validation happens after the lookup)."""
    return np.arange(256, dtype=np.int64)


def cityscapes_id_lut(ignore_index: int) -> np.ndarray:
    """labelIds -> trainIds; ids without a train id (unlabeled, ego vehicle, ..., license plate) -> ignore."""
    lut = np.full(256, ignore_index, dtype=np.int64)
    for src, dst in CITYSCAPES_ID_TO_TRAINID.items():
        lut[src] = dst
    return lut


def reduce_zero_label_lut(ignore_index: int) -> np.ndarray:
    """ADE20K: 0 ('other') becomes ignore, k becomes k - 1; 255 stays ignore."""
    lut = np.arange(256, dtype=np.int64) - 1
    lut[0] = ignore_index
    lut[255] = ignore_index
    return lut


def void_lut(void_value: int, ignore_index: int) -> np.ndarray:
    """SegNet CamVid: the void class (11) becomes the ignore index."""
    lut = np.arange(256, dtype=np.int64)
    lut[void_value] = ignore_index
    return lut
