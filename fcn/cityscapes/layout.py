"""Where files live in the official Cityscapes layout, and the stem that ties them together.

`<root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png` is an image,
`<root>/<set>/<split>/<city>/<stem>_<set>_polygons.json` its annotation and
`<root>/<set>/<split>/<city>/<stem>_<set>_<encoding>.png` its masks, with
stem = `<city>_<seq:06d>_<frame:06d>` and `<set>` an annotation set: `gtFine` (5,000 images:
train, val, test) or `gtCoarse` (train, val, and the 19,998 images of `train_extra`).
`<root>/leftImg8bit_sequence/<split>/<city>/<stem>_leftImg8bit.png` are the video snippets
around each annotated frame (`sequence_path`).
The official tools key everything on the stem, so we do. This is the only module that spells
these names out.

A training source is a (split, annotation set) pair, written `<split>` for gtFine (`train`)
or `<set>/<split>` (`gtCoarse/train_extra`): `parse_source`.
"""

from __future__ import annotations

import re
from pathlib import Path

from fcn.errors import DataError

SPLITS = ("train", "val", "test")
"""gtFine's splits (the default pipeline's)."""
FINE, COARSE = "gtFine", "gtCoarse"
ANNOTATION_SPLITS: dict[str, tuple[str, ...]] = {FINE: SPLITS, COARSE: ("train", "train_extra", "val")}
"""Each annotation set's splits, as the dataset ships them."""
IMAGE_SPLITS = ("train", "val", "test", "train_extra")
"""Every split of leftImg8bit."""
ENCODINGS = ("labelIds", "labelTrainIds", "color", "instanceIds")
"""Every mask encoding, in the order files are written."""

SEQUENCE = "leftImg8bit_sequence"
"""The video snippets: 30 frames around every annotated one (`sequence_path`)."""

IMAGE_SUFFIX = "_leftImg8bit.png"
POLYGONS_SUFFIX = "_gtFine_polygons.json"
"""gtFine's; `polygons_suffix` gives any set's."""
STEM_PATTERN = re.compile(r"([^_/]+)_(\d{6})_(\d{6})")
"""`<city>_<seq>_<frame>` as cityscapesScripts' `getCsFileInfo` reads it (city without '_')."""
PREDICTION_PATTERN = re.compile(r"([^_]+_\d{6}_\d{6}).*\.png")
"""A prediction file as the official evaluator and server find it: `<stem>*.png`."""
FRAME = 19
"""Real Cityscapes fine annotations are the 20th frame of each snippet: `…_000019_…`."""


def check_annotation(annotation: str, split: str | None = None) -> None:
    """A known annotation set (and, if given, one of its splits), else ValueError."""
    if annotation not in ANNOTATION_SPLITS:
        raise ValueError(f"unknown annotation set {annotation!r}; known: "
                         f"{', '.join(ANNOTATION_SPLITS)}")
    if split is not None and split not in ANNOTATION_SPLITS[annotation]:
        raise ValueError(f"{annotation} has no split {split!r}; it has "
                         f"{', '.join(ANNOTATION_SPLITS[annotation])}")


def polygons_suffix(annotation: str = FINE) -> str:
    """`_<set>_polygons.json`."""
    check_annotation(annotation)
    return f"_{annotation}_polygons.json"


def mask_suffix(encoding: str, annotation: str = FINE) -> str:
    """`_<set>_<encoding>.png`, for a known encoding and annotation set."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    check_annotation(annotation)
    return f"_{annotation}_{encoding}.png"


SOURCES = tuple(split for split in SPLITS if split != "test") + tuple(
    f"{annotation}/{split}" for annotation, splits in ANNOTATION_SPLITS.items()
    for split in splits if split != "test")
"""Every annotated (split, set) pair a training can read, as `parse_source` reads them."""


def parse_source(source: str) -> tuple[str, str]:
    """(split, annotation set) of a training source: `train` → (train, gtFine),
    `gtCoarse/train_extra` → (train_extra, gtCoarse); ValueError for anything else."""
    annotation, _, split = source.rpartition("/")
    annotation = annotation or FINE
    check_annotation(annotation, split)
    if split == "test":
        raise ValueError(f"{source}: the test split has no annotations to train on")
    return split, annotation


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


def sequence_path(root: str | Path, split: str, stem: str) -> Path:
    """`<root>/leftImg8bit_sequence/<split>/<city>/<stem>_leftImg8bit.png`: a frame of a
    snippet (named like the images; the annotated frame is the snippet's 20th)."""
    return Path(root) / SEQUENCE / split / city_of(stem) / f"{stem}{IMAGE_SUFFIX}"


def polygons_path(root: str | Path, split: str, stem: str, annotation: str = FINE) -> Path:
    """`<root>/<set>/<split>/<city>/<stem>_<set>_polygons.json`."""
    return (Path(root) / annotation / split / city_of(stem)
            / f"{stem}{polygons_suffix(annotation)}")


def mask_path(root: str | Path, split: str, stem: str, encoding: str,
              annotation: str = FINE) -> Path:
    """`<root>/<set>/<split>/<city>/<stem>_<set>_<encoding>.png` (labelIds, instanceIds, …)."""
    return (Path(root) / annotation / split / city_of(stem)
            / f"{stem}{mask_suffix(encoding, annotation)}")


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


def list_annotations(root: str | Path, split: str,
                     annotation: str = FINE) -> list[tuple[str, Path]]:
    """(stem, path) of every `*_<set>_polygons.json` of a split, each name checked to be
    `<city>/<city>_<seq:06d>_<frame:06d>_<set>_polygons.json`."""
    suffix = polygons_suffix(annotation)
    found = []
    for path in split_files(Path(root) / annotation / split, suffix, "annotation"):
        stem = path.name.removesuffix(suffix)
        if stem_of(path) != stem or city_of(stem) != path.parent.name:
            raise DataError(f"{path}: expected <city>/<city>_<seq:06d>_<frame:06d>{suffix}")
        found.append((stem, path))
    return found


def is_mask_file(relative: Path) -> bool:
    """Whether a path relative to a generated root is
    `<set>/<split>/<city>/<stem>_<set>_<encoding>.png`."""
    parts = relative.parts
    return (len(parts) == 4 and parts[0] in ANNOTATION_SPLITS
            and parts[3].endswith(tuple(mask_suffix(e, parts[0]) for e in ENCODINGS)))
