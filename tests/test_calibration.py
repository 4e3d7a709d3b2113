"""Calibration: ECE equals a brute-force per-pixel reference (bin edges included), confidence
and entropy equal torch's, temperature scaling recovers a known temperature, and the PNG
encodings invert within half a step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fcn.analysis import calibration
from fcn.analysis.calibration import (ECEAccumulator, LogitSample, TemperatureFit,
                                      confidence_entropy, confidence_png,
                                      decode_confidence, decode_entropy, entropy_png,
                                      fit_temperature, heat_colors, write_confidence_png,
                                      write_entropy_png)
from fcn.images import read_labels
from fcn.predict.predictor import apply_temperature

C, BINS = 5, 15


# --- ECE -----------------------------------------------------------------------------------

def brute_ece(conf, pred, truth, bins=BINS, only_class=None):
    """Guo et al.'s ECE by plain loops over the pixels (None when no pixel counts)."""
    count, total_conf, right = [0] * bins, [0.0] * bins, [0] * bins
    for c, p, g in zip(conf.ravel().tolist(), pred.ravel().tolist(), truth.ravel().tolist()):
        if g == 255 or (only_class is not None and p != only_class):
            continue
        b = min(math.floor(c * bins), bins - 1)
        count[b] += 1
        total_conf[b] += c
        right[b] += p == g
    n = sum(count)
    if n == 0:
        return None
    return sum(abs(right[b] / count[b] - total_conf[b] / count[b]) * count[b] / n
               for b in range(bins) if count[b])


def random_image(rng, dtype, shape=(40, 50)):
    conf = rng.random(shape).astype(dtype)
    edges = np.array([0.0, 1.0] + [k / BINS for k in range(1, BINS)], dtype)
    edges = np.concatenate([edges, np.nextafter(edges[2:], dtype(0))])  # and just below
    spots = rng.choice(conf.size, size=3 * edges.size, replace=False)
    conf.flat[spots] = np.tile(edges, 3)  # exactly 0, 1 and every bin edge k/15 in `dtype`
    pred = rng.integers(0, C, shape).astype(np.uint8)
    truth = np.where(rng.random(shape) < 0.6, pred, rng.integers(0, C, shape)).astype(np.uint8)
    truth[rng.random(shape) < 0.15] = 255
    return conf, pred, truth


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ece_equals_brute_force_with_bin_edges_and_ignore(dtype):
    rng = np.random.default_rng(1)
    conf, pred, truth = random_image(rng, dtype)
    accumulator = ECEAccumulator(C, BINS)
    assert accumulator.add(conf, pred, truth) == pytest.approx(brute_ece(conf, pred, truth),
                                                               rel=1e-12)
    result = accumulator.result()
    assert result["ece"] == pytest.approx(brute_ece(conf, pred, truth), rel=1e-12)
    assert result["pixels"] == int((truth != 255).sum())
    for c in range(C):
        assert result["ece_per_class"][c] == pytest.approx(
            brute_ece(conf, pred, truth, only_class=c), rel=1e-12)
    # the bins the reference puts each counted pixel in, as counts per bin
    expected = [0] * BINS
    for c in conf[truth != 255].tolist():
        expected[min(math.floor(c * BINS), BINS - 1)] += 1
    assert [row["count"] for row in result["reliability"]] == expected


def test_ece_accepts_tensors_and_reports_never_predicted_classes_as_nan():
    rng = np.random.default_rng(2)
    conf, pred, truth = random_image(rng, np.float32)
    pred[pred == 3] = 2
    accumulator = ECEAccumulator(C, BINS)
    ece = accumulator.add(torch.from_numpy(conf), torch.from_numpy(pred), torch.from_numpy(truth))
    assert ece == pytest.approx(brute_ece(conf, pred, truth), rel=1e-12)
    assert math.isnan(accumulator.result()["ece_per_class"][3])


