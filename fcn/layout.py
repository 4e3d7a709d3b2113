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
