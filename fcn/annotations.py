"""Cityscapes `*_gtFine_polygons.json` annotations: parse, validate, serialize.

Parsing is strict where cityscapesScripts would crash or silently draw garbage: every problem
is a DataError naming the file and, where it helps, the object index.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcn.errors import DataError
from fcn.labels import label_for_polygon


@dataclass(frozen=True)
class PolygonObject:
    label: str
    polygon: tuple[tuple[float, float], ...]
    deleted: bool = False


@dataclass(frozen=True)
class Annotation:
    height: int
    width: int
    objects: tuple[PolygonObject, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        """The official JSON layout (as the Cityscapes annotation tool writes it)."""
        return {
            "imgHeight": self.height,
            "imgWidth": self.width,
            "objects": [
                {"label": o.label, "polygon": [list(p) for p in o.polygon],
                 "deleted": int(o.deleted)}
                for o in self.objects
            ],
        }


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_annotation(data: Any, source: str) -> Annotation:
    """Validate a decoded polygons JSON; `source` names the file in error messages."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(data).__name__}")
    for key in ("imgHeight", "imgWidth"):
        value = data.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise DataError(f"{source}: '{key}' missing or not a positive integer ({value!r})")
    raw_objects = data.get("objects")
    if not isinstance(raw_objects, list):
        raise DataError(f"{source}: 'objects' missing or not a list")
    objects = []
    for index, obj in enumerate(raw_objects):
        where = f"{source}: object {index}"
        if not isinstance(obj, dict) or not isinstance(obj.get("label"), str):
            raise DataError(f"{where}: expected an object with a string 'label'")
        label = obj["label"]
        if label_for_polygon(label) is None:
            raise DataError(f"{where}: unknown label {label!r}")
        polygon = obj.get("polygon")
        if not isinstance(polygon, list):
            raise DataError(f"{where} ({label}): 'polygon' missing or not a list")
        for point in polygon:
            if not (isinstance(point, list) and len(point) == 2 and all(map(_number, point))):
                raise DataError(f"{where} ({label}): polygon point {point!r} is not a pair of "
                                "finite numbers")
        deleted = obj.get("deleted", 0)
        if deleted not in (0, 1):  # also admits False/True
            raise DataError(f"{where} ({label}): 'deleted' must be 0 or 1, got {deleted!r}")
        objects.append(PolygonObject(label, tuple((p[0], p[1]) for p in polygon), bool(deleted)))
    return Annotation(data["imgHeight"], data["imgWidth"], tuple(objects))


def read_annotation(path: str | Path) -> Annotation:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed JSON: {exc}") from None
    return parse_annotation(data, str(path))
