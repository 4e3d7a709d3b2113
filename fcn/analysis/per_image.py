"""Per-image and per-city figures of an evaluation: which images a model gets wrong, and how.

Each val image gets one row (`IMAGE_FIELDS`): its pixel accuracy, its mIoU over the classes
present in it (in its ground truth or its prediction: a class absent from both says nothing
about this image), its Boundary IoU and ECE (`fcn.analysis.boundary`, `.calibration`), and the
class pairs it confuses most. Rows are kept (one small dict per image); the per-city means
are plain means of the rows' figures over a city's images, NaN left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fcn.cityscapes.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES

IMAGE_FIELDS = ("image", "city", "pixel_accuracy", "miou", "boundary_iou", "ece", "confused")
"""The columns of metrics/evaluate_images.csv, in order."""
CITY_FIELDS = ("pixel_accuracy", "miou", "boundary_iou", "ece")
"""The figures averaged per city in metrics/evaluate.json."""
TOP_CONFUSIONS = 3


VOID = "void"
"""The name of the extra prediction column: a label no class is scored on (a scored PNG file
may predict one), always a miss."""


def image_confusion(ground_truth: np.ndarray, prediction: np.ndarray,
                    num_classes: int = NUM_CLASSES) -> np.ndarray:
    """int64 (C, C + 1) pixel counts of one image (rows = truth; the last column: predicted
    255, a label that is not scored), ignore (255) truth left out. Other values must be class
    ids (< C): the caller's scorer has checked them."""
    valid = ground_truth != IGNORE_INDEX
    predicted = np.minimum(prediction[valid], num_classes).astype(np.intp)
    key = ground_truth[valid].astype(np.intp) * (num_classes + 1) + predicted
    return np.bincount(key, minlength=num_classes * (num_classes + 1)).reshape(
        num_classes, num_classes + 1)


def confused_pairs(confusion: np.ndarray, names: Sequence[str] = CLASS_NAMES,
                   top: int = TOP_CONFUSIONS) -> str:
    """The `top` largest off-diagonal counts as 'truth>prediction:pixels', ';'-separated,
    largest first (ties: truth, then prediction, in trainId order)."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    flat = off.ravel()
    order = np.lexsort((np.arange(flat.size), -flat))[:top]
    columns = confusion.shape[1]
    predicted = [*names, VOID]
    return ";".join(f"{names[i // columns]}>{predicted[i % columns]}:{int(flat[i])}"
                    for i in order if flat[i] > 0)


def image_scores(confusion: np.ndarray) -> dict[str, float]:
    """Pixel accuracy and mIoU over the classes present (in truth or prediction) of one
    image's confusion (`image_confusion`); NaN when the image has no scored pixel."""
    total = int(confusion.sum())
    if total == 0:
        return {"pixel_accuracy": math.nan, "miou": math.nan}
    tp = np.diag(confusion).astype(np.float64)
    truth, predicted = confusion.sum(axis=1), confusion[:, :len(tp)].sum(axis=0)
    present = (truth + predicted) > 0
    union = truth + predicted - tp
    return {"pixel_accuracy": float(tp.sum() / total),
            "miou": float(np.mean(tp[present] / union[present]))}


class CityMeans:
    """Means of the per-image figures per city (NaN figures left out of their mean)."""

    def __init__(self, fields: Sequence[str] = CITY_FIELDS) -> None:
        self.fields = tuple(fields)
        self._sums: dict[str, np.ndarray] = {}
        self._counts: dict[str, np.ndarray] = {}

    def add(self, city: str, row: dict[str, object]) -> None:
        values = np.array([float(row[f]) for f in self.fields])  # type: ignore[arg-type]
        known = ~np.isnan(values)
        if city not in self._sums:
            self._sums[city] = np.zeros(len(self.fields))
            self._counts[city] = np.zeros(len(self.fields), dtype=np.int64)
        self._sums[city] += np.where(known, values, 0.0)
        self._counts[city] += known

    def result(self) -> dict[str, dict[str, float]]:
        """{city: {field: mean}}, cities in sorted order; NaN where no image had the figure."""
        out = {}
        for city in sorted(self._sums):
            sums, counts = self._sums[city], self._counts[city]
            out[city] = {f: float(s / c) if c else math.nan
                         for f, s, c in zip(self.fields, sums, counts)}
        return out
