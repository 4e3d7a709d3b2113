"""The evaluate stage's analysis end to end on a small dataset with a fitted probe checkpoint:
its Boundary IoU, ECE and per-image rows equal an independent recomputation from the model's
own outputs; scoring exported files gives the same boundary and per-image figures; the
temperature fit lowers val NLL and keeps every prediction; the gallery holds the worst k."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.eval_data import eval_data
from fcn.analysis.boundary import BoundaryAccumulator
from fcn.analysis.calibration import ECEAccumulator
from fcn.analysis.per_image import IMAGE_FIELDS, confused_pairs, image_confusion, image_scores
from fcn.cityscapes.labels import ID_TO_TRAINID, TRAINID_TO_ID
from fcn.cityscapes.layout import city_of, list_images, mask_path, stem_of, submission_name
from fcn.images import read_labels, read_rgb, write_label_png
from fcn.params import EvaluateParams
from fcn.predict.evaluate import (BOUNDARY_IOU, RELIABILITY, TRIMAP, WORST, ReportPaths,
                                  evaluate_stage)
from fcn.predict.predictor import Predictor

PARAMS = EvaluateParams(batch_size=1, workers=2, samples=0, worst=2, trimap_widths=[1, 3, 9],
                        temperature_pixels=20_000)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return eval_data(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(data):
    """Per val image, computed here from the predictor's outputs: truth, prediction, scores."""
    predictor = Predictor.from_params(data.checkpoint, None, PARAMS)
    out = []
    for image_path in list_images(data.root, "val"):
        stem = stem_of(image_path)
        truth = ID_TO_TRAINID[read_labels(mask_path(data.generated, "val", stem, "labelIds"),
                                          "truth")]
        labels, scores = predictor.predict(np.stack([read_rgb(image_path)]), keep_scores=True)
        out.append((stem, truth, labels[0], scores[0]))
    return out


def _report(folder: Path) -> ReportPaths:
    return ReportPaths(folder / "evaluate.json", folder / "evaluate", folder / "plots")


