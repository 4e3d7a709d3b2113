"""Per-image rows, per-city means and the worst-k gallery (fcn.analysis.per_image, .gallery)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fcn.analysis.gallery import DARKEN, WorstImages, error_map, failure_panel
from fcn.analysis.per_image import (CityMeans, confused_pairs, image_confusion, image_scores)
from fcn.cityscapes.labels import CLASS_NAMES, TRAINID_TO_COLOR


def test_image_confusion_counts_pixels_leaves_out_ignore_and_keeps_void_predictions():
    truth = np.array([[0, 0, 1, 255], [1, 1, 2, 2]], np.uint8)
    pred = np.array([[0, 1, 1, 0], [1, 255, 2, 0]], np.uint8)
    cm = image_confusion(truth, pred, num_classes=3)
    assert cm.shape == (3, 4)
    expected = np.zeros((3, 4), np.int64)
    expected[0, 0] = 1  # (0, 0)
    expected[0, 1] = 1  # (0, 1)
    expected[1, 1] = 2  # (1, 1) twice
    expected[1, 3] = 1  # truth 1 predicted 255 (a label that is not scored)
    expected[2, 2] = 1
    expected[2, 0] = 1
    assert np.array_equal(cm, expected)  # the ignore pixel (255 truth) is not counted


def test_image_scores_by_hand():
    truth = np.array([[0, 0, 1, 255], [1, 1, 2, 2]], np.uint8)
    pred = np.array([[0, 1, 1, 0], [1, 255, 2, 0]], np.uint8)
    scores = image_scores(image_confusion(truth, pred, 3))
    assert scores["pixel_accuracy"] == 4 / 7
    # class 0: tp 1, truth 2, predicted 2 (one on truth 2) → 1/3; class 1: tp 2, truth 3,
    # predicted 3 → 2/4; class 2: tp 1, truth 2, predicted 1 → 1/2; class 3 absent
    assert scores["miou"] == pytest.approx((1 / 3 + 2 / 4 + 1 / 2) / 3, abs=0, rel=1e-15)
    only_ignore = image_scores(image_confusion(np.full((2, 2), 255, np.uint8),
                                               np.zeros((2, 2), np.uint8), 3))
    assert math.isnan(only_ignore["pixel_accuracy"]) and math.isnan(only_ignore["miou"])


def test_miou_leaves_out_classes_absent_from_truth_and_prediction():
    truth = np.zeros((4, 4), np.uint8)
    assert image_scores(image_confusion(truth, truth, 19))["miou"] == 1.0


def test_confused_pairs_are_the_largest_off_diagonal_counts_with_a_stable_order():
    cm = np.zeros((19, 20), np.int64)
    cm[0, 1] = 5
    cm[2, 3] = 9
    cm[4, 5] = 5  # ties with (0, 1): truth order decides
    cm[6, 19] = 1  # predicted a label that is not scored
    cm[7, 7] = 100  # right pixels are not confusions
    names = CLASS_NAMES
    assert confused_pairs(cm) == (f"{names[2]}>{names[3]}:9;{names[0]}>{names[1]}:5;"
                                  f"{names[4]}>{names[5]}:5")
    assert confused_pairs(cm, top=5).endswith(f";{names[6]}>void:1")
    assert confused_pairs(np.eye(19, 20, dtype=np.int64)) == ""


def test_city_means_leave_nan_out_of_their_mean():
    means = CityMeans(("miou", "ece"))
    means.add("bonn", {"miou": 0.5, "ece": math.nan})
    means.add("aachen", {"miou": 0.25, "ece": 0.1})
    means.add("bonn", {"miou": 1.0, "ece": math.nan})
    result = means.result()
    assert list(result) == ["aachen", "bonn"]
    assert result["aachen"] == {"miou": 0.25, "ece": 0.1}
    assert result["bonn"]["miou"] == 0.75 and math.isnan(result["bonn"]["ece"])


def test_worst_images_keeps_the_k_lowest_and_draws_only_those_that_enter():
    drawn: list[str] = []

    def draw(stem):
        def make():
            drawn.append(stem)
            return np.full((1, 1, 3), len(drawn), np.uint8)
        return make

    worst = WorstImages(2)
    for score, stem in [(0.9, "a"), (0.5, "b"), (0.95, "c"), (0.5, "a2"), (math.nan, "n"),
                        (0.7, "d"), (0.1, "e")]:
        worst.add(score, stem, draw(stem))
    assert [(stem, score) for stem, score, _ in worst.result()] == [("e", 0.1), ("a2", 0.5)]
    # c (0.95) and d (0.7) never entered once two lower ones were kept; n is NaN
    assert drawn == ["a", "b", "a2", "e"]
    assert WorstImages(0).result() == []


def test_worst_images_ties_go_to_the_smaller_stem_whatever_the_order():
    for order in ([("b", 0.5), ("a", 0.5), ("c", 0.5)], [("c", 0.5), ("a", 0.5), ("b", 0.5)]):
        worst = WorstImages(2)
        for stem, score in order:
            worst.add(score, stem, lambda: np.zeros((1, 1, 3), np.uint8))
        assert [stem for stem, _, _ in worst.result()] == ["a", "b"]


def test_error_map_colours_wrong_pixels_by_their_true_class():
    image = np.full((2, 3, 3), 200, np.uint8)
    truth = np.array([[0, 1, 255], [2, 2, 2]], np.uint8)
    pred = np.array([[0, 2, 3], [2, 0, 2]], np.uint8)
    out = error_map(image, truth, pred)
    dark = int(200 * DARKEN + 0.5)
    assert (out[0, 0] == dark).all() and (out[1, 0] == dark).all()  # right: image darkened
    assert (out[0, 1] == TRAINID_TO_COLOR[1]).all()  # wrong: the truth's colour
    assert (out[1, 1] == TRAINID_TO_COLOR[2]).all()
    assert (out[0, 2] == 0).all()  # ignore: black


def test_failure_panel_has_a_confidence_panel_only_when_given():
    image = np.zeros((8, 16, 3), np.uint8)
    labels = np.zeros((8, 16), np.uint8)
    four = failure_panel(image, labels, labels, None, width=8)
    five = failure_panel(image, labels, labels, np.zeros((8, 16), np.float32), width=8)
    assert four.shape == (4, 4 * 8 + 3 * 4, 3) and five.shape == (4, 5 * 8 + 4 * 4, 3)
