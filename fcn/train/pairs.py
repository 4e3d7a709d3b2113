"""The training data's unit: an image with its generated trainId mask, paired by stem.

Images come from `data.root`, their labelTrainIds masks from the masks stage's
`data.generated` (paths: fcn.cityscapes.layout). Every pair is checked (mask present, same size,
within `data.max_pixels`) from the files' headers when the dataset is built, before any
training starts; a decoded pair is checked again (sizes, trainId values).

Decoding uses `torchvision.io.decode_png` (`fcn.images.read_tensor`): it returns the CHW uint8
tensor the augmentation wants and measured faster than PIL (`benchmarks/loader_throughput.py`
times the decoders it finds); with the decode stage's cache a PNG is decoded once per run of
that stage, not once per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fcn.cityscapes import layout
from fcn.cityscapes.labels import IGNORE_INDEX, NUM_CLASSES
from fcn.errors import DataError
from fcn.images import MAX_PIXELS, read_labels, read_size, read_tensor
from fcn.png import SIGNATURE

MASK_ENCODING = "labelTrainIds"


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path
    size: tuple[int, int]
    """(height, width), from the headers."""

    @property
    def stem(self) -> str:
        return layout.stem_of(self.image)


def find_pairs(root: str | Path, generated: str | Path, split: str,
               max_pixels: int = MAX_PIXELS, annotation: str = layout.FINE) -> list[Pair]:
    """Every image of `split` with its mask of the annotation set, sorted by path; each pair
    checked for presence and size, so a bad dataset fails here, before training, naming both
    files."""
    pairs = []
    for image in layout.list_images(root, split):
        mask = layout.mask_path(generated, split, layout.stem_of(image), MASK_ENCODING,
                                annotation)
        if not mask.is_file():
            raise DataError(f"{mask}: mask missing for image {image} (run the masks stage)")
        for path, what in ((image, "image"), (mask, "mask")):  # the decoder is PNG-only
            with path.open("rb") as file:
                if not file.read(len(SIGNATURE)).startswith(SIGNATURE):
                    raise DataError(f"{path}: {what} is not a PNG file (training decodes "
                                    "PNG only; convert it, keeping the name)")
        image_size = read_size(image, "image", max_pixels)
        mask_size = read_size(mask, "mask", max_pixels)
        if image_size != mask_size:
            raise DataError(f"image {image} is {image_size[0]}x{image_size[1]} but its mask "
                            f"{mask} is {mask_size[0]}x{mask_size[1]} (width x height)")
        pairs.append(Pair(image, mask, (image_size[1], image_size[0])))
    return pairs


def check_train_ids(mask: torch.Tensor, path: Path) -> None:
    """Every value a class (0..18) or ignore (255), else a DataError naming the file."""
    bad = (mask >= NUM_CLASSES) & (mask != IGNORE_INDEX)
    if bad.any():
        value = int(mask[bad].min())
        raise DataError(f"{path}: trainId {value} is neither a class "
                        f"(0..{NUM_CLASSES - 1}) nor ignore ({IGNORE_INDEX})")


def _decode_mask(pair: Pair, max_pixels: int) -> torch.Tensor:
    """The mask as uint8; values above 255 (a 16-bit file) refused first, before the cast."""
    labels = read_labels(pair.mask, "mask", max_pixels)  # label values as stored (any depth)
    if labels.size and int(labels.max()) > 255:
        check_train_ids(torch.from_numpy(labels.astype(np.int64)), pair.mask)
    return torch.from_numpy(labels.astype(np.uint8))


def load_mask(pair: Pair, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """The trainId mask (uint8[H, W]), decoded and checked (values, and the size its header
    said)."""
    mask = _decode_mask(pair, max_pixels)
    if tuple(mask.shape) != pair.size:
        raise DataError(f"{pair.mask}: mask is {tuple(mask.shape)} (height, width) but its "
                        f"header said {pair.size}")
    check_train_ids(mask, pair.mask)
    return mask


def load_pair(pair: Pair, max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """The image (uint8[3, H, W]) and its trainId mask (uint8[H, W]), decoded and checked."""
    image = read_tensor(pair.image, 3, "image", max_pixels)
    mask = _decode_mask(pair, max_pixels)
    if image.shape[-2:] != mask.shape or tuple(mask.shape) != pair.size:
        raise DataError(f"image {pair.image} is {tuple(image.shape[-2:])} but its mask "
                        f"{pair.mask} is {tuple(mask.shape)} (height, width; headers said "
                        f"{pair.size})")
    check_train_ids(mask, pair.mask)
    return image, mask
