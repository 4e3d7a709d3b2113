"""The evaluate stage's analysis of each val image, beside the official scores: boundary
quality, calibration, per-image rows and per-city means, the worst-k gallery.

One `EvaluationAnalysis` is fed every image once, as it streams past (truth and prediction as
trainIds, and the model's probabilities when there are any); all it keeps is fixed-size
accumulators, one small row per image, the fixed-size temperature sample and k panels, so
memory does not grow with the number of images beyond the rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fcn.analysis.boundary import BoundaryAccumulator
from fcn.analysis.calibration import (ECEAccumulator, LogitSample, TemperatureFit,
                                      confidence_entropy, fit_temperature)
from fcn.analysis.gallery import WorstImages, failure_panel
from fcn.analysis.per_image import (CityMeans, confused_pairs, image_confusion, image_scores)
from fcn.cityscapes.labels import NUM_CLASSES
from fcn.cityscapes.layout import city_of

TEMPERATURE_SEED = 0
"""Seed of the pixels sampled for the temperature fit (the same pixels every run)."""


@dataclass(frozen=True)
class AnalysisResult:
    """Everything the analysis found: JSON-ready dicts, rows, and the gallery's panels."""

    boundary: dict[str, object]
    calibration: dict[str, object] | None  # None: no probabilities (scored PNG files)
    temperature: TemperatureFit | None
    rows: list[dict[str, object]]
    cities: dict[str, dict[str, float]]
    worst: list[tuple[str, float, np.ndarray]]


class EvaluationAnalysis:
    """Feed `add` every val image once; `result()` at the end.

    `temperature_pixels` 0 skips the temperature fit; `worst` 0 draws no gallery.
    """

    def __init__(self, images: int, boundary_ratio: float, trimap_widths: Sequence[int],
                 ece_bins: int, temperature_pixels: int, worst: int, panel_width: int,
                 num_classes: int = NUM_CLASSES) -> None:
        self.num_classes, self.panel_width = num_classes, panel_width
        self.boundary = BoundaryAccumulator(num_classes, tuple(trimap_widths), boundary_ratio)
        self.ece = ECEAccumulator(num_classes, ece_bins)
        self.sample = (LogitSample(num_classes, temperature_pixels, TEMPERATURE_SEED, images)
                       if temperature_pixels > 0 else None)
        self.worst = WorstImages(worst)
        self.cities = CityMeans()
        self.rows: list[dict[str, object]] = []
        self._probabilities_seen = False

    def add(self, index: int, stem: str, image: np.ndarray | Callable[[], np.ndarray],
            ground_truth: np.ndarray,
            prediction: np.ndarray, scores: torch.Tensor | None = None,
            averaged: bool = False) -> None:
        """One image: uint8 RGB (or a function reading it: only gallery images are read), truth
        and prediction as uint8 trainIds (255 = ignore in the
        truth), and optionally the model's scores (C, H, W) as `Predictor.predict` returns
        them: logits, or mean probabilities of several views when `averaged`."""
        confusion = image_confusion(ground_truth, prediction, self.num_classes)
        scores_of_image = image_scores(confusion)
        boundary = self.boundary.add(ground_truth, prediction)
        ece, confidence = math.nan, None
        if scores is not None:
            self._probabilities_seen = True
            probabilities = scores if averaged else torch.softmax(scores, dim=0)
            _, confidence_map, _ = confidence_entropy(probabilities[None])
            confidence = confidence_map[0].numpy()
            ece = self.ece.add(confidence, prediction, ground_truth)
            if self.sample is not None:
                self.sample.add(scores, ground_truth, index, are_probabilities=averaged)
        row = {"image": stem, "city": city_of(stem), **scores_of_image,
               "boundary_iou": boundary["boundary_miou"], "ece": ece,
               "confused": confused_pairs(confusion)}
        self.rows.append(row)
        self.cities.add(city_of(stem), row)
        self.worst.add(scores_of_image["miou"], stem, lambda: failure_panel(
            image() if callable(image) else image, ground_truth, prediction, confidence,
            self.panel_width))

    def result(self) -> AnalysisResult:
        calibration = self.ece.result() if self._probabilities_seen else None
        fit = (fit_temperature(self.sample)  # none without a sampled (non-ignore) pixel
               if self.sample is not None and len(self.sample) else None)
        return AnalysisResult(self.boundary.result(), calibration, fit, self.rows,
                              self.cities.result(), self.worst.result())
