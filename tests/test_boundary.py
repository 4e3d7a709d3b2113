"""Boundary IoU and trimap IoU (`fcn.analysis.boundary`) against brute force, Cheng et al.'s
`mask_to_boundary` and hand-counted cases."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from fcn.analysis.boundary import BoundaryAccumulator, boundary_radius, edge_band

IGNORE = 255
SIZES = ((7, 11), (13, 9), (1, 6), (4, 4))


def random_labels(rng: np.random.Generator, shape: tuple[int, int], classes: int = 4,
                  noisy: bool = False) -> np.ndarray:
    """Rectangles of a few classes (noise if `noisy`) with an ignore patch or two."""
    height, width = shape
    if noisy:
        labels = rng.integers(0, classes, shape).astype(np.uint8)
    else:
        labels = np.full(shape, rng.integers(classes), dtype=np.uint8)
        for _ in range(rng.integers(1, 5)):
            y, x = rng.integers(height), rng.integers(width)
            labels[y:y + rng.integers(1, 6), x:x + rng.integers(1, 6)] = rng.integers(classes)
    for _ in range(rng.integers(0, 3)):
        y, x = rng.integers(height), rng.integers(width)
        labels[y:y + rng.integers(1, 4), x:x + rng.integers(1, 4)] = IGNORE
    return labels


def brute_band(labels: np.ndarray, radius: int) -> np.ndarray:
    """The definition, pixel by pixel: another label or the outside within the window."""
    height, width = labels.shape
    band = np.zeros(labels.shape, dtype=bool)
    for y, x in itertools.product(range(height), range(width)):
        for dy, dx in itertools.product(range(-radius, radius + 1), repeat=2):
            qy, qx = y + dy, x + dx
            if not (0 <= qy < height and 0 <= qx < width) or labels[qy, qx] != labels[y, x]:
                band[y, x] = True
                break
    return band


def brute_counts(gt: np.ndarray, pred: np.ndarray, classes: int, radius: int,
                 widths: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boundary intersection/union per class and trimap confusion per width, by loops."""
    gt_band, pred_band = brute_band(gt, radius), brute_band(pred, radius)
    trimap = [brute_band(gt, w) for w in widths]
    intersection = np.zeros(classes, dtype=np.int64)
    union = np.zeros(classes, dtype=np.int64)
    confusion = np.zeros((len(widths), classes, classes + 1), dtype=np.int64)
    for y, x in itertools.product(*map(range, gt.shape)):
        g, p = int(gt[y, x]), int(pred[y, x])
        if g == IGNORE:
            continue
        for c in range(classes):
            in_g = g == c and gt_band[y, x]
            in_p = p == c and pred_band[y, x]
            intersection[c] += in_g and in_p
            union[c] += in_g or in_p
        for i in range(len(widths)):
            if trimap[i][y, x]:
                confusion[i, g, classes if p == IGNORE else p] += 1
    return intersection, union, confusion


def brute_iou(confusion: np.ndarray) -> list[float]:
    """tp / (tp + fp + fn) per class; a prediction of 255 is a miss (column C)."""
    classes = confusion.shape[0]
    iou = []
    for c in range(classes):
        tp = confusion[c, c]
        fn = sum(confusion[c, j] for j in range(classes + 1) if j != c)
        fp = sum(confusion[i, c] for i in range(classes) if i != c)
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
    return iou


def same(a: list[float], b: list[float]) -> bool:
    return np.allclose(np.array(a, dtype=float), np.array(b, dtype=float), equal_nan=True)


