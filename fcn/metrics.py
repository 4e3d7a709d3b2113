"""Segmentation scores from confusion matrices.

Everything is derived from a confusion matrix of pixel counts (rows = ground truth,
columns = prediction), because matrices add up exactly: across batches, epochs and ranks
(`all_reduce` of the sum), where averaging per-batch or per-rank scores would be wrong.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fcn.cityscapes.labels import IGNORE_INDEX, NUM_CLASSES


class ConfusionMatrix:
    """int64 pixel counts (rows = ground truth, columns = prediction) accumulated where the
    tensors live, without reading anything back: `update` has no data-dependent shape and no
    host check, so on CUDA the CPU never waits for it (torchvision's `ConfusionMatrix`, made
    synchronisation-free).

    Pixels whose target is `ignore_index` are left out. A target or prediction outside
    [0, num_classes) is counted in an overflow slot instead of being scored, and `compute()`
    (which reads that slot) refuses a matrix with any. `counts` is the flat vector
    (num_classes² + 1 slots, overflow last): sum it over ranks as it is.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, device: torch.device | str = "cpu",
                 ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.int64,
                                  device=device)

    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        """Add one batch: `target` and `prediction` of the same shape, integer class ids."""
        n = self.num_classes
        target = target.reshape(-1).long()
        prediction = prediction.reshape(-1).long()
        inside = (target >= 0) & (target < n) & (prediction >= 0) & (prediction < n)
        slot = torch.where(inside, n * target + prediction, n * n)  # outside: the overflow
        self.counts.index_add_(0, slot, (target != self.ignore_index).long())

    def compute(self) -> torch.Tensor:
        """int64[C, C] (on the counts' device); ValueError when any pixel overflowed."""
        n = self.num_classes
        overflow = int(self.counts[n * n])
        if overflow:
            raise ValueError(f"{overflow} pixel(s) have a target or prediction outside "
                             f"[0, {n}) other than {self.ignore_index}")
        return self.counts[: n * n].reshape(n, n)


def confusion_matrix(target: torch.Tensor, prediction: torch.Tensor,
                     num_classes: int = NUM_CLASSES,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """int64[C, C] pixel counts of one batch; pixels whose target is `ignore_index` are left
    out, any other value outside [0, C) is a ValueError (`ConfusionMatrix`)."""
    matrix = ConfusionMatrix(num_classes, target.device, ignore_index)
    matrix.update(target, prediction)
    return matrix.compute()


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator elementwise, NaN where the denominator is 0 (not defined)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def nanmean(values: np.ndarray) -> float:
    """Mean over classes that are defined (NaN only if none is)."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def class_scores(matrix: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Per-class IoU, Dice and pixel accuracy (recall); NaN for a class absent from both
    ground truth and prediction (IoU, Dice) or from the ground truth (accuracy)."""
    cm = np.asarray(matrix.cpu() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    return {
        "iou": ratio(tp, tp + fp + fn),
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": ratio(tp, tp + fn),
    }


def summary(matrix: torch.Tensor | np.ndarray) -> dict[str, float]:
    """mIoU, mean Dice, mean pixel accuracy (mean of per-class recall) and global accuracy."""
    per_class = class_scores(matrix)
    cm = np.asarray(matrix.cpu() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.float64)
    total = cm.sum()
    return {
        "miou": nanmean(per_class["iou"]),
        "mean_dice": nanmean(per_class["dice"]),
        "mean_pixel_accuracy": nanmean(per_class["accuracy"]),
        "pixel_accuracy": float(np.trace(cm) / total) if total else math.nan,
    }
