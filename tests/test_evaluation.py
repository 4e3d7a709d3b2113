"""fcn.cityscapes.scoring agrees with cityscapesScripts' evaluator to 1e-9 and rejects bad input clearly."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers.eval_data import assert_agrees, eval_data, official_evaluation
from fcn.errors import DataError
from fcn.cityscapes.scoring import (AVG_CLASS_SIZE, INSTANCE_CATEGORIES, CityscapesEvaluator, EvalFiles,
                            evaluate_files, ground_truth_files, match_predictions)
from fcn.cityscapes.labels import ID_TO_LABEL, ID_TO_TRAINID, NUM_IDS
from fcn.cityscapes.layout import stem_of
from fcn.metrics import class_scores, confusion_matrix


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return eval_data(tmp_path_factory)


def _instances(path: Path) -> Path:
    return Path(str(path).replace("_labelIds", "_instanceIds"))


def write_noisy_predictions(label_files: list[Path], out: Path, seed: int = 0) -> list[Path]:
    """Ground truth corrupted more and more per image: random ids (ignored ones included) and a
    block of one wrong class; named `<stem>_pred.png` under `<out>/<city>/`."""
    rng = np.random.default_rng(seed)
    paths = []
    for k, labels in enumerate(label_files):
        gt = np.asarray(Image.open(labels))
        noise = rng.integers(0, NUM_IDS, gt.shape)
        prediction = np.where(rng.random(gt.shape) < 0.05 + 0.1 * k, noise, gt).astype(np.uint8)
        y, x = rng.integers(0, gt.shape[0] // 2), rng.integers(0, gt.shape[1] // 2)
        prediction[y:y + 20, x:x + 30] = rng.choice([7, 11, 24, 26, 0, 29])
        path = out / stem_of(labels).split("_")[0] / f"{stem_of(labels)}_pred.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(prediction).save(path)
        paths.append(path)
    return paths


def test_avg_class_size_is_the_scripts():
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cs

    assert AVG_CLASS_SIZE == cs.args.avgClassSize
    assert INSTANCE_CATEGORIES == ("human", "vehicle")


def test_agrees_with_official_evaluator_on_prediction_files(data, tmp_path, monkeypatch):
    predictions = write_noisy_predictions(data.val_labels, tmp_path / "results")
    files = [EvalFiles(p, g, _instances(g)) for p, g in zip(predictions, data.val_labels)]
    ours = evaluate_files(files, workers=2)
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(tmp_path / "results"))  # the server's lookup
    theirs = official_evaluation(data.val_labels)
    assert_agrees(ours, theirs)
    # the scores are far from trivial: many classes, neither 0 nor 1
    defined = [v for v in ours.class_iou.values() if not math.isnan(v)]
    assert len(defined) >= 15 and 0.2 < ours.class_iou_mean < 0.95
    assert 0.2 < ours.class_iiou_mean < 0.95
    # our file matching finds the same files as the official lookup
    assert match_predictions(tmp_path / "results", data.val_labels) == predictions


def test_pixel_scores_match_a_trainid_confusion_matrix(data, tmp_path):
    """Dice/accuracy/IoU from the label-id matrix equal fcn.metrics on trainIds (predictions of
    ignored labels become an extra 'miss' class)."""
    import torch

    predictions = write_noisy_predictions(data.val_labels, tmp_path, seed=3)
    ours = evaluate_files([EvalFiles(p, g, _instances(g))
                           for p, g in zip(predictions, data.val_labels)])
    target = np.stack([ID_TO_TRAINID[np.asarray(Image.open(g))] for g in data.val_labels])
    predicted = np.stack([ID_TO_TRAINID[np.asarray(Image.open(p))] for p in predictions])
    predicted[predicted == 255] = 19
    cm = confusion_matrix(torch.from_numpy(target), torch.from_numpy(predicted), 20)
    per_class = class_scores(cm.numpy())  # row 19 is empty: ignored ground truth is left out
    evaluated = target != 255
    assert ours.pixel_accuracy == pytest.approx(
        (predicted == target)[evaluated].mean(), abs=1e-12)
    np.testing.assert_allclose(list(ours.dice.values()), per_class["dice"][:19], atol=1e-12)
    np.testing.assert_allclose(list(ours.accuracy.values()), per_class["accuracy"][:19],
                               atol=1e-12)
    np.testing.assert_allclose(list(ours.class_iou.values()), per_class["iou"][:19], atol=1e-12)


ALL_IDS = list(range(NUM_IDS))
INSTANCE_IDS = [i for i in ALL_IDS if ID_TO_LABEL[i].hasInstances]  # incl. caravan, trailer


@st.composite
def image_triples(draw):
    """Small (prediction, labelIds, instanceIds) with every kind of pixel: ignored labels,
    instances of ignored classes, groups (plain id), several instances per class. Drawn per
    cell and blown up to blocks of 1 or 7 pixels: pixel noise and piecewise-constant maps take
    the evaluator's two paths (per pixel / per run)."""
    height, width = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    block = draw(st.sampled_from([1, 7]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    palette = rng.choice(ALL_IDS, size=draw(st.integers(1, 8)), replace=False)
    gt = rng.choice(palette, size=(height, width)).astype(np.uint8)
    instance_no = rng.integers(0, 3, size=gt.shape)
    grouped = rng.random(gt.shape) < 0.2
    has_instances = np.isin(gt, INSTANCE_IDS) & ~grouped
    instances = np.where(has_instances, gt.astype(np.int32) * 1000 + instance_no, gt)
    mix = draw(st.floats(0, 1))
    pred_palette = np.concatenate([palette, rng.choice(ALL_IDS, size=3)])
    noise = rng.choice(pred_palette, size=gt.shape)
    prediction = np.where(rng.random(gt.shape) < mix, noise, gt).astype(np.uint8)

    def blow_up(array: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(array, block, axis=0), block, axis=1)

    return blow_up(prediction), blow_up(gt), blow_up(instances.astype(np.uint16))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(image_triples(), min_size=1, max_size=3))
def test_agrees_with_official_evaluator_on_random_images(triples):
    with tempfile.TemporaryDirectory() as tmp:
        preds, gts, evaluator = [], [], CityscapesEvaluator()
        for k, (prediction, gt, instances) in enumerate(triples):
            stem = f"city_{k:06d}_000019"
            paths = [Path(tmp) / f"{stem}_{kind}.png" for kind in ("pred", "gtFine_labelIds",
                                                                    "gtFine_instanceIds")]
            for path, array in zip(paths, (prediction, gt, instances)):
                Image.fromarray(array).save(path)
            preds.append(paths[0])
            gts.append(paths[1])
            evaluator.add(prediction, gt, instances)
        assert_agrees(evaluator.scores(), official_evaluation(gts, preds))


def test_not_computed_is_nan_not_zero():
    gt = np.full((4, 4), 26, np.uint8)  # all car
    evaluator = CityscapesEvaluator(instance_scores=False)
    evaluator.add(gt.copy(), gt)
    scores = evaluator.scores()
    assert scores.class_iou["car"] == 1.0
    assert math.isnan(scores.class_iou["road"])  # neither in truth nor prediction
    assert all(math.isnan(v) for v in scores.class_iiou.values())  # the script says 0.0
    assert math.isnan(scores.class_iiou_mean) and math.isnan(scores.category_iiou_mean)
    assert scores.class_iou_mean == 1.0


def test_instance_scores_need_instances():
    with pytest.raises(ValueError, match="instanceIds"):
        CityscapesEvaluator().add(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8))


