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


def confusion_matrix(target: torch.Tensor, prediction: torch.Tensor,
                     num_classes: int = NUM_CLASSES,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """int64[C, C] pixel counts; pixels whose target is `ignore_index` are left out."""
    target = target.reshape(-1).long()
    prediction = prediction.reshape(-1).long()
    keep = target != ignore_index
    target, prediction = target[keep], prediction[keep]
    if target.numel() and (int(target.max()) >= num_classes or int(target.min()) < 0):
        raise ValueError(f"target holds values outside [0, {num_classes}) other than "
                         f"{ignore_index}: {sorted(set(target.unique().tolist()))[:10]}")
    counts = torch.bincount(num_classes * target + prediction, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def _nanmean(values: np.ndarray) -> float:
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
        "iou": _ratio(tp, tp + fp + fn),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp, tp + fn),
    }


def summary(matrix: torch.Tensor | np.ndarray) -> dict[str, float]:
    """mIoU, mean Dice, mean pixel accuracy (mean of per-class recall) and global accuracy."""
    per_class = class_scores(matrix)
    cm = np.asarray(matrix.cpu() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.float64)
    total = cm.sum()
    return {
        "miou": _nanmean(per_class["iou"]),
        "mean_dice": _nanmean(per_class["dice"]),
        "mean_pixel_accuracy": _nanmean(per_class["accuracy"]),
        "pixel_accuracy": float(np.trace(cm) / total) if total else math.nan,
    }
