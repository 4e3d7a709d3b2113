"""Rare-class sampling (fcn.train.sampling): class-uniform crops and cat_max_ratio draw the same
sample for the same (seed, epoch, index) with 0 or N loader workers, from the PNGs or the
decoded cache, and after a resume; cat_max_ratio never returns a dominated crop when one of
its tries is not; off, they change nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode

from fcn.cityscapes.labels import IGNORE_INDEX
from fcn.decode import decode_stage
from fcn.train import sampling
from fcn.train.augment import Draw, Recipe, crop, draw, window
from fcn.train.data import SeededSampler, SegmentationDataset

BASE = Recipe.of([48, 48], [0.75, 1.5], True, 0.2)
UNIFORM = dataclasses.replace(BASE, class_uniform=0.5)
# the tiny dataset's crops hold ~13 classes, the largest ~20%: 0.2 refuses some windows
RATIO = dataclasses.replace(BASE, cat_max_ratio=0.2, cat_max_tries=10)
BOTH = dataclasses.replace(BASE, class_uniform=0.5, cat_max_ratio=0.2)


def _batches(dataset: SegmentationDataset, workers: int, epoch: int = 1) -> list:
    sampler = SeededSampler(dataset, seed=3)
    sampler.set_epoch(epoch)
    return list(DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=workers))


@pytest.mark.parametrize("recipe", [UNIFORM, RATIO, BOTH], ids=["uniform", "ratio", "both"])
def test_draws_do_not_depend_on_workers_cache_or_a_fresh_process(tiny_dataset, masks, tmp_path,
                                                                recipe):
    dataset = SegmentationDataset(tiny_dataset, masks, "train", recipe)
    zero, two = _batches(dataset, 0), _batches(dataset, 2)
    decoded = tmp_path / "decoded"
    decode_stage(tiny_dataset, masks, decoded, True, 1)
    cached = _batches(SegmentationDataset(tiny_dataset, masks, "train", recipe, decoded), 0)
    torch.rand(50)  # global RNG use in between must not matter (a resumed run's history)
    again = _batches(SegmentationDataset(tiny_dataset, masks, "train", recipe), 0)
    for a, b, c, d in zip(zero, two, cached, again, strict=True):
        for x, y, z, w in zip(a, b, c, d):
            assert torch.equal(x, y) and torch.equal(x, z) and torch.equal(x, w)
    plain = _batches(SegmentationDataset(tiny_dataset, masks, "train", BASE), 0)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(zero, plain))  # it does something


def test_off_the_samples_are_exactly_todays(tiny_dataset, masks):
    dataset = SegmentationDataset(tiny_dataset, masks, "train", BASE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(77)
        d = draw(BASE, *dataset.pairs[1].size)
    image, mask = dataset.whole(1)
    expected = crop(lambda t, l, h, w: mask[None, t:t + h, l:l + w], IGNORE_INDEX,
                    dataset.pairs[1].size, d, BASE.crop, InterpolationMode.NEAREST, False)[0]
    assert torch.equal(dataset[(1, 77)][1], expected)
    assert dataset.positions is None


def test_positions_hold_only_pixels_of_their_class(tiny_dataset, masks):
    dataset = SegmentationDataset(tiny_dataset, masks, "train", UNIFORM)
    positions = dataset.positions
    assert positions is not None and positions.classes
    for (image, cls), points in positions.points.items():
        mask = dataset.mask(image)
        assert 1 <= len(points) <= sampling.POINTS_PER_CLASS
        assert (mask[points[:, 0], points[:, 1]] == cls).all()
        assert (points % sampling.STRIDE == 0).all()
        assert image in positions.images[cls]
    # every class of the split is there, with every image holding it on the grid
    for cls in positions.classes:
        holders = [i for i in range(len(dataset))
                   if (dataset.mask(i)[::sampling.STRIDE, ::sampling.STRIDE] == cls).any()]
        assert positions.images[cls].tolist() == holders


def test_class_uniform_crops_contain_their_class(tiny_dataset, masks):
    """A class-uniform crop is centred on a pixel of the drawn class, so the class is in it."""
    dataset = SegmentationDataset(tiny_dataset, masks, "train",
                                  dataclasses.replace(UNIFORM, class_uniform=1.0, scale=(1.0, 1.0),
                                                      flip=False))
    for seed in range(40):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image, row, column = sampling.class_uniform_choice(dataset.positions, 1.0)
        cls = int(dataset.mask(image)[row, column])
        assert cls in torch.unique(dataset[(0, seed)][1]).tolist(), seed


def test_centred_window_holds_the_pixel_and_stays_inside():
    d = Draw((100, 200), 0, 0, False, None)
    for row, column in [(0, 0), (99, 199), (50, 100), (10, 190)]:
        c = sampling.centred(d, (100, 200), (40, 60), row, column)
        assert 0 <= c.top <= 60 and 0 <= c.left <= 140
        assert c.top <= row < c.top + 40 and c.left <= column < c.left + 60
    small = sampling.centred(Draw((30, 200), 0, 0, False, None), (30, 200), (40, 60), 10, 5)
    assert small.top == -5 and small.left == 0  # padded as a random crop pads, centred


def _ratio(mask: torch.Tensor) -> tuple[int, float]:
    labels = mask.reshape(-1)
    counts = torch.bincount(labels[labels != IGNORE_INDEX].long())
    counts = counts[counts > 0]
    return len(counts), (float(counts.max() / counts.sum()) if len(counts) else 1.0)


def test_cat_max_ratio_never_returns_a_dominated_crop_when_a_try_is_not():
    """Replaying the same seeded draws, the tried windows are known: the stage returns the
    first one that passes, and only returns a dominated one when all tries are."""
    rng = np.random.default_rng(0)
    mask = np.zeros((120, 160), np.uint8)  # mostly class 0: most windows are dominated
    mask[rng.integers(0, 100, 6)[:, None] + np.arange(12), :] = 255
    for top, left in rng.integers(0, 100, (5, 2)):
        mask[top:top + 14, left:left + 18] = rng.integers(1, 19)
    source = torch.from_numpy(mask)
    region = lambda t, l, h, w: source[None, t:t + h, l:l + w]  # noqa: E731
    size, crop_hw, ratio, tries = (120, 160), (32, 32), 0.7, 5
    passed = failed = 0
    for seed in range(150):
        recipe = Recipe.of(crop_hw, [1.0, 1.0], False, 0.0, cat_max_ratio=ratio,
                           cat_max_tries=tries)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            d = draw(recipe, *size)
            chosen, chosen_mask = sampling.limit_dominance(
                d, crop_hw, lambda c: crop(region, IGNORE_INDEX, size, c, crop_hw,
                                           InterpolationMode.NEAREST, False)[0], ratio, tries)
        with torch.random.fork_rng(devices=[]):  # the tried windows, replayed by hand
            torch.manual_seed(seed)
            first = draw(recipe, *size)
            windows = [(first.top, first.left)] + [
                (window(size[0], crop_hw[0]), window(size[1], crop_hw[1]))
                for _ in range(tries - 1)]
        verdicts = []
        for top, left in windows:
            classes, share = _ratio(source[top:top + 32, left:left + 32])
            verdicts.append(classes > 1 and share < ratio)
        top, left = chosen.top, chosen.left
        assert torch.equal(chosen_mask, source[top:top + 32, left:left + 32])
        if any(verdicts):
            assert (chosen.top, chosen.left) == windows[verdicts.index(True)], seed
            passed += 1
        else:
            assert (chosen.top, chosen.left) == windows[-1], seed
            failed += 1
    assert passed > 10 and failed > 0  # both cases were exercised


def test_crop_frequency_counts_crops_holding_each_class():
    crops = [torch.tensor([[0, 0], [1, 255]], dtype=torch.uint8),
             torch.tensor([[1, 1], [1, 1]], dtype=torch.uint8)]
    share = sampling.crop_frequency(crops, num_classes=3)
    assert share.tolist() == [0.5, 1.0, 0.0]
