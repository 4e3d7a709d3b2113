"""Polygons → label masks in the four Cityscapes encodings, pixel-identical to cityscapesScripts.

cityscapesScripts (`json2labelImg.createLabelImage`, `json2instanceImg.createInstanceImage`)
draws every annotation once per encoding. Here each annotation is drawn once, with PIL's
`ImageDraw.polygon` (the same rasterizer, so the same pixels), into a map of small "palette"
indices; the encodings are then table lookups:

- a palette entry is a distinct (labelId, instanceId) pair, so two buildings share one entry
  and every instance gets its own; with <= 256 entries (virtually always) the map is 8-bit;
- labelIds, labelTrainIds and color follow from the labelId, instanceIds from the instanceId.

The semantics are the reference's: background `unlabeled`; objects in file order, later ones
covering earlier ones; `deleted` objects skipped; a `*group` label drawn as its base label, and
for instances a group (plain label id); negative ids (license plate) not drawn; the k-th
non-group object of a class with instances (counted per class from 0 in file order, deleted
ones not counted) gets `id * 1000 + k`. Colors are RGBA with alpha 255 everywhere, as PIL gives
an RGB fill on an RGBA image. Instance ids above 65535 cannot be stored in a 16-bit PNG and
are an error (the reference's 32-bit image cannot be saved as PNG at all).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image, ImageDraw

from fcn.cityscapes.annotations import Annotation
from fcn.cityscapes.labels import ID_TO_COLOR, ID_TO_TRAINID, NAME_TO_LABEL, label_for_polygon
from fcn.cityscapes.layout import ENCODINGS
from fcn.errors import DataError
from fcn.images import write_label_png
from fcn.png import encode_png

MAX_INSTANCE_ID: Final = np.iinfo(np.uint16).max

_ID_TO_RGBA32: Final = (
    ID_TO_COLOR[:, 0].astype("<u4")
    | ID_TO_COLOR[:, 1].astype("<u4") << 8
    | ID_TO_COLOR[:, 2].astype("<u4") << 16
    | np.uint32(255) << 24
).astype("<u4")
"""labelId → RGBA packed little-endian, so one lookup fills all four channels."""


def _check_encodings(encodings: Iterable[str]) -> tuple[str, ...]:
    encodings = tuple(encodings)
    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown:
        raise ValueError(f"unknown encoding(s) {unknown}; known: {', '.join(ENCODINGS)}")
    return encodings


def _palette(annotation: Annotation, source: str, check_instances: bool
             ) -> tuple[list[tuple[tuple[tuple[float, float], ...], int, int]], np.ndarray, np.ndarray]:
    """What to draw: (polygon, palette index, object index) in file order, and per palette
    index its labelId (uint8) and instanceId (uint16)."""
    entries: dict[tuple[int, int], int] = {(0, 0): 0}  # background: unlabeled, id 0
    instances: dict[str, int] = {}
    draws = []
    for index, obj in enumerate(annotation.objects):
        if obj.deleted:
            continue
        label = label_for_polygon(obj.label)
        if label is None:
            raise DataError(f"{source}: object {index}: unknown label {obj.label!r}")
        instance = label.id
        if label.hasInstances and obj.label in NAME_TO_LABEL:  # not a '*group'
            count = instances.get(label.name, 0)
            instances[label.name] = count + 1
            instance = label.id * 1000 + count
            if check_instances and instance > MAX_INSTANCE_ID:
                raise DataError(f"{source}: object {index} ({obj.label}): instance id {instance} "
                                "does not fit a 16-bit instanceIds PNG")
        if label.id < 0:
            continue
        draws.append((obj.polygon, entries.setdefault((label.id, instance), len(entries)), index))
    ids = np.array([key[0] for key in entries], np.uint8)
    instance_ids = np.array([min(key[1], MAX_INSTANCE_ID) for key in entries], np.uint16)
    return draws, ids, instance_ids


def render(annotation: Annotation, encodings: Iterable[str] = ENCODINGS,
           source: str = "<annotation>") -> dict[str, np.ndarray]:
    """The masks of one annotation, drawn once: {encoding: array}.

    labelIds, labelTrainIds: uint8[H, W]; color: uint8[H, W, 4] (RGBA); instanceIds:
    uint16[H, W]. `source` names the annotation in error messages.
    """
    encodings = _check_encodings(encodings)
    draws, ids, instance_ids = _palette(annotation, source, "instanceIds" in encodings)
    mode = "L" if len(ids) <= 256 else "I"
    canvas = Image.new(mode, (annotation.width, annotation.height), 0)
    drawer = ImageDraw.Draw(canvas)
    for polygon, entry, index in draws:
        try:
            drawer.polygon(polygon, fill=entry)
        except (TypeError, ValueError, OverflowError) as exc:
            raise DataError(f"{source}: object {index} ({annotation.objects[index].label}): "
                            f"cannot draw polygon: {exc}") from None
    # numpy casts indices to intp on every take: cast once when several lookups follow
    entry_map = np.asarray(canvas)
    if len(encodings) > 1:
        entry_map = entry_map.astype(np.intp)
    masks: dict[str, np.ndarray] = {}
    for encoding in encodings:
        if encoding == "labelIds":
            masks[encoding] = np.take(ids, entry_map)
        elif encoding == "labelTrainIds":
            masks[encoding] = np.take(ID_TO_TRAINID[ids], entry_map)
        elif encoding == "color":
            rgba = np.take(_ID_TO_RGBA32[ids], entry_map)
            masks[encoding] = rgba.view(np.uint8).reshape(annotation.height, annotation.width, 4)
        else:
            masks[encoding] = np.take(instance_ids, entry_map)
    return masks


def draw_label_ids(annotation: Annotation) -> np.ndarray:
    """uint8[H, W] labelIds of one annotation."""
    return render(annotation, ("labelIds",))["labelIds"]


def write_masks(masks: Mapping[str, np.ndarray], paths: Mapping[str, Path],
                atomic: bool = True) -> None:
    """Write each mask to its path as PNG.

    atomic: each through a temporary file + rename (never half a file). Pass False only when
    the folder itself is private until complete (fcn.atomic.atomic_dir): the rename per file then
    adds nothing but a few ms per image.
    """
    for encoding, path in paths.items():
        if atomic:
            write_label_png(path, masks[encoding])
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(masks[encoding]))