@pytest.fixture(scope="module")
def model_report(data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model_report")
    evaluate_stage(data.root, data.generated, None, PARAMS, _report(folder), data.checkpoint)
    return folder


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "evaluate_images.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(IMAGE_FIELDS)
    return rows


def test_boundary_ece_and_rows_equal_a_recomputation_from_the_model(model_report, reference):
    metrics = json.loads((model_report / "evaluate.json").read_text())
    boundary = BoundaryAccumulator(19, (1, 3, 9), 0.02)
    ece = ECEAccumulator(19, 15)
    expected_rows = []
    for stem, truth, prediction, scores in reference:
        image_boundary = boundary.add(truth, prediction)
        confidence = torch.softmax(scores, 0).max(0).values.numpy()
        image_ece = ece.add(confidence, prediction, truth)
        confusion = image_confusion(truth, prediction)
        expected_rows.append({"image": stem, "city": city_of(stem), **image_scores(confusion),
                              "boundary_iou": image_boundary["boundary_miou"], "ece": image_ece,
                              "confused": confused_pairs(confusion)})
    result, calibration = boundary.result(), ece.result()
    assert metrics["boundary_iou"] == result["boundary_miou"]
    assert metrics["trimap_iou"] == dict(zip(["1px", "3px", "9px"], result["trimap_miou"]))
    assert metrics["ece"] == calibration["ece"]
    assert 0 < metrics["boundary_iou"] < metrics["class_iou_mean"] < 1  # edges are harder
    rows = _rows(model_report)
    assert len(rows) == len(reference) == metrics["images"]
    for row, expected in zip(rows, expected_rows):
        assert row["image"] == expected["image"] and row["city"] == expected["city"]
        assert row["confused"] == expected["confused"]
        for key in ("pixel_accuracy", "miou", "boundary_iou", "ece"):
            assert float(row[key]) == expected[key], (row["image"], key)
    for city, means in metrics["cities"].items():  # per-city means of the rows
        mine = [r for r in expected_rows if r["city"] == city]
        assert means["miou"] == pytest.approx(np.mean([r["miou"] for r in mine]), rel=1e-12)
    assert sorted(metrics["cities"]) == sorted({r["city"] for r in expected_rows})
    with (model_report / "evaluate_classes.csv").open() as f:
        table = list(csv.DictReader(f))
    for row in table:
        tid = int(row["train_id"])
        for value, theirs in ((row["boundary_iou"], result["boundary_iou"][tid]),
                              (row["ece"], calibration["ece_per_class"][tid])):
            assert (value == "nan" and math.isnan(theirs)) or float(value) == theirs


def test_plots_hold_the_boundary_bars_trimap_curve_reliability_diagram_and_worst_gallery(
        model_report, reference):
    plots = model_report / "plots"
    with (plots / BOUNDARY_IOU).open() as f:
        assert len(list(csv.DictReader(f))) == 19
    with (plots / TRIMAP).open() as f:
        assert [int(r["width"]) for r in csv.DictReader(f)] == [1, 3, 9]
    with (plots / RELIABILITY).open() as f:
        bins = list(csv.DictReader(f))
    # the bins that hold pixels, each with its figures (an empty bin would draw a point at 0)
    assert 0 < len(bins) <= 15 and all(int(b["pixels"]) > 0 and b["accuracy"] for b in bins)
    assert sum(int(b["pixels"]) for b in bins) == sum(
        int((truth != 255).sum()) for _, truth, _, _ in reference)
    rows = sorted(_rows(model_report), key=lambda r: (float(r["miou"]), r["image"]))
    gallery = sorted((plots / WORST).iterdir())
    assert [p.name for p in gallery] == [f"01_{rows[0]['image']}.png",
                                         f"02_{rows[1]['image']}.png"]
    # five 128-pixel panels (images are never upscaled to sample_width) with the confidence
    assert Image.open(gallery[0]).size == (5 * 128 + 4 * 4, 64)


def test_the_temperature_lowers_val_nll_and_keeps_every_prediction(model_report, reference,
                                                                   data):
    fit = json.loads((model_report / "evaluate.json").read_text())["calibration"]
    assert fit["nll_after"] < fit["nll_before"] and fit["temperature"] != 1.0
    assert 0 < fit["pixels"] <= PARAMS.temperature_pixels
    calibrated = Predictor.from_params(data.checkpoint, None, PARAMS, fit["temperature"])
    for stem, _, prediction, scores in reference:
        image = read_rgb(next(p for p in list_images(data.root, "val") if stem_of(p) == stem))
        labels, again = calibrated.predict(np.stack([image]), keep_scores=True)
        assert np.array_equal(labels[0], prediction)
        probabilities = calibrated.probabilities(again)
        assert torch.equal(probabilities.argmax(1)[0].to(torch.uint8),
                           torch.from_numpy(prediction))
        assert not torch.allclose(probabilities, torch.softmax(again, 1))  # it did something


def test_scoring_exported_files_gives_the_same_boundary_and_rows_without_calibration(
        data, model_report, reference, tmp_path):
    for stem, _, prediction, _ in reference:
        write_label_png(tmp_path / "files" / city_of(stem) / submission_name(stem),
                        TRAINID_TO_ID[prediction])
    folder = tmp_path / "report"
    evaluate_stage(data.root, data.generated, None, PARAMS, _report(folder), data.checkpoint,
                   predictions=tmp_path / "files")
    ours = json.loads((model_report / "evaluate.json").read_text())
    theirs = json.loads((folder / "evaluate.json").read_text())
    for key in ("boundary_iou", "trimap_iou", "trimap_accuracy", "class_iou_mean"):
        assert theirs[key] == ours[key], key
    assert "ece" not in theirs and "calibration" not in theirs
    for mine, other in zip(_rows(model_report), _rows(folder)):
        assert other["ece"] == "nan"
        assert {k: v for k, v in other.items() if k != "ece"} == \
            {k: v for k, v in mine.items() if k != "ece"}
    assert not (folder / "plots" / RELIABILITY).exists()
    gallery = sorted((folder / "plots" / WORST).iterdir())
    assert Image.open(gallery[0]).size == (4 * 128 + 3 * 4, 64)  # no confidence panel


def test_with_flip_tta_the_figures_read_the_averaged_probabilities(data, tmp_path):
    """Flip TTA averages the two views' probabilities: the ECE and rows are those of that
    average (its max is the confidence, not a softmax of it), and the temperature is fitted
    on its log, lowering NLL as with logits."""
    params = EvaluateParams(batch_size=1, workers=2, samples=0, worst=0, trimap_widths=[2],
                            temperature_pixels=20_000, flip_tta=True)
    evaluate_stage(data.root, data.generated, None, params, _report(tmp_path), data.checkpoint)
    metrics = json.loads((tmp_path / "evaluate.json").read_text())
    predictor = Predictor.from_params(data.checkpoint, None, params)
    assert predictor.averages_probabilities
    ece = ECEAccumulator(19, 15)
    for image_path in list_images(data.root, "val"):
        stem = stem_of(image_path)
        truth = ID_TO_TRAINID[read_labels(mask_path(data.generated, "val", stem, "labelIds"),
                                          "truth")]
        labels, scores = predictor.predict(np.stack([read_rgb(image_path)]), keep_scores=True)
        assert torch.allclose(scores[0].sum(0), torch.ones(scores.shape[-2:]), atol=1e-5)
        ece.add(scores[0].max(0).values.numpy(), labels[0], truth)
    assert metrics["ece"] == ece.result()["ece"]
    fit = metrics["calibration"]
    assert fit["nll_after"] < fit["nll_before"] and fit["pixels"] > 0