def cheng_mask_to_boundary(mask: np.ndarray, dilation: int) -> np.ndarray:
    """Cheng et al.'s `mask_to_boundary` in numpy: pad one zero pixel, erode `dilation` times
    with a 3x3 kernel (cv2.erode's default border: outside the padded mask does not erode),
    crop, mask - eroded."""
    height, width = mask.shape
    padded = np.zeros((height + 2, width + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask
    for _ in range(dilation):
        frame = np.pad(padded, 1, constant_values=1)
        padded = np.min([frame[dy:dy + height + 2, dx:dx + width + 2]
                         for dy in range(3) for dx in range(3)], axis=0)
    return mask - padded[1:-1, 1:-1]


@pytest.mark.parametrize("seed", range(40))
def test_edge_band_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for shape in SIZES:
        labels = random_labels(rng, shape, noisy=seed % 4 == 0)
        for radius in (0, 1, 2, 3, max(shape), max(shape) + 4):
            band = edge_band(labels, radius)
            assert band.dtype == bool and band.shape == shape
            np.testing.assert_array_equal(band, brute_band(labels, radius),
                                          err_msg=f"{shape} radius {radius}")


def test_edge_band_extremes() -> None:
    labels = np.zeros((5, 8), dtype=np.uint8)
    assert not edge_band(labels, 0).any()
    assert edge_band(labels, 8).all()
    assert edge_band(labels, 1).sum() == 40 - 3 * 6  # only the frame: a uniform map
    with pytest.raises(ValueError, match="-1"):
        edge_band(labels, -1)


@pytest.mark.parametrize("seed", range(40))
def test_scores_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    classes, widths = 4, (0, 1, 2, 3, 20)
    ratio = (0.02, 0.15, 0.3)[seed % 3]
    accumulator = BoundaryAccumulator(classes, widths, ratio)
    intersection = np.zeros(classes, dtype=np.int64)
    union = np.zeros(classes, dtype=np.int64)
    confusion = np.zeros((len(widths), classes, classes + 1), dtype=np.int64)
    for shape in SIZES[:2]:
        gt = random_labels(rng, shape, classes, noisy=seed % 5 == 0)
        pred = random_labels(rng, shape, classes, noisy=seed % 7 == 0)
        radius = boundary_radius(*shape, ratio)
        counts = brute_counts(gt, pred, classes, radius, widths)
        image = accumulator.add(gt, pred)
        assert image["radius"] == radius
        present = counts[1] > 0
        expected = np.mean(counts[0][present] / counts[1][present]) if present.any() else math.nan
        assert same([image["boundary_miou"]], [expected])
        intersection += counts[0]
        union += counts[1]
        confusion += counts[2]
    np.testing.assert_array_equal(accumulator.intersection, intersection)
    np.testing.assert_array_equal(accumulator.union, union)
    np.testing.assert_array_equal(accumulator.confusion, confusion)
    result = accumulator.result()
    boundary = [i / u if u else math.nan for i, u in zip(intersection, union)]
    assert same(result["boundary_iou"], boundary)
    assert same([result["boundary_miou"]], [np.nanmean(boundary) if union.any() else math.nan])
    for i, matrix in enumerate(confusion):
        iou = brute_iou(matrix)
        assert same(result["trimap_iou"][i], iou)
        defined = [v for v in iou if not math.isnan(v)]
        assert same([result["trimap_miou"][i]], [np.mean(defined) if defined else math.nan])
        total = matrix.sum()
        assert same([result["trimap_pixel_accuracy"][i]],
                    [np.trace(matrix) / total if total else math.nan])
        assert result["trimap_pixels"][i] == total


@pytest.mark.parametrize("seed", range(10))
def test_class_boundaries_are_cheng_mask_to_boundary(seed: int) -> None:
    """{G == c} ∩ edge_band(G, d) is their boundary of the mask of class c, for every c."""
    rng = np.random.default_rng(2000 + seed)
    gt = random_labels(rng, (30, 50), classes=5)
    for ratio in (0.02, 0.05, 0.1):
        dilation = boundary_radius(30, 50, ratio)
        band = edge_band(gt, dilation)
        union = np.zeros(gt.shape, dtype=bool)
        for c in [*range(5), IGNORE]:
            theirs = cheng_mask_to_boundary((gt == c).astype(np.uint8), dilation)
            np.testing.assert_array_equal(theirs.astype(bool), (gt == c) & band)
            union |= theirs.astype(bool)
        np.testing.assert_array_equal(union, band)


def test_boundary_radius_is_cheng_dilation() -> None:
    assert boundary_radius(1024, 2048) == 46  # round(0.02 * 2289.73)
    assert boundary_radius(3, 4, 0.5) == 2  # round(2.5): half to even, as Python's round
    assert boundary_radius(3, 4, 0.7) == 4  # round(3.5)
    assert boundary_radius(10, 10) == 1  # round(0.28) = 0, raised to 1


def test_square_shifted_by_one_pixel() -> None:
    """10x10 background (0) with a 4x4 square (1) at rows 3-6, cols 3-6; the prediction has
    it at cols 4-7. d = 1 (round(0.02 * 14.1) = 0, raised to 1).

    Class 1: G_d is the square's ring, 16 - 4 (2x2 inside) = 12 pixels; P_d likewise 12.
    They share rows 3 and 6 at cols 4-6 (6 pixels): the sides (G col 3 and 6, P col 4 and 7,
    rows 4-5) do not meet. intersection 6, union 12 + 12 - 6 = 18.
    Class 0: G_d = frame (36) + the ring around the square (rows 2-7 x cols 2-7 less the
    square: 20) = 56; P_d likewise 56 (ring at cols 3-8). Both hold the frame (36) and rows 2
    and 7 at cols 3-7 (10); beside the square the two rings are at cols 2, 7 and 3, 8 and
    col 7 is the predicted square. intersection 46, union 56 + 56 - 46 = 66.
    Trimap at width 1 (G's band: 56 + 12 = 68 pixels): the square's ring is predicted 1 but
    for col 3 (4 pixels predicted 0); the background band is predicted 0 but for col 7,
    rows 3-6 (4 pixels predicted 1). Confusion [[52, 4], [4, 8]]: IoU 52/60 and 8/16,
    accuracy 60/68.
    """
    gt = np.zeros((10, 10), dtype=np.uint8)
    gt[3:7, 3:7] = 1
    pred = np.roll(gt, 1, axis=1)
    accumulator = BoundaryAccumulator(2, widths=(1,))
    image = accumulator.add(gt, pred)
    assert image["radius"] == 1
    assert accumulator.intersection.tolist() == [46, 6]
    assert accumulator.union.tolist() == [66, 18]
    assert accumulator.confusion[0].tolist() == [[52, 4, 0], [4, 8, 0]]
    result = accumulator.result()
    assert same(result["boundary_iou"], [46 / 66, 6 / 18])
    assert image["boundary_miou"] == pytest.approx((46 / 66 + 6 / 18) / 2)
    assert same(result["trimap_iou"][0], [52 / 60, 8 / 16])
    assert result["trimap_pixel_accuracy"] == [pytest.approx(60 / 68)]
    assert image["trimap_pixel_accuracy"] == [pytest.approx(60 / 68)]
    assert result["trimap_pixels"] == [68]


def test_thin_pole_one_pixel_off_scores_zero() -> None:
    """A 1-pixel-wide pole (class 1, col 5, rows 2-9) is all boundary; predicted at col 6 it
    shares no pixel: intersection 0, union 8 + 8."""
    gt = np.zeros((12, 12), dtype=np.uint8)
    gt[2:10, 5] = 1
    pred = np.roll(gt, 1, axis=1)
    for radius_ratio in (0.02, 0.1):  # d = 1 and d = 2
        accumulator = BoundaryAccumulator(2, widths=(1, 2), ratio=radius_ratio)
        accumulator.add(gt, pred)
        assert accumulator.intersection[1] == 0 and accumulator.union[1] == 16
        result = accumulator.result()
        assert result["boundary_iou"][1] == 0.0
        assert result["trimap_iou"][0][1] == 0.0


def test_perfect_prediction_scores_one_for_present_classes() -> None:
    gt = random_labels(np.random.default_rng(7), (40, 60), classes=6)
    accumulator = BoundaryAccumulator(8, widths=(1, 3, 100))
    image = accumulator.add(gt, gt.copy())
    result = accumulator.result()
    present = set(np.unique(gt).tolist()) - {IGNORE}
    for c in range(8):
        expected = 1.0 if c in present else math.nan
        assert same([result["boundary_iou"][c]], [expected])
        assert same([iou[c] for iou in result["trimap_iou"]], [expected] * 3)
    assert image["boundary_miou"] == result["boundary_miou"] == 1.0
    assert result["trimap_pixel_accuracy"] == [1.0, 1.0, 1.0]
    assert result["trimap_pixels"][2] == int((gt != IGNORE).sum())


def test_ignored_ground_truth_forms_an_edge_but_is_not_counted() -> None:
    """8x8, ground truth class 1 in cols 0-3 and 255 in cols 4-7; the prediction is 1
    everywhere. d = 1.
    G_d: the class-1 half within 1 of the frame or of the 255 half: 32 less rows 1-6 x cols
    1-2 (12) = 20 (without 255 forming an edge, col 3 would be out: 14). P_d: the frame (28),
    of which 14 lie on valid pixels (rows 0 and 7 at cols 0-3, col 0 rows 1-6), all inside
    G_d. intersection 14, union 20 + 14 - 14 = 20; the 14 frame pixels over 255 are not
    counted.
    """
    gt = np.full((8, 8), IGNORE, dtype=np.uint8)
    gt[:, :4] = 1
    pred = np.ones((8, 8), dtype=np.uint8)
    accumulator = BoundaryAccumulator(2, widths=(1,))
    accumulator.add(gt, pred)
    assert accumulator.intersection.tolist() == [0, 14]
    assert accumulator.union.tolist() == [0, 20]
    assert accumulator.confusion[0].tolist() == [[0, 0, 0], [0, 20, 0]]
    result = accumulator.result()
    assert same(result["boundary_iou"], [math.nan, 14 / 20])
    assert result["boundary_miou"] == pytest.approx(0.7)


def test_prediction_255_is_a_miss() -> None:
    gt = np.zeros((4, 4), dtype=np.uint8)
    pred = np.full((4, 4), IGNORE, dtype=np.uint8)
    accumulator = BoundaryAccumulator(2, widths=(4,))
    accumulator.add(gt, pred)
    assert accumulator.confusion[0].tolist() == [[0, 0, 16], [0, 0, 0]]
    assert accumulator.intersection.tolist() == [0, 0] and accumulator.union.tolist() == [12, 0]
    result = accumulator.result()
    assert result["trimap_iou"][0][0] == 0.0 and result["trimap_pixel_accuracy"] == [0.0]


def test_streaming_sums_the_counts_of_each_image() -> None:
    """Two images of different sizes (so different radii) added to one accumulator give
    the sums of their separate counts, and the scores of the summed counts."""
    rng = np.random.default_rng(3)
    images = [(random_labels(rng, (20, 30)), random_labels(rng, (20, 30))),
              (random_labels(rng, (60, 90)), random_labels(rng, (60, 90)))]
    both = BoundaryAccumulator(4, widths=(1, 2, 5), ratio=0.1)
    alone = [BoundaryAccumulator(4, widths=(1, 2, 5), ratio=0.1) for _ in images]
    for (gt, pred), single in zip(images, alone):
        assert json.dumps(both.add(gt, pred)) == json.dumps(single.add(gt, pred))  # NaN-safe
    for name in ("intersection", "union", "confusion"):
        np.testing.assert_array_equal(getattr(both, name),
                                      getattr(alone[0], name) + getattr(alone[1], name))
    result = both.result()
    assert result["images"] == 2
    assert result["radius_by_size"] == {"20x30": 4, "60x90": 11}
    intersection = alone[0].intersection + alone[1].intersection
    union = alone[0].union + alone[1].union
    assert same(result["boundary_iou"],
                [i / u if u else math.nan for i, u in zip(intersection, union)])
    assert result["boundary_intersection"] == intersection.tolist()


def test_image_figures_and_result_are_plain_json() -> None:
    rng = np.random.default_rng(4)
    accumulator = BoundaryAccumulator(4, widths=(1, 2))
    image = accumulator.add(random_labels(rng, (9, 9)), random_labels(rng, (9, 9)))
    assert set(image) == {"height", "width", "radius", "boundary_miou", "trimap_miou",
                          "trimap_pixel_accuracy"}
    result = accumulator.result()
    assert set(result) == {"images", "num_classes", "ratio", "radius_by_size", "boundary_iou",
                           "boundary_miou", "boundary_intersection", "boundary_union",
                           "trimap_widths", "trimap_iou", "trimap_miou",
                           "trimap_pixel_accuracy", "trimap_pixels"}
    for value in (image, result):
        assert json.loads(json.dumps(value)).keys() == value.keys()

    def plain(value: object) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return type(value) in (int, float)

    assert plain(image) and plain(result)


def test_errors_name_the_shapes_and_ids() -> None:
    accumulator = BoundaryAccumulator(19)
    gt = np.zeros((4, 6), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\(4, 6\).*\(6, 4\)"):
        accumulator.add(gt, np.zeros((6, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(4, 6, 1\)"):
        accumulator.add(gt[..., None], gt[..., None])
    bad = gt.copy()
    bad[0, :2] = (19, 200)
    with pytest.raises(ValueError, match=r"prediction .*\[19, 200\]"):
        accumulator.add(gt, bad)
    with pytest.raises(ValueError, match=r"ground truth .*\[19, 200\]"):
        accumulator.add(bad, gt)
    assert accumulator.images == 0 and not accumulator.union.any()
    accumulator.add(gt, np.full_like(gt, IGNORE))  # 255 is a valid prediction
    with pytest.raises(ValueError, match="num_classes"):
        BoundaryAccumulator(256)
    with pytest.raises(ValueError, match="widths"):
        BoundaryAccumulator(19, widths=(1, -2))
