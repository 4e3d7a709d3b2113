"""Class weights for the loss, computed from the train split's trainId pixel histogram.

- `enet` (Paszke et al., ENet): w_c = 1 / ln(1.02 + p_c), p_c the share of labelled train
  pixels that are class c; bounded (a class with no pixels gets 1 / ln 1.02 ≈ 50.5).
- `median_frequency` (Eigen & Fergus): f_c = pixels of c / pixels of the images in which c
  appears, w_c = median(f) / f_c over the classes that appear; a class that never appears
  gets weight 0 (it contributes no loss anyway).

The stage `class_weights` counts the pixels once (`count_pixels`) and writes the histogram with
both schemes (`write_class_weights`); the train stage reads the scheme it is asked for
(`read_class_weights`), so the masks are never scanned again for a training run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fcn.atomic import write_json
from fcn.cityscapes import layout
from fcn.cityscapes.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from fcn.errors import DataError
from fcn.images import MAX_PIXELS, read_labels

log = logging.getLogger(__name__)

SCHEMES = ("enet", "median_frequency")
ENET_C = 1.02


def enet_weights(pixels: Sequence[float]) -> list[float]:
    """1 / ln(1.02 + p_c) with p_c = pixels_c / all labelled pixels."""
    counts = np.asarray(pixels, dtype=np.float64)
    total = counts.sum()
    p = counts / total if total else np.zeros_like(counts)
    return [float(1 / math.log(ENET_C + v)) for v in p]


def median_frequency_weights(pixels: Sequence[float], image_pixels: Sequence[float]
                             ) -> list[float]:
    """median(f) / f_c with f_c = pixels_c / pixels of the images containing c; 0 where c is
    absent from every image."""
    counts = np.asarray(pixels, dtype=np.float64)
    present = np.asarray(image_pixels, dtype=np.float64)
    freq = np.divide(counts, present, out=np.zeros_like(counts), where=present > 0)
    seen = freq > 0
    if not seen.any():
        return [0.0] * len(counts)
    median = float(np.median(freq[seen]))
    return [float(median / f) if f > 0 else 0.0 for f in freq]


def count_pixels(generated: str | Path, split: str = "train", num_classes: int = NUM_CLASSES,
                 max_pixels: int = MAX_PIXELS) -> tuple[list[int], list[int], int]:
    """Per class: its pixels, and the pixels of the images in which it appears, over every
    labelTrainIds mask of `split` (each refused above `max_pixels`, data.max_pixels); and the
    number of masks."""
    pixels = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)
    folder = Path(generated) / "gtFine" / split
    masks = layout.split_files(folder, layout.mask_suffix("labelTrainIds"), "mask",
                               " masks (run the masks stage)")
    for path in tqdm(masks, desc="class weights", unit="mask"):
        mask = read_labels(path, "labelTrainIds mask", max_pixels)
        bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
        if bad.any():
            raise DataError(f"{path}: trainId {int(mask[bad][0])} is neither a class "
                            f"(0..{num_classes - 1}) nor ignore ({IGNORE_INDEX})")
        counts = np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=num_classes)
        pixels += counts
        image_pixels[counts > 0] += mask.size
    return pixels.tolist(), image_pixels.tolist(), len(masks)


def write_class_weights(generated: str | Path, out: str | Path, split: str = "train",
                        max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    """The class_weights stage: count the split's pixels and write both schemes to `out`."""
    pixels, image_pixels, images = count_pixels(generated, split, max_pixels=max_pixels)
    report = {"split": split, "images": images, "classes": list(CLASS_NAMES),
              "pixels": pixels, "image_pixels": image_pixels,
              "enet": enet_weights(pixels),
              "median_frequency": median_frequency_weights(pixels, image_pixels)}
    write_json(out, report)
    log.info("class pixel histogram of %d %s masks -> %s", images, split, out)
    return report


MAX_WEIGHT = 1e6
"""Far above any weighting scheme's (enet's largest is 1/ln(1.02) ≈ 50), far below float32's
overflow: a larger weight makes the loss infinite."""


def valid_weights(weights: Any) -> bool:
    """NUM_CLASSES real numbers (not booleans) in [0, MAX_WEIGHT], not all zero: what the loss
    can use without becoming NaN or infinite."""
    return (isinstance(weights, list) and len(weights) == NUM_CLASSES
            and all(isinstance(w, (int, float)) and not isinstance(w, bool)
                    and 0 <= w <= MAX_WEIGHT for w in weights)
            and any(w > 0 for w in weights))


def read_class_weights(path: str | Path, scheme: str) -> list[float]:
    """The `scheme` weights from the class_weights stage's file, checked."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown class-weight scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: class weights not found (run the class_weights stage)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read class weights ({exc})") from None
    weights = data.get(scheme) if isinstance(data, dict) else None
    if not valid_weights(weights):
        raise DataError(f"{path}: '{scheme}' is not {NUM_CLASSES} weights, each a number from 0 "
                        f"to {MAX_WEIGHT:g}, not all 0")
    log.info("class weights (%s, from %s): %s", scheme, path,
             ", ".join(f"{n} {w:.3g}" for n, w in zip(CLASS_NAMES, weights)))
    return [float(w) for w in weights]
