"""Class weights from the train split's pixel histogram: the two schemes equal hand-computed
values, the stage's file holds the histogram, and the train side reads it back checked."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from fcn.cityscapes.layout import mask_path
from fcn.errors import DataError
from fcn.class_weights import (count_pixels, enet_weights, median_frequency_weights,
                                     read_class_weights, write_class_weights)


def test_enet_weights_by_hand():
    # pixels 60 / 30 / 10 / 0 of 100: p = 0.6, 0.3, 0.1, 0
    expected = [1 / math.log(1.02 + p) for p in (0.6, 0.3, 0.1, 0.0)]
    assert enet_weights([60, 30, 10, 0]) == pytest.approx(expected, rel=1e-12)
    assert enet_weights([0, 0])[0] == pytest.approx(1 / math.log(1.02))


def test_median_frequency_weights_by_hand():
    # class 0: 60 px over images totalling 200 px -> f 0.3; class 1: 30 / 100 -> 0.3;
    # class 2: 10 / 100 -> 0.1; class 3 never appears -> weight 0. median(0.3, 0.3, 0.1) = 0.3
    weights = median_frequency_weights([60, 30, 10, 0], [200, 100, 100, 0])
    assert weights == pytest.approx([1.0, 1.0, 3.0, 0.0], rel=1e-12)


def _masks(generated, arrays):
    for k, array in enumerate(arrays):
        path = mask_path(generated, "train", f"aachen_{k:06d}_000019", "labelTrainIds")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(array, np.uint8)).save(path)


def test_stage_counts_pixels_per_class_and_per_image(tmp_path):
    a = np.full((4, 5), 255, np.uint8)
    a[0, :] = 0            # 5 px of class 0
    a[1, :3] = 18          # 3 px of class 18
    b = np.zeros((2, 5), np.uint8)  # 10 px of class 0
    _masks(tmp_path, [a, b])
    pixels, image_pixels, images = count_pixels(tmp_path)
    assert images == 2 and pixels[0] == 15 and pixels[18] == 3 and sum(pixels) == 18
    assert image_pixels[0] == 20 + 10 and image_pixels[18] == 20 and image_pixels[5] == 0
    out = tmp_path / "class_weights.json"
    report = write_class_weights(tmp_path, out)
    assert json.loads(out.read_text()) == report
    assert report["enet"][0] == pytest.approx(1 / math.log(1.02 + 15 / 18))
    # f0 = 15/30, f18 = 3/20: median 0.325
    assert report["median_frequency"][0] == pytest.approx(0.325 / 0.5)
    assert report["median_frequency"][18] == pytest.approx(0.325 / 0.15)
    assert read_class_weights(out, "enet") == report["enet"]


def test_bad_masks_and_files_are_one_line_errors(tmp_path):
    _masks(tmp_path, [np.full((2, 2), 19)])
    with pytest.raises(DataError, match="trainId 19"):
        count_pixels(tmp_path)
    with pytest.raises(DataError, match="class weights not found"):
        read_class_weights(tmp_path / "none.json", "enet")
    broken = tmp_path / "w.json"
    broken.write_text(json.dumps({"enet": [1.0] * 5}))
    with pytest.raises(DataError, match="'enet' is not 19"):
        read_class_weights(broken, "enet")


@pytest.mark.parametrize("weights", [
    [0.0] * 19,                 # all zero: every pixel's loss is 0/0
    [1.0] * 18 + [1e7],         # above MAX_WEIGHT: the float32 loss overflows
    [1.0] * 18 + [True],        # a boolean is not a weight
    [1.0] * 18 + [-0.5],
    [1.0] * 18 + [float("nan")],
])
def test_weights_the_loss_cannot_use_are_refused_in_one_line(tmp_path, weights):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"enet": weights}))
    with pytest.raises(DataError) as info:
        read_class_weights(path, "enet")
    assert str(info.value) == (f"{path}: 'enet' is not 19 weights, each a number from 0 to 1e+06, "
                               "not all 0")
    one_zero = [1.0] * 18 + [0.0]  # a zero weight for one class is allowed (the class is ignored)
    path.write_text(json.dumps({"enet": one_zero}))
    assert read_class_weights(path, "enet") == one_zero
