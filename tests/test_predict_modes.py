"""Inference beyond one whole image: sliding windows, the out-of-memory fallback, multi-scale
and flip test-time augmentation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcn.predict.predictor import Predictor, slide_logits, window_boxes


class Local(nn.Module):
    """A tiny fully convolutional model with a 5-pixel receptive field (two 3×3 layers), so
    its output away from a window's border does not depend on what lies outside the window."""

    def __init__(self, classes: int = 19) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, 40, 72, 3), dtype=np.uint8)


def _x(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def test_window_boxes_cover_the_image_and_stay_inside():
    boxes = window_boxes(40, 72, (16, 32), (12, 20))
    assert all(0 <= y1 < y2 <= 40 and 0 <= x1 < x2 <= 72 for y1, y2, x1, x2 in boxes)
    assert all(y2 - y1 == 16 and x2 - x1 == 32 for y1, y2, x1, x2 in boxes)  # shifted, not cut
    covered = np.zeros((40, 72), int)
    for y1, y2, x1, x2 in boxes:
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1
    # mmseg's grid: rows = ceil((40 - 16) / 12) + 1 = 3, cols = ceil((72 - 32) / 20) + 1 = 3
    assert len(boxes) == 9 and boxes[-1] == (24, 40, 40, 72)


def test_a_window_over_the_whole_image_equals_whole_image_inference(images):
    model = Local().eval()
    x = _x(images)
    with torch.no_grad():
        assert torch.equal(slide_logits(model, x, (40, 72), (20, 36)), model(x))
        assert torch.equal(slide_logits(model, x, (64, 128), (8, 8)), model(x))  # larger


def test_overlapping_windows_average_as_a_direct_reference_computes(images):
    model = Local().eval()
    x = _x(images)
    window, stride = (16, 32), (12, 20)
    with torch.no_grad():
        got = slide_logits(model, x, window, stride)
        total = torch.zeros_like(got)
        count = torch.zeros(40, 72)
        for y1, y2, x1, x2 in window_boxes(40, 72, window, stride):
            full = torch.zeros_like(got)
            full[..., y1:y2, x1:x2] = model(x[..., y1:y2, x1:x2])
            total += full
            count[y1:y2, x1:x2] += 1
    assert torch.allclose(got, total / count, atol=1e-6)
    assert int(count.max()) == 4 and int(count.min()) == 1  # corners of four windows, edges one


def test_small_receptive_field_gives_whole_image_argmax_away_from_window_borders(images):
    model = Local().eval()
    x = _x(images)
    window, stride = (16, 32), (12, 20)
    with torch.no_grad():
        whole, slid = model(x), slide_logits(model, x, window, stride)
    near = torch.zeros(40, 72, dtype=torch.bool)  # within 2 px of a window edge inside the image
    for y1, y2, x1, x2 in window_boxes(40, 72, window, stride):
        for y in (y1, y2):
            if 0 < y < 40:
                near[max(0, y - 2):y + 2, x1:x2] = True
        for xx in (x1, x2):
            if 0 < xx < 72:
                near[y1:y2, max(0, xx - 2):xx + 2] = True
    far = ~near
    assert far.float().mean() > 0.4  # most of the image is far from every window border
    assert torch.allclose(slid[..., far], whole[..., far], atol=1e-5)
    assert torch.equal(slid.argmax(1)[:, far], whole.argmax(1)[:, far])


def test_predictor_slide_mode_matches_slide_logits(images):
    model = Local().eval()
    predictor = Predictor(model, mode="slide", window=(16, 32), stride=(12, 20))
    with torch.no_grad():
        expected = slide_logits(model, _x(images), (16, 32), (12, 20)).argmax(1).numpy()
    assert np.array_equal(predictor(images), expected)


def test_multi_scale_flip_averages_probabilities_at_full_resolution(images):
    model = Local().eval()
    predictor = Predictor(model, flip_tta=True, scales=(0.5, 1.0, 1.5))
    x = _x(images)
    with torch.no_grad():
        expected = torch.zeros(2, 19, 40, 72)
        for scale in (0.5, 1.0, 1.5):
            size = (round(40 * scale), round(72 * scale))
            xs = x if scale == 1.0 else F.interpolate(x, size=size, mode="bilinear",
                                                      align_corners=False)
            for flip in (False, True):
                logits = model(xs.flip(-1)).flip(-1) if flip else model(xs)
                if scale != 1.0:
                    logits = F.interpolate(logits, size=(40, 72), mode="bilinear",
                                           align_corners=False)
                expected += logits.softmax(1) / 6
        got = predictor.scores(torch.from_numpy(images))
    assert got.shape == (2, 19, 40, 72)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(2, 40, 72), atol=1e-5)  # probabilities


def test_single_scale_without_flip_returns_the_logits(images):
    model = Local().eval()
    with torch.no_grad():
        assert torch.equal(Predictor(model).scores(torch.from_numpy(images)), model(_x(images)))


class OutOfMemoryAbove(nn.Module):
    """Raises CUDA's out-of-memory error for inputs above `pixels` (batch × height × width)."""

    def __init__(self, inner: nn.Module, pixels: int) -> None:
        super().__init__()
        self.inner, self.pixels, self.calls = inner, pixels, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        if x.shape[0] * x.shape[2] * x.shape[3] > self.pixels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def test_out_of_memory_on_a_batch_retries_image_by_image(images, caplog):
    inner = Local().eval()
    model = OutOfMemoryAbove(inner, 40 * 72)  # one image fits, two do not
    predictor = Predictor(model, window=(16, 32), stride=(12, 20))
    with caplog.at_level(logging.WARNING, "fcn"):
        got = predictor(images)
        again = predictor(images)  # the fallback stays: no second failed attempt
    with torch.no_grad():
        expected = inner(_x(images)).argmax(1).numpy()
    assert np.array_equal(got, expected) and np.array_equal(again, expected)
    assert [c[0] for c in model.calls] == [2, 1, 1, 1, 1]
    assert len([r for r in caplog.records if "out of memory" in r.message]) == 1


def test_out_of_memory_on_one_image_falls_back_to_slide_mode(images, caplog):
    inner = Local().eval()
    model = OutOfMemoryAbove(inner, 16 * 32)  # only a window fits
    predictor = Predictor(model, window=(16, 32), stride=(12, 20))
    with caplog.at_level(logging.WARNING, "fcn"):
        got = predictor(images)
        first = len(model.calls)
        again = predictor(images)  # slide mode stays: no whole image or batch tried again
    with torch.no_grad():
        expected = slide_logits(inner, _x(images), (16, 32), (12, 20)).argmax(1).numpy()
    assert np.array_equal(got, expected) and np.array_equal(again, expected)
    whole = [c for c in model.calls if c[2:] == (40, 72)]
    assert whole == [(2, 3, 40, 72), (1, 3, 40, 72)]  # the batch, then one image: once each
    assert all(c[2:] == (16, 32) for c in model.calls[first:])
    messages = [r.message for r in caplog.records if "out of memory" in r.message]
    assert len(messages) == 2 and "slide" in messages[1]


def test_out_of_memory_in_slide_mode_is_not_swallowed(images):
    model = OutOfMemoryAbove(Local().eval(), 8)
    with pytest.raises(torch.OutOfMemoryError):
        Predictor(model, window=(16, 32), stride=(12, 20))(images)