def test_streaming_two_images_equals_one_concatenated():
    rng = np.random.default_rng(3)
    first, second = random_image(rng, np.float32), random_image(rng, np.float32, (30, 50))
    streamed, whole = ECEAccumulator(C, BINS), ECEAccumulator(C, BINS)
    streamed.add(*first)
    streamed.add(*second)
    whole.add(*(np.concatenate([a, b]) for a, b in zip(first, second)))
    assert np.array_equal(streamed.counts, whole.counts)
    assert np.array_equal(streamed.correct, whole.correct)
    np.testing.assert_allclose(streamed.confidence_sums, whole.confidence_sums, rtol=1e-12)
    a, b = streamed.result(), whole.result()
    assert a["ece"] == pytest.approx(b["ece"], rel=1e-12)
    assert a["ece_per_class"] == pytest.approx(b["ece_per_class"], rel=1e-12, nan_ok=True)


def synthetic(groups):
    """(confidence, correct pixels, pixels) groups as one row of pixels of class 0."""
    conf, pred, truth = [], [], []
    for confidence, right, n in groups:
        conf += [confidence] * n
        pred += [0] * n
        truth += [0] * right + [1] * (n - right)
    return np.array(conf, np.float64), np.array(pred, np.uint8), np.array(truth, np.uint8)


def test_perfectly_calibrated_and_overconfident_by_hand():
    calibrated = ECEAccumulator(2, BINS)
    assert calibrated.add(*synthetic([(0.5, 5, 10), (0.7, 7, 10), (0.9, 9, 10)])) == \
        pytest.approx(0, abs=1e-12)
    over = ECEAccumulator(2, BINS)
    # 20 px at 0.95 with 15 right (gap 0.2) and 10 px at 0.55 with 5 right (gap 0.05):
    # (20 * 0.2 + 10 * 0.05) / 30 = 0.15
    assert over.add(*synthetic([(0.95, 15, 20), (0.55, 5, 10)])) == pytest.approx(0.15,
                                                                                   rel=1e-12)
    result = over.result()
    assert result["ece_per_class"][0] == pytest.approx(0.15, rel=1e-12)
    assert math.isnan(result["ece_per_class"][1])
    rows = result["reliability"]
    assert rows[14] == pytest.approx({"lower": 14 / 15, "upper": 1.0, "count": 20,
                                      "confidence": 0.95, "accuracy": 0.75})
    assert rows[8]["count"] == 10 and rows[8]["accuracy"] == 0.5
    assert rows[0]["count"] == 0 and math.isnan(rows[0]["accuracy"])
    assert math.isnan(rows[0]["confidence"])


def test_ece_of_ignored_image_is_nan_and_bad_inputs_are_refused():
    accumulator = ECEAccumulator(C, BINS)
    assert math.isnan(accumulator.add(np.full((3, 3), 0.5), np.zeros((3, 3), np.uint8),
                                      np.full((3, 3), 255, np.uint8)))
    assert math.isnan(accumulator.result()["ece"]) and accumulator.result()["pixels"] == 0
    ones = np.ones((2, 2), np.uint8)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        accumulator.add(np.full((2, 2), 1.5), ones, ones)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        accumulator.add(np.full((2, 2), np.nan), ones, ones)
    with pytest.raises(ValueError, match="predictions outside"):
        accumulator.add(np.full((2, 2), 0.5), ones * C, ones)
    with pytest.raises(ValueError, match="differ in shape"):
        accumulator.add(np.full((2, 3), 0.5), ones, ones)
    assert accumulator.result()["pixels"] == 0


# --- confidence and entropy ----------------------------------------------------------------

def reference(probabilities):
    p = probabilities.double()
    values, indices = p.max(dim=1)
    return indices, values.float(), -torch.special.xlogy(p, p).sum(dim=1)


def test_confidence_entropy_equals_torch_over_uneven_row_blocks(monkeypatch):
    monkeypatch.setattr(calibration, "_CHUNK_ELEMENTS", 2 * 30)  # blocks of 2 rows, 7 rows
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(3 * torch.randn(2, C, 7, 30, generator=generator), dim=1)
    probabilities[0, :, 0, 0] = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])  # a tie and zeros
    probabilities[1, :, 3, 4] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    for dtype in (torch.float32, torch.float64):
        for compute in (confidence_entropy, calibration._confidence_entropy_torch):
            prediction, confidence, entropy = compute(probabilities.to(dtype))
            want_prediction, want_confidence, want_entropy = reference(probabilities.to(dtype))
            assert prediction.dtype == torch.uint8 and confidence.dtype == torch.float32
            assert entropy.dtype == torch.float32 and entropy.shape == (2, 7, 30)
            assert torch.equal(prediction.long(), want_prediction)
            assert torch.equal(confidence, want_confidence)
            torch.testing.assert_close(entropy.double(), want_entropy, rtol=1e-6, atol=1e-6)
            assert prediction[0, 0, 0] == 1 and entropy[1, 3, 4] == 0
    prediction, confidence, _ = confidence_entropy(probabilities.half())
    assert torch.equal(prediction.long(), probabilities.half().float().argmax(dim=1))


