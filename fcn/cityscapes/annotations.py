"""Cityscapes polygon annotations (gtFine `polygons.json` files): parse, validate, serialize.

Parsing is strict where cityscapesScripts would crash or silently draw garbage: every problem
is a DataError naming the file and, where it helps, the object index.

Polygons with fewer than 3 points: PIL (and so cityscapesScripts) fills a 2-point polygon as
the line between its points, and a repeated point as that pixel, so those are kept and drawn
the same way. A drawn object (not deleted, label id >= 0) with 0 or 1 points is an error:
PIL raises on it, cityscapesScripts crashes. Deleted and negative-id objects are never drawn
by either, so their point count does not matter. Coordinates must be finite numbers with
|value| < 2**30: PIL truncates them to C ints and subtracts them, so larger ones overflow
(undefined behaviour, not a drawing).

A file larger than MAX_ANNOTATION_BYTES is refused before it is read: parsed JSON takes ten
times its size or more in Python objects. imgWidth x imgHeight is checked against the pixel
limit by the masks stage, which allocates it (fcn.masks.generate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcn.errors import DataError
from fcn.cityscapes.labels import label_for_polygon


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


MAX_COORDINATE = 2**30
"""Vertices must satisfy |x|, |y| < MAX_COORDINATE (see the module docstring)."""

MAX_ANNOTATION_BYTES = 2**24
"""16 MiB: real gtFine polygon files are tens of KB (all 5,000 of them ship, masks included,
in a 241 MB zip), so this is far above any real one yet keeps parsing to a few hundred MB."""


_JSON_NUMBERS = frozenset((int, float))  # exact types: bool, a subclass of int, is no number


def _valid_point(point: Any) -> bool:
    """[x, y] of finite JSON numbers with |x|, |y| < MAX_COORDINATE (NaN fails the bounds)."""
    return (type(point) is list and len(point) == 2
            and type(point[0]) in _JSON_NUMBERS and type(point[1]) in _JSON_NUMBERS
            and -MAX_COORDINATE < point[0] < MAX_COORDINATE
            and -MAX_COORDINATE < point[1] < MAX_COORDINATE)


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
        resolved = label_for_polygon(label)
        if resolved is None:
            raise DataError(f"{where}: unknown label {label!r}")
        polygon = obj.get("polygon")
        if not isinstance(polygon, list):
            raise DataError(f"{where} ({label}): 'polygon' missing or not a list")
        if not all(map(_valid_point, polygon)):
            point = next(p for p in polygon if not _valid_point(p))
            raise DataError(f"{where} ({label}): polygon point {point!r} is not a pair of "
                            f"finite numbers within ±{MAX_COORDINATE}")
        deleted = obj.get("deleted", 0)
        if deleted not in (0, 1):  # also admits False/True
            raise DataError(f"{where} ({label}): 'deleted' must be 0 or 1, got {deleted!r}")
        if not deleted and resolved.id >= 0 and len(polygon) < 2:
            raise DataError(f"{where} ({label}): polygon has {len(polygon)} point(s); a drawn "
                            "object needs at least 2 (2 points draw a line, as PIL does)")
        objects.append(PolygonObject(label, tuple(map(tuple, polygon)), bool(deleted)))
    return Annotation(data["imgHeight"], data["imgWidth"], tuple(objects))


def read_annotation(path: str | Path) -> Annotation:
    """Read and validate a polygons file (at most MAX_ANNOTATION_BYTES)."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_ANNOTATION_BYTES + 1)
        if len(raw) > MAX_ANNOTATION_BYTES:
            raise DataError(f"{path}: annotation file is larger than {MAX_ANNOTATION_BYTES} "
                            "bytes (real polygon files are tens of KB); refusing to parse it")
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and ints of 4300+ digits
        raise DataError(f"{path}: malformed JSON: {exc}") from None
    except RecursionError:
        raise DataError(f"{path}: malformed JSON: nested too deeply") from None
    return parse_annotation(data, str(path))