# --- bad input: one clear error naming the file ------------------------------------------------


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def one_image(data):
    labels = data.val_labels[0]
    gt = np.asarray(Image.open(labels))
    return labels, _instances(labels), gt


def test_prediction_ids_outside_the_table(one_image, tmp_path):
    labels, instances, gt = one_image
    bad = gt.copy()
    bad[5, 7] = 34
    pred = _write(tmp_path / "x_pred.png", bad)
    with pytest.raises(DataError) as info:
        evaluate_files([EvalFiles(pred, labels, instances)])
    message = str(info.value)
    assert str(pred) in message and "outside the Cityscapes label table" in message
    assert "[34]" in message and "x=7, y=5" in message


def test_ground_truth_ids_outside_the_table(one_image, tmp_path):
    labels, instances, gt = one_image
    bad = _write(tmp_path / "x_gtFine_labelIds.png", np.where(gt == 7, 40, gt).astype(np.uint8))
    with pytest.raises(DataError) as info:
        evaluate_files([EvalFiles(labels, bad, instances)])
    assert str(bad) in str(info.value) and "ground truth holds ids outside" in str(info.value)


def test_trainids_instead_of_ids_are_caught(one_image, tmp_path):
    labels, instances, gt = one_image
    pred = _write(tmp_path / "x_pred.png", ID_TO_TRAINID[gt])  # 255 where ignored
    with pytest.raises(DataError, match="255"):
        evaluate_files([EvalFiles(pred, labels, instances)])


def test_trainids_a_model_writes_are_caught_too(one_image, tmp_path):
    """A model's argmax never holds 255: a trainId map is then all valid label ids (0..18)
    and used to score about 0.0 without a word, here and in the official evaluator."""
    labels, instances, gt = one_image
    train_ids = ID_TO_TRAINID[gt]
    pred = _write(tmp_path / "x_pred.png", np.where(train_ids == 255, 0, train_ids))
    with pytest.raises(DataError) as info:
        evaluate_files([EvalFiles(pred, labels, instances)])
    message = str(info.value)
    assert message.startswith(f"{pred}: ") and "look like trainIds" in message, message
    assert "TRAINID_TO_ID" in message and "\n" not in message