def test_entropy_is_zero_for_one_hot_and_ln_c_for_uniform():
    one_hot = torch.nn.functional.one_hot(torch.arange(19).repeat(3), 19).float()
    one_hot = one_hot.t().reshape(1, 19, 3, 19)
    prediction, confidence, entropy = confidence_entropy(one_hot)
    assert torch.equal(prediction[0].long(), torch.arange(19).repeat(3, 1))
    assert torch.all(confidence == 1) and torch.all(entropy == 0)
    uniform = torch.full((1, 19, 4, 5), 1 / 19)
    prediction, confidence, entropy = confidence_entropy(uniform)
    assert torch.all(prediction == 0)  # a tie: the first class, as torch.argmax
    torch.testing.assert_close(entropy, torch.full((1, 4, 5), math.log(19)), rtol=1e-6,
                               atol=0)


def test_confidence_entropy_refuses_wrong_shapes():
    with pytest.raises(ValueError, match="\\(N, C, H, W\\)"):
        confidence_entropy(torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match="uint8"):
        confidence_entropy(torch.ones(1, 257, 1, 1))


# --- temperature scaling -------------------------------------------------------------------

def overconfident_image(seed, shape=(100, 150), scale=4.0):
    """Logits `scale` times those of a calibrated model: the ground truth of each pixel is
    drawn from softmax(z) itself; 10% of the pixels are ignored."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (C, *shape))
    p = np.exp(z - z.max(axis=0))
    p /= p.sum(axis=0)
    u = rng.random(shape)
    truth = np.minimum((np.cumsum(p, axis=0) < u).sum(axis=0), C - 1).astype(np.uint8)
    truth[rng.random(shape) < 0.1] = 255
    return torch.from_numpy(scale * z).float(), truth


def test_temperature_fit_recovers_the_overconfidence():
    sample = LogitSample(C, 40000, seed=0, expected_images=2)
    for index in range(2):
        sample.add(*overconfident_image(index), index)
    fit = fit_temperature(sample)
    assert isinstance(fit, TemperatureFit)
    assert fit.temperature == pytest.approx(4.0, rel=0.05)
    assert fit.nll_after < fit.nll_before and fit.ece_after < fit.ece_before
    assert fit.ece_after < 0.02 and fit.pixels == len(sample) <= 40000
    assert fit_temperature(sample) == fit  # bit for bit


def test_empty_sample_is_refused():
    sample = LogitSample(C, 100, seed=0, expected_images=1)
    sample.add(torch.zeros(C, 4, 4), np.full((4, 4), 255, np.uint8), 0)
    with pytest.raises(ValueError, match="empty"):
        fit_temperature(sample)


def positions_image(seed, shape=(20, 30)):
    """Logits whose class-0 channel is the pixel's flat position, so a sample shows which
    pixels it took; a third of the truth is ignored."""
    rng = np.random.default_rng(seed)
    logits = torch.zeros(C, *shape)
    logits[0] = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape)
    truth = rng.integers(0, C, shape).astype(np.uint8)
    truth[rng.random(shape) < 1 / 3] = 255
    return logits, truth


def test_sample_is_deterministic_bounded_and_never_takes_ignored_pixels():
    images = [positions_image(k) for k in range(5)]
    samples = []
    for seed in (7, 7, 8):
        sample = LogitSample(C, 100, seed, expected_images=2)  # quota 50; 5 images
        taken = [sample.add(logits, truth, k) for k, (logits, truth) in enumerate(images)]
        assert taken == [50, 50, 0, 0, 0] and len(sample) == 100
        samples.append(sample)
    assert torch.equal(samples[0].logits, samples[1].logits)
    assert torch.equal(samples[0].labels, samples[1].labels)
    assert not torch.equal(samples[0].logits, samples[2].logits)
    for k in range(2):
        positions = samples[0].logits[50 * k: 50 * (k + 1), 0].long().numpy()
        truth = images[k][1].reshape(-1)
        assert np.all(truth[positions] != 255)
        assert np.array_equal(samples[0].labels[50 * k: 50 * (k + 1)].numpy(),
                              truth[positions])
        assert np.all(np.diff(positions) > 0)  # distinct, in raster order
    few = LogitSample(C, 10_000, 0, expected_images=1)  # quota above the valid pixels: all
    logits, truth = images[0]
    assert few.add(logits, truth, 0) == int((truth != 255).sum())


def test_apply_temperature_keeps_the_argmax():
    generator = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(2, C, 6, 7, generator=generator)
    probabilities = torch.softmax(logits, dim=1)
    probabilities[0, :, 0, 0] = torch.tensor([0.0, 0.0, 0.7, 0.3, 0.0])
    for temperature in (0.25, 1.0, 4.0):
        from_logits = apply_temperature(logits, temperature, are_probabilities=False, dim=1)
        assert torch.equal(from_logits.argmax(dim=1), logits.argmax(dim=1))
        torch.testing.assert_close(from_logits, torch.softmax(logits / temperature, dim=1))
        from_probabilities = apply_temperature(probabilities, temperature, True, dim=1)
        assert torch.equal(from_probabilities.argmax(dim=1), probabilities.argmax(dim=1))
        powered = probabilities ** (1 / temperature)
        torch.testing.assert_close(from_probabilities, powered / powered.sum(dim=1, keepdim=True))
    assert torch.equal(apply_temperature(logits[0], 2.0, False).argmax(dim=0),
                       logits[0].argmax(dim=0))  # (C, H, W) by default
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(logits, 0.0, False)


# --- images --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 16])
def test_png_encodings_round_trip_within_half_a_step(bits):
    top = 2**bits - 1
    rng = np.random.default_rng(4)
    conf = rng.random((30, 40)).astype(np.float32)
    conf[0, :3] = [0.0, 1.0, 0.5]
    png = confidence_png(conf, bits)
    assert png.dtype == (np.uint8 if bits == 8 else np.uint16)
    assert png[0, 0] == 0 and png[0, 1] == top
    assert np.abs(decode_confidence(png, bits) - conf).max() <= 0.5 / top + 1e-7

    _, _, uniform = confidence_entropy(torch.full((1, 19, 2, 3), 1 / 19))
    assert np.all(entropy_png(uniform[0], 19, bits) == top)
    entropy = rng.random((30, 40)) * math.log(19)
    entropy[0, 0] = 0
    png = entropy_png(entropy, 19, bits)
    assert png[0, 0] == 0
    assert np.abs(decode_entropy(png, 19, bits) - entropy).max() <= \
        0.5 / top * math.log(19) + 1e-6


def test_png_writers_and_refusals(tmp_path):
    conf = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    write_confidence_png(tmp_path / "confidence.png", conf, 16)
    assert np.array_equal(read_labels(tmp_path / "confidence.png", "confidence"),
                          confidence_png(conf, 16))
    write_entropy_png(tmp_path / "entropy.png", conf * math.log(19), 19, 8)
    assert np.array_equal(read_labels(tmp_path / "entropy.png", "entropy"),
                          entropy_png(conf * math.log(19), 19, 8))
    with pytest.raises(ValueError, match="8 or 16"):
        confidence_png(conf, 12)
    with pytest.raises(ValueError, match="NaN"):
        confidence_png(np.full((2, 2), np.nan), 8)


def test_heat_colors():
    values = np.array([[0.0, 0.5, 1.0, np.nan], [-1.0, 2.0, 0.25, 0.75]])
    colors = heat_colors(values)
    assert colors.shape == (2, 4, 3) and colors.dtype == np.uint8
    assert np.array_equal(colors[1, 0], colors[0, 0]) and np.array_equal(colors[1, 1],
                                                                         colors[0, 2])
    assert np.array_equal(colors[0, 3], [0, 0, 0])
    brightness = colors[0, :3].astype(int).sum(axis=1)
    assert brightness[0] < brightness[1] < brightness[2]  # cividis: dark to light
    assert np.array_equal(heat_colors(torch.tensor([0.5])), colors[0, 1][None])
