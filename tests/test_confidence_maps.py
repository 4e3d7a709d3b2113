"""Confidence and entropy maps: the export stage and `fcn-predict` write, per image, the max
probability and the entropy as documented PNGs (read back to within half a step of the model's
own probabilities), at the chosen temperature, named so that the official lookup still finds
one prediction per image; off by default."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.eval_data import eval_data
from fcn.analysis.calibration import decode_confidence, decode_entropy
from fcn.cityscapes.layout import city_of, list_images, mask_path, stem_of
from fcn.cityscapes.scoring import match_predictions
from fcn.images import read_rgb
from fcn.params import ExportParams
from fcn.predict import cli
from fcn.predict.export import ExportPaths, export_stage
from fcn.predict.predictor import Predictor

PARAMS = ExportParams(batch_size=1, overlays=2, gif_frames=0, confidence_maps=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return eval_data(tmp_path_factory)


def _expected(data, image_path, temperature: float = 1.0):
    predictor = Predictor.from_params(data.checkpoint, None, PARAMS, temperature)
    _, scores = predictor.predict(np.stack([read_rgb(image_path)]), keep_scores=True)
    p = predictor.probabilities(scores)[0].double()
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(0)
    return p.max(0).values.numpy(), entropy.numpy()


def test_export_writes_16_bit_maps_that_read_back_to_the_probabilities(data, tmp_path):
    paths = ExportPaths(tmp_path / "predictions")
    export_stage(data.checkpoint, data.root, None, PARAMS, paths)
    images = list_images(data.root, "test")
    written = sorted(p.relative_to(paths.confidence).as_posix()
                     for p in paths.confidence.rglob("*.png"))
    assert written == sorted(f"{city_of(stem_of(p))}/{kind}_{stem_of(p)}.png" for p in images
                             for kind in ("confidence", "entropy"))
    for image_path in images:
        stem = stem_of(image_path)
        folder = paths.confidence / city_of(stem)
        confidence_file = Image.open(folder / f"confidence_{stem}.png")
        assert confidence_file.mode.startswith("I;16") and \
            confidence_file.size == Image.open(image_path).size
        confidence, entropy = _expected(data, image_path)
        ours = decode_confidence(np.asarray(confidence_file), 16)
        assert np.abs(ours - confidence).max() <= 0.5 / 65535 + 1e-6
        ours_entropy = decode_entropy(np.asarray(Image.open(folder / f"entropy_{stem}.png")),
                                      19, 16)
        assert np.abs(ours_entropy - entropy).max() <= 0.5 / 65535 * math.log(19) + 1e-5
    overlays = sorted(p.name for p in paths.overlays.iterdir())
    assert len(overlays) == 6 and sum(n.startswith("overlay_confidence_") for n in overlays) == 2
    assert sum(n.startswith("overlay_entropy_") for n in overlays) == 2
    # the zip and the predictions folder hold the label files only, as before
    assert not [p for p in paths.predictions.rglob("*") if "confidence" in p.name]


def test_export_without_confidence_maps_leaves_their_folder_empty(data, tmp_path):
    paths = ExportPaths(tmp_path / "predictions")
    export_stage(data.checkpoint, data.root, None,
                 dataclasses.replace(PARAMS, confidence_maps=False), paths)
    assert paths.confidence.is_dir() and not any(paths.confidence.iterdir())
    assert ExportParams().confidence_maps is False  # off by default


def test_fcn_predict_writes_8_bit_maps_at_a_temperature_and_the_folder_still_scores(
        data, tmp_path):
    out = tmp_path / "out"
    val = data.root / "leftImg8bit" / "val"
    cli.main([str(val), str(out), "--checkpoint", str(data.checkpoint), "--confidence",
              "--confidence-bits", "8", "--temperature", "2.5", "--batch-size", "1"])
    image_path = list_images(data.root, "val")[0]
    target = out / image_path.relative_to(val).parent
    name = image_path.stem
    confidence_png = np.asarray(Image.open(target / f"confidence_{name}.png"))
    assert confidence_png.dtype == np.uint8
    confidence, _ = _expected(data, image_path, temperature=2.5)
    assert np.abs(decode_confidence(confidence_png, 8) - confidence).max() <= 0.5 / 255 + 1e-6
    sharper, _ = _expected(data, image_path, temperature=1.0)
    assert (confidence <= sharper + 1e-6).all() and (confidence < sharper).any()  # T > 1 softens
    assert (target / f"overlay_confidence_{name}.png").exists()
    assert (target / f"overlay_entropy_{name}.png").exists()
    # one `<city>_<seq>_<frame>*.png` match per image still: the maps' names start with a prefix
    labels = [mask_path(data.generated, "val", stem_of(p), "labelIds")
              for p in list_images(data.root, "val")]
    assert [p.name for p in match_predictions(out, labels)] == \
        [f"{p.stem}_labelIds.png" for p in list_images(data.root, "val")]


def test_images_whose_maps_would_collide_are_refused_before_any_work(data, tmp_path, caplog):
    """`x.png` writes overlay_confidence_x.png, and so does `confidence_x.png`'s overlay:
    with confidence maps that is one line and nothing written; without them, no collision."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("x.png", "confidence_x.png"):
        Image.new("RGB", (16, 8)).save(photos / name)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(photos), str(out), "--checkpoint", str(data.checkpoint), "--confidence"])
    assert exit_info.value.code == 1 and not out.exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "overlay_confidence_x.png); rename one" in errors[0], errors
    cli.main([str(photos), str(out), "--checkpoint", str(data.checkpoint)])
    assert sorted(p.name for p in out.iterdir()) == [
        "confidence_x_labelIds.png", "overlay_confidence_x.png", "overlay_x.png",
        "x_labelIds.png"]
