"""The Cityscapes label table and the lookup tables derived from it.

The table is the one in cityscapesScripts (`helpers/labels.py`); tests compare it field by
field with that package, so the two can never drift apart.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

IGNORE_INDEX = 255
"""trainId of every label that is not evaluated (the loss and the metrics skip it)."""


class Label(NamedTuple):
    name: str
    id: int
    trainId: int
    category: str
    categoryId: int
    hasInstances: bool
    ignoreInEval: bool
    color: tuple[int, int, int]


# fmt: off
LABELS: tuple[Label, ...] = (
    #      name                    id  trainId  category        catId  hasInst  ignore  color
    Label("unlabeled",             0,  255,     "void",         0,     False,   True,   (0, 0, 0)),
    Label("ego vehicle",           1,  255,     "void",         0,     False,   True,   (0, 0, 0)),
    Label("rectification border",  2,  255,     "void",         0,     False,   True,   (0, 0, 0)),
    Label("out of roi",            3,  255,     "void",         0,     False,   True,   (0, 0, 0)),
    Label("static",                4,  255,     "void",         0,     False,   True,   (0, 0, 0)),
    Label("dynamic",               5,  255,     "void",         0,     False,   True,   (111, 74, 0)),
    Label("ground",                6,  255,     "void",         0,     False,   True,   (81, 0, 81)),
    Label("road",                  7,  0,       "flat",         1,     False,   False,  (128, 64, 128)),
    Label("sidewalk",              8,  1,       "flat",         1,     False,   False,  (244, 35, 232)),
    Label("parking",               9,  255,     "flat",         1,     False,   True,   (250, 170, 160)),
    Label("rail track",            10, 255,     "flat",         1,     False,   True,   (230, 150, 140)),
    Label("building",              11, 2,       "construction", 2,     False,   False,  (70, 70, 70)),
    Label("wall",                  12, 3,       "construction", 2,     False,   False,  (102, 102, 156)),
    Label("fence",                 13, 4,       "construction", 2,     False,   False,  (190, 153, 153)),
    Label("guard rail",            14, 255,     "construction", 2,     False,   True,   (180, 165, 180)),
    Label("bridge",                15, 255,     "construction", 2,     False,   True,   (150, 100, 100)),
    Label("tunnel",                16, 255,     "construction", 2,     False,   True,   (150, 120, 90)),
    Label("pole",                  17, 5,       "object",       3,     False,   False,  (153, 153, 153)),
    Label("polegroup",             18, 255,     "object",       3,     False,   True,   (153, 153, 153)),
    Label("traffic light",         19, 6,       "object",       3,     False,   False,  (250, 170, 30)),
    Label("traffic sign",          20, 7,       "object",       3,     False,   False,  (220, 220, 0)),
    Label("vegetation",            21, 8,       "nature",       4,     False,   False,  (107, 142, 35)),
    Label("terrain",               22, 9,       "nature",       4,     False,   False,  (152, 251, 152)),
    Label("sky",                   23, 10,      "sky",          5,     False,   False,  (70, 130, 180)),
    Label("person",                24, 11,      "human",        6,     True,    False,  (220, 20, 60)),
    Label("rider",                 25, 12,      "human",        6,     True,    False,  (255, 0, 0)),
    Label("car",                   26, 13,      "vehicle",      7,     True,    False,  (0, 0, 142)),
    Label("truck",                 27, 14,      "vehicle",      7,     True,    False,  (0, 0, 70)),
    Label("bus",                   28, 15,      "vehicle",      7,     True,    False,  (0, 60, 100)),
    Label("caravan",               29, 255,     "vehicle",      7,     True,    True,   (0, 0, 90)),
    Label("trailer",               30, 255,     "vehicle",      7,     True,    True,   (0, 0, 110)),
    Label("train",                 31, 16,      "vehicle",      7,     True,    False,  (0, 80, 100)),
    Label("motorcycle",            32, 17,      "vehicle",      7,     True,    False,  (0, 0, 230)),
    Label("bicycle",               33, 18,      "vehicle",      7,     True,    False,  (119, 11, 32)),
    Label("license plate",         -1, -1,      "vehicle",      7,     False,   True,   (0, 0, 142)),
)
# fmt: on

NAME_TO_LABEL: dict[str, Label] = {label.name: label for label in LABELS}
ID_TO_LABEL: dict[int, Label] = {label.id: label for label in LABELS}

MAX_ID = max(label.id for label in LABELS)  # 33: label ids fit in [0, MAX_ID]
NUM_IDS = MAX_ID + 1

EVAL_LABELS: tuple[Label, ...] = tuple(
    sorted((label for label in LABELS if not label.ignoreInEval), key=lambda lab: lab.trainId)
)
"""The 19 evaluated classes, in trainId order."""
NUM_CLASSES = len(EVAL_LABELS)
CLASS_NAMES: tuple[str, ...] = tuple(label.name for label in EVAL_LABELS)

CATEGORIES: tuple[str, ...] = tuple(
    dict.fromkeys(label.category for label in LABELS if label.categoryId > 0)
)
"""The 7 evaluated categories (flat … vehicle), in categoryId order; 'void' is not scored."""


def _table(values: dict[int, object], size: int, fill: object, dtype: np.dtype | type) -> np.ndarray:
    table = np.full((size,) + np.shape(fill), fill, dtype=dtype)
    for key, value in values.items():
        table[key] = value
    return table


_DRAWN = [label for label in LABELS if label.id >= 0]

ID_TO_TRAINID: np.ndarray = _table(
    {lab.id: lab.trainId for lab in _DRAWN}, 256, IGNORE_INDEX, np.uint8
)
"""uint8[256]: labelId → trainId (255 for ignored labels and ids outside the table)."""

TRAINID_TO_ID: np.ndarray = _table(
    {lab.trainId: lab.id for lab in EVAL_LABELS}, 256, 0, np.uint8
)
"""uint8[256]: trainId → labelId (255/ignore → 0, 'unlabeled'), for server submissions."""

ID_TO_COLOR: np.ndarray = _table({lab.id: lab.color for lab in _DRAWN}, 256, (0, 0, 0), np.uint8)
"""uint8[256, 3]: labelId → RGB color."""

TRAINID_TO_COLOR: np.ndarray = _table(
    {lab.trainId: lab.color for lab in EVAL_LABELS}, 256, (0, 0, 0), np.uint8
)
"""uint8[256, 3]: trainId → RGB color (ignore → black)."""

def label_for_polygon(name: str) -> Label | None:
    """The label an annotation object is drawn with, as cityscapesScripts resolves it.

    A name unknown to the table but ending in 'group' (e.g. 'cargroup') is drawn as the label
    without the suffix. Returns None for unknown names; callers turn that into an error.
    """
    if name in NAME_TO_LABEL:
        return NAME_TO_LABEL[name]
    if name.endswith("group"):
        return NAME_TO_LABEL.get(name[: -len("group")])
    return None
