"""Where files live in the official Cityscapes layout, and the stem that ties them together.

`<root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png` is an image and
`<root>/gtFine/<split>/<city>/<stem>_gtFine_<encoding>.png` its masks, with
stem = `<city>_<seq:06d>_<frame:06d>`. The official tools key everything on the stem, so we do.
"""

from __future__ import annotations

import re
from pathlib import Path

from fcn.errors import DataError

IMAGE_SUFFIX = "_leftImg8bit.png"
STEM_PATTERN = re.compile(r"([^_/]+)_(\d{6})_(\d{6})")
"""`<city>_<seq>_<frame>` as cityscapesScripts' `getCsFileInfo` reads it (city without '_')."""


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


def mask_path(root: str | Path, split: str, stem: str, encoding: str) -> Path:
    """`<root>/gtFine/<split>/<city>/<stem>_gtFine_<encoding>.png` (labelIds, instanceIds, …)."""
    return Path(root) / "gtFine" / split / city_of(stem) / f"{stem}_gtFine_{encoding}.png"


def list_images(root: str | Path, split: str) -> list[Path]:
    """Every `*_leftImg8bit.png` of a split, sorted by city then stem; an empty split is an error."""
    folder = Path(root) / "leftImg8bit" / split
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found (is data.root right?)")
    images = sorted(folder.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise DataError(f"{folder}: no *{IMAGE_SUFFIX} images in <city>/ sub-folders")
    for image in images:
        stem_of(image)  # every name must carry its key
    return images
