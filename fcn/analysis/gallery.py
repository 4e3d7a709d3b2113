"""The worst-k gallery: the val images a model gets most wrong, shown so the failure is visible.

Each entry is one row of panels: image | ground truth | prediction | error map | confidence
(the last only when the model's probabilities are known, not for scored PNG files). The error
map shows wrong pixels in the colour of their *true* class, so "what should have been there"
reads directly; right pixels are the image darkened, ignore pixels black.
Images stream: only the k worst panels so far are kept (their size is bounded by k and the
panel width), and a panel is drawn only for an image that enters the k.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import numpy as np

from fcn.analysis.calibration import heat_colors
from fcn.cityscapes.labels import IGNORE_INDEX, TRAINID_TO_COLOR
from fcn.predict.visualize import colorize, resize_to_width, side_by_side

DARKEN = 0.3
"""Right pixels in the error map: the image at this brightness."""


def error_map(image: np.ndarray, ground_truth: np.ndarray, prediction: np.ndarray
              ) -> np.ndarray:
    """uint8 (H, W, 3): wrong pixels in their true class's colour, right pixels the image
    darkened (`DARKEN`), ignore pixels (truth 255) black."""
    out = (image.astype(np.float32) * DARKEN + 0.5).astype(np.uint8)
    valid = ground_truth != IGNORE_INDEX
    wrong = valid & (ground_truth != prediction)
    out[~valid] = 0
    out[wrong] = TRAINID_TO_COLOR[ground_truth[wrong]]
    return out


def failure_panel(image: np.ndarray, ground_truth: np.ndarray, prediction: np.ndarray,
                  confidence: np.ndarray | None, width: int) -> np.ndarray:
    """image | truth | prediction | error map [| confidence (the max probability in [0, 1],
    `heat_colors`)], each `width` pixels wide (never upscaled). Everything is drawn at that
    size: the image and confidence downscaled bilinearly, the label maps by nearest neighbour
    (so the error map compares the same sampled pixels), which keeps a 1024x2048 panel cheap."""
    small = resize_to_width(image, width)
    truth = resize_to_width(ground_truth, width, labels=True)
    predicted = resize_to_width(prediction, width, labels=True)
    panels = [small, colorize(truth), colorize(predicted), error_map(small, truth, predicted)]
    if confidence is not None:
        panels.append(heat_colors(resize_to_width(np.asarray(confidence, np.float32), width)))
    return side_by_side(panels)


class WorstImages:
    """The k images with the lowest score (ties: the smaller stem first), with their panels.

    `add(score, stem, draw)` calls `draw()` only when the image enters the k worst; NaN scores
    (no scored pixel) never do.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self._kept: list[tuple[float, str, np.ndarray]] = []  # sorted by (score, stem)

    def add(self, score: float, stem: str, draw: Callable[[], np.ndarray]) -> None:
        if self.k <= 0 or math.isnan(score):
            return
        if len(self._kept) == self.k and (score, stem) >= self._kept[-1][:2]:
            return
        keys = [entry[:2] for entry in self._kept]
        self._kept.insert(bisect.bisect(keys, (score, stem)), (score, stem, draw()))
        del self._kept[self.k:]

    def result(self) -> list[tuple[str, float, np.ndarray]]:
        """(stem, score, panel), worst first."""
        return [(stem, score, panel) for score, stem, panel in self._kept]