def test_a_palette_image_is_not_label_ids(one_image, tmp_path):
    labels, instances, gt = one_image
    pred = tmp_path / "x_pred.png"
    Image.fromarray(gt).convert("RGB").quantize(20).save(pred)
    with pytest.raises(DataError, match=r"x_pred\.png: prediction is a palette image"):
        evaluate_files([EvalFiles(pred, labels, instances)])


def test_prediction_with_several_channels(one_image, tmp_path):
    labels, instances, gt = one_image
    pred = _write(tmp_path / "x_pred.png", np.stack([gt] * 3, axis=-1))
    with pytest.raises(DataError, match=r"x_pred\.png: prediction has 3 channels"):
        evaluate_files([EvalFiles(pred, labels, instances)])


def test_size_mismatch(one_image, tmp_path):
    labels, instances, gt = one_image
    pred = _write(tmp_path / "x_pred.png", gt[:, :-1])
    with pytest.raises(DataError) as info:
        evaluate_files([EvalFiles(pred, labels, instances)])
    assert str(pred) in str(info.value) and "127x64" in str(info.value)
    assert str(labels) in str(info.value) and "128x64" in str(info.value)


def test_missing_prediction_file(one_image, tmp_path):
    labels, instances, _ = one_image
    with pytest.raises(DataError, match=r"missing_pred\.png: input file not found"):
        evaluate_files([EvalFiles(tmp_path / "missing_pred.png", labels, instances)])


def test_missing_ground_truth_file(data, tmp_path):
    with pytest.raises(DataError) as info:
        ground_truth_files(tmp_path, "val", [stem_of(data.val_labels[0])])
    assert "frankfurt_000000_000019_gtFine_labelIds.png: ground-truth file not found" in str(
        info.value)


def test_unreadable_prediction(one_image, tmp_path):
    labels, instances, _ = one_image
    pred = tmp_path / "x_pred.png"
    pred.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"x_pred\.png: cannot read prediction"):
        evaluate_files([EvalFiles(pred, labels, instances)])


def test_bad_instance_ids(one_image, tmp_path):
    labels, _, gt = one_image
    for bad_value, words in ((40000, "above 33"), (7001, "'road', a class without instances")):
        inst = gt.astype(np.uint16)
        inst[0, 0] = bad_value
        path = _write(tmp_path / f"{bad_value}_instanceIds.png", inst)
        with pytest.raises(DataError) as info:
            evaluate_files([EvalFiles(labels, labels, path)])
        assert str(path) in str(info.value) and words in str(info.value)


def test_prediction_lookup_is_the_official_one(data, tmp_path):
    labels = data.val_labels[:2]
    with pytest.raises(DataError, match="no prediction file frankfurt_000000_000019"):
        match_predictions(tmp_path, labels)
    gt = np.asarray(Image.open(labels[0]))
    _write(tmp_path / "a" / "frankfurt_000000_000019_leftImg8bit.png", gt)
    _write(tmp_path / "b" / "frankfurt_000000_000019_pred.png", gt)
    _write(tmp_path / "frankfurt_000001_000019.png", gt)
    with pytest.raises(DataError, match="several predictions match frankfurt_000000_000019"):
        match_predictions(tmp_path, labels)
    (tmp_path / "b" / "frankfurt_000000_000019_pred.png").unlink()
    assert [p.name for p in match_predictions(tmp_path, labels)] == [
        "frankfurt_000000_000019_leftImg8bit.png", "frankfurt_000001_000019.png"]


def test_run_length_and_per_pixel_paths_agree(data, monkeypatch):
    """Real-looking label maps take the run-length path; forcing the per-pixel path (what
    noisy maps take) gives the same sums exactly."""
    import fcn.cityscapes.scoring as evaluation

    gts = [np.asarray(Image.open(g)) for g in data.val_labels]
    instances = [np.asarray(Image.open(_instances(g))) for g in data.val_labels]
    predictions = [np.roll(g, 3, axis=1) for g in gts]  # boundary errors, still piecewise
    assert evaluation._runs([predictions[0], gts[0], instances[0]])[-1] is not None

    def add_all() -> CityscapesEvaluator:
        evaluator = CityscapesEvaluator()
        for args in zip(predictions, gts, instances):
            evaluator.add(*args)
        return evaluator

    runs = add_all()
    monkeypatch.setattr(evaluation, "_runs", lambda arrays: [*(np.ravel(a) for a in arrays),
                                                             None])
    pixels = add_all()
    assert np.array_equal(runs.confusion, pixels.confusion)
    for a, b in ((runs.class_tp, pixels.class_tp), (runs.class_fn, pixels.class_fn),
                 (runs.category_tp, pixels.category_tp), (runs.category_fn, pixels.category_fn)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert 0 < runs.scores().class_iiou_mean < 1
