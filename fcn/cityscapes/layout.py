"""Where files live in the official Cityscapes layout, and the stem that ties them together.

`<root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png` is an image,
`<root>/gtFine/<split>/<city>/<stem>_gtFine_polygons.json` its annotation and
`<root>/gtFine/<split>/<city>/<stem>_gtFine_<encoding>.png` its masks, with
stem = `<city>_<seq:06d>_<frame:06d>`. The official tools key everything on the stem, so we do.
This is the only module that spells these names out.
"""

from __future__ import annotations

import re
from pathlib import Path

from fcn.errors import DataError

SPLITS = ("train", "val", "test")
ENCODINGS = ("labelIds", "labelTrainIds", "color", "instanceIds")
"""Every mask encoding, in the order files are written."""

IMAGE_SUFFIX = "_leftImg8bit.png"
POLYGONS_SUFFIX = "_gtFine_polygons.json"
STEM_PATTERN = re.compile(r"([^_/]+)_(\d{6})_(\d{6})")
"""`<city>_<seq>_<frame>` as cityscapesScripts' `getCsFileInfo` reads it (city without '_')."""
PREDICTION_PATTERN = re.compile(r"([^_]+_\d{6}_\d{6}).*\.png")
"""A prediction file as the official evaluator and server find it: `<stem>*.png`."""
FRAME = 19
"""Real Cityscapes fine annotations are the 20th frame of each snippet: `…_000019_…`."""


def mask_suffix(encoding: str) -> str:
    """`_gtFine_<encoding>.png`, for a known encoding."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    return f"_gtFine_{encoding}.png"


def make_stem(city: str, seq: int, frame: int = FRAME) -> str:
    """`<city>_<seq:06d>_<frame:06d>`: the key that ties an image to its annotations."""
    return f"{city}_{seq:06d}_{frame:06d}"


def stem_of(path: str | Path) -> str:
    """The `<city>_<seq>_<frame>` key at the start of a Cityscapes file name."""
    match = STEM_PATTERN.match(Path(path).name)
    if not match:
        raise DataError(f"{path}: file name does not start with <city>_<seq:06d>_<frame:06d>")
    return match.group(0)


def city_of(stem: str) -> str:
    return stem.split("_", 1)[0]


def image_path(root: str | Path, split: str, stem: str) -> Path:
    return Path(root) / "leftImg8bit" / split / city_of(stem) / f"{stem}{IMAGE_SUFFIX}"


def polygons_path(root: str | Path, split: str, stem: str) -> Path:
    return Path(root) / "gtFine" / split / city_of(stem) / f"{stem}{POLYGONS_SUFFIX}"


def mask_path(root: str | Path, split: str, stem: str, encoding: str) -> Path:
    """`<root>/gtFine/<split>/<city>/<stem>_gtFine_<encoding>.png` (labelIds, instanceIds, …)."""
    return Path(root) / "gtFine" / split / city_of(stem) / f"{stem}{mask_suffix(encoding)}"


def submission_name(stem: str) -> str:
    """`<city>/<stem>_leftImg8bit.png`: an image's prediction in an export folder and zip
    (named like its image, so `<stem>*.png` matches it exactly once)."""
    return f"{city_of(stem)}/{stem}{IMAGE_SUFFIX}"


def split_files(folder: Path, suffix: str, what: str, noun: str = "") -> list[Path]:
    """Every `<city>/*<suffix>` file under a split folder, sorted; a missing folder or an
    empty split is an error naming the folder (a wrong data.root is the usual cause)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found (is data.root right?)")
    files = sorted(folder.glob(f"*/*{suffix}"))
    if not files:
        raise DataError(f"{folder}: no *{suffix}{noun} in <city>/ sub-folders")
    return files


def list_images(root: str | Path, split: str) -> list[Path]:
    """Every `*_leftImg8bit.png` of a split, sorted by city then stem; an empty split is an error."""
    images = split_files(Path(root) / "leftImg8bit" / split, IMAGE_SUFFIX, "image", " images")
    for image in images:
        stem_of(image)  # every name must carry its key
    return images


def list_annotations(root: str | Path, split: str) -> list[tuple[str, Path]]:
    """(stem, path) of every `*_gtFine_polygons.json` of a split, each name checked to be
    `<city>/<city>_<seq:06d>_<frame:06d>_gtFine_polygons.json`."""
    found = []
    for path in split_files(Path(root) / "gtFine" / split, POLYGONS_SUFFIX, "annotation"):
        stem = path.name.removesuffix(POLYGONS_SUFFIX)
        if stem_of(path) != stem or city_of(stem) != path.parent.name:
            raise DataError(f"{path}: expected <city>/<city>_<seq:06d>_<frame:06d>"
                            f"{POLYGONS_SUFFIX}")
        found.append((stem, path))
    return found


def is_mask_file(relative: Path) -> bool:
    """Whether a path relative to a generated root is `gtFine/<split>/<city>/<stem>_gtFine_<encoding>.png`."""
    parts = relative.parts
    return (len(parts) == 4 and parts[0] == "gtFine"
            and parts[3].endswith(tuple(mask_suffix(e) for e in ENCODINGS)))
