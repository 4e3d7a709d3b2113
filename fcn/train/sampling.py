"""Rare-class sampling of training crops: class-uniform crops and `cat_max_ratio`.

Cityscapes' rare classes (train, bus, motorcycle, rider, wall) fill a tiny share of the pixels,
so random crops seldom show them. Two remedies from the strongest Cityscapes recipes, both off
by default, both drawn from the sample's own seeded generator (`fcn.train.data.sample_seed`), so
a sample depends only on (seed, epoch, index), whatever the workers, ranks or restarts:

- **Class-uniform crops** (NVIDIA's semantic-segmentation, "class uniform sampling"): with
  probability p a class is drawn uniformly among the classes present in the training split,
  then an image containing it, then one of its precomputed pixel positions; the crop window is
  centred on that pixel (shifted inside the image where the image is larger than the crop).
  The positions are computed once when the run starts (`class_positions`: up to
  `POINTS_PER_CLASS` pixels per image and class on a `STRIDE`-pixel grid), never scanned per
  sample.
- **`cat_max_ratio`** (mmsegmentation's `RandomCrop`): a random crop window in which one class
  covers at least the ratio of the labelled (non-ignore) pixels, or that holds a single class,
  is drawn again, up to `tries` windows in all; the first window that passes is used, or the
  last one drawn when none does (as mmsegmentation does). A class-uniform crop is not redrawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from fcn.cityscapes.labels import IGNORE_INDEX, NUM_CLASSES
from fcn.train.augment import Draw, window

POINTS_PER_CLASS = 16
"""Pixel positions kept per image and class (spread over the class's pixels, seeded)."""
STRIDE = 4
"""The grid the positions are taken from: every STRIDE-th row and column."""


@dataclass(frozen=True)
class ClassPositions:
    """For each class present in the split: the images holding it and, per (image, class),
    up to POINTS_PER_CLASS (row, column) positions in source pixels."""

    classes: tuple[int, ...]
    images: dict[int, np.ndarray]  # class -> int32 image indices, ascending
    points: dict[tuple[int, int], np.ndarray]  # (image, class) -> int32 (K, 2)


def image_positions(mask: np.ndarray, image: int, num_classes: int = NUM_CLASSES,
                    seed: int = 0) -> dict[int, np.ndarray]:
    """One mask's positions per class: its pixels on the STRIDE grid grouped by class, up to
    POINTS_PER_CLASS of each chosen by `np.random.default_rng([seed, image])` (all of them
    when fewer), in raster order. Ignore and out-of-range values are left out."""
    grid = np.asarray(mask)[::STRIDE, ::STRIDE]
    flat = grid.reshape(-1).astype(np.intp)
    keep = flat < num_classes
    order = np.flatnonzero(keep)
    order = order[np.argsort(flat[order], kind="stable")]
    counts = np.bincount(flat[order], minlength=num_classes)
    rng = np.random.default_rng([seed, image])
    out: dict[int, np.ndarray] = {}
    start = 0
    width = grid.shape[1]
    for cls in range(num_classes):
        n = int(counts[cls])
        if n:
            chosen = order[start:start + n]
            if n > POINTS_PER_CLASS:
                chosen = np.sort(rng.choice(chosen, size=POINTS_PER_CLASS, replace=False))
            out[cls] = np.stack([chosen // width * STRIDE, chosen % width * STRIDE],
                                axis=1).astype(np.int32)
        start += n
    return out


def class_positions(masks: Iterable[np.ndarray], num_classes: int = NUM_CLASSES,
                    seed: int = 0) -> ClassPositions:
    """Every training mask's positions (`image_positions`), indexed by class."""
    images: dict[int, list[int]] = {}
    points: dict[tuple[int, int], np.ndarray] = {}
    for index, mask in enumerate(masks):
        for cls, found in image_positions(mask, index, num_classes, seed).items():
            images.setdefault(cls, []).append(index)
            points[(index, cls)] = found
    return ClassPositions(tuple(sorted(images)),
                          {c: np.asarray(v, np.int32) for c, v in images.items()}, points)


def _pick(n: int) -> int:
    return int(torch.randint(0, n, size=()))


def class_uniform_choice(positions: ClassPositions, probability: float
                         ) -> tuple[int, int, int] | None:
    """With `probability` (from torch's global generator, which the caller seeds): (image,
    row, column) of a uniformly drawn class's pixel, else None (a plain random crop)."""
    if probability <= 0 or not positions.classes:
        return None
    if float(torch.rand(())) >= probability:
        return None
    cls = positions.classes[_pick(len(positions.classes))]
    holders = positions.images[cls]
    image = int(holders[_pick(len(holders))])
    points = positions.points[(image, cls)]
    row, column = points[_pick(len(points))]
    return image, int(row), int(column)


def centred(d: Draw, source: tuple[int, int], crop: tuple[int, int], row: int, column: int
            ) -> Draw:
    """`d` with its window centred on source pixel (row, column) after rescaling, kept
    inside the rescaled image where that is larger than the crop (else as `window` pads)."""
    corner = []
    for axis, at in ((0, row), (1, column)):
        length, size = d.size[axis], crop[axis]
        start = round((at + 0.5) * length / source[axis] - size / 2)
        if length >= size:
            start = min(max(start, 0), length - size)
        else:
            start = -((size - length) // 2)
        corner.append(start)
    return replace(d, top=corner[0], left=corner[1])


def dominated(mask_crop: torch.Tensor, ratio: float) -> bool:
    """mmsegmentation's test: the crop's labelled pixels hold one class only, or one class
    covers at least `ratio` of them (a crop with no labelled pixel is dominated too)."""
    counts = np.bincount(mask_crop.numpy().reshape(-1), minlength=256)  # uint8: one pass
    counts[IGNORE_INDEX] = 0
    counts = counts[counts > 0]
    return len(counts) <= 1 or float(counts.max()) / float(counts.sum()) >= ratio


def limit_dominance(d: Draw, crop: tuple[int, int], mask_of: Callable[[Draw], torch.Tensor],
                    ratio: float, tries: int) -> tuple[Draw, torch.Tensor]:
    """The first of up to `tries` windows (d's, then windows drawn again from torch's global
    generator at the same scale) whose mask crop `mask_of(draw)` is not `dominated`, else the
    last one drawn; with that window's mask crop (the sample's: it is not cropped twice)."""
    for attempt in range(tries):
        if attempt:
            d = replace(d, top=window(d.size[0], crop[0]), left=window(d.size[1], crop[1]))
        mask = mask_of(d)
        if not dominated(mask, ratio):
            break
    return d, mask


def crop_frequency(masks: Sequence[torch.Tensor], num_classes: int = NUM_CLASSES
                   ) -> np.ndarray:
    """The share of crops in which each class appears (at least one pixel)."""
    seen = np.zeros(num_classes)
    for mask in masks:
        present = torch.unique(mask)
        present = present[present < num_classes].long().numpy()
        seen[present] += 1
    return seen / max(1, len(masks))
