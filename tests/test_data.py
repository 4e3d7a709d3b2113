"""Dataset pairing and its errors, paired augmentation, and seeded (order-free) randomness."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from fcn.train.data import (SeededSampler, SegmentationDataset, ShardSampler, find_pairs,
                      sample_seed, train_transform)
from fcn.errors import DataError
from fcn.cityscapes.labels import IGNORE_INDEX



@pytest.fixture()
def own_masks(masks: Path, tmp_path: Path) -> Path:
    """A copy of the masks that a test may break."""
    return Path(shutil.copytree(masks, tmp_path / "generated"))


def test_pairs_are_found_by_stem_and_load_as_tensors(tiny_dataset, masks):
    dataset = SegmentationDataset(tiny_dataset, masks, "train")
    assert len(dataset) == 6
    for pair in dataset.pairs:
        assert pair.mask.name == f"{pair.stem}_gtFine_labelTrainIds.png"
        assert pair.mask.parent.name == pair.image.parent.name  # same city
    image, mask = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 128)
    assert 0 <= image.min() and image.max() <= 1
    assert mask.dtype == torch.int64 and mask.shape == (64, 128)
    with Image.open(dataset.pairs[0].mask) as png:
        assert torch.equal(mask, torch.from_numpy(np.asarray(png).astype(np.int64)))


def test_missing_mask_names_both_files(tiny_dataset, own_masks):
    pairs = find_pairs(tiny_dataset, own_masks, "val")
    pairs[1].mask.unlink()
    with pytest.raises(DataError) as error:
        SegmentationDataset(tiny_dataset, own_masks, "val")
    assert str(pairs[1].mask) in str(error.value) and str(pairs[1].image) in str(error.value)


def test_mask_of_another_size_names_both_files(tiny_dataset, own_masks):
    pair = find_pairs(tiny_dataset, own_masks, "val")[0]
    Image.new("L", (128, 63)).save(pair.mask)
    with pytest.raises(DataError) as error:
        SegmentationDataset(tiny_dataset, own_masks, "val")
    message = str(error.value)
    assert str(pair.mask) in message and str(pair.image) in message and "128x63" in message


def test_mask_values_outside_the_trainids_are_an_error_naming_the_file(tiny_dataset,
                                                                       own_masks):
    pair = find_pairs(tiny_dataset, own_masks, "val")[0]
    Image.fromarray(np.full((64, 128), 19, np.uint8)).save(pair.mask)
    with pytest.raises(DataError, match=f"{pair.mask}: trainId 19"):
        SegmentationDataset(tiny_dataset, own_masks, "val")[0]


def test_no_images_is_an_error_naming_the_folder(tmp_path, masks):
    with pytest.raises(DataError, match=str(tmp_path / "leftImg8bit" / "train")):
        find_pairs(tmp_path, masks, "train")


def test_augmentation_keeps_image_and_mask_aligned():
    """An image that *is* its mask (gray level = class): after rescale, crop and flip the
    two must still agree wherever the mask is not padding."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.repeat(rng.integers(0, 19, (8, 16)), 16, 0), 16, 1).astype(np.uint8)
    image = tv_tensors.Image(torch.from_numpy(labels * 10)[None].repeat(3, 1, 1))
    mask = tv_tensors.Mask(torch.from_numpy(labels)[None])
    transform = train_transform([160, 160], [0.5, 2.0], flip=True, jitter=0.0)
    padded = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, mask)
        out_mask = out_mask[0]
        assert out_image.shape == (3, 160, 160) and out_mask.shape == (160, 160)
        padded += int((out_mask == IGNORE_INDEX).sum())
        # Away from label edges (5x5 neighbourhood of one label) the bilinear image and the
        # nearest-neighbour mask must agree exactly; a flip or crop applied to only one of
        # them would leave ~1/19 agreeing.
        m = out_mask[None, None].float()
        uniform = (F.max_pool2d(m, 5, 1, 2) == -F.max_pool2d(-m, 5, 1, 2))[0, 0]
        inside = uniform & (out_mask != IGNORE_INDEX)
        assert inside.sum() > 300
        gray = torch.round(out_image[0] * 255 / 10)
        assert torch.equal(gray[inside], out_mask[inside].float())
    assert padded > 0  # scales below 1 made crops larger than the image: padded with ignore


def test_same_seed_same_sample_other_seed_other_sample(tiny_dataset, masks):
    dataset = SegmentationDataset(tiny_dataset, masks, "train",
                                  train_transform([48, 48], [0.75, 1.5], True, 0.2))
    a_image, a_mask = dataset[(2, 1234)]
    torch.rand(100)  # global RNG use in between must not matter
    b_image, b_mask = dataset[(2, 1234)]
    assert torch.equal(a_image, b_image) and torch.equal(a_mask, b_mask)
    c_image, _ = dataset[(2, 1235)]
    assert not torch.equal(a_image, c_image)
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1)


def test_batches_do_not_depend_on_the_number_of_workers(tiny_dataset, masks):
    dataset = SegmentationDataset(tiny_dataset, masks, "train",
                                  train_transform([48, 48], [0.75, 1.5], True, 0.2))

    def batches(workers: int) -> list[torch.Tensor]:
        sampler = SeededSampler(dataset, seed=3)
        sampler.set_epoch(1)
        loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=workers)
        return [image for image, _ in loader]

    assert all(torch.equal(a, b) for a, b in zip(batches(0), batches(2), strict=True))


def test_samplers_split_the_data_between_ranks():
    shards = [list(ShardSampler(7, rank, 2)) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))  # each index exactly once

    dataset = list(range(7))
    for epoch in (0, 1):
        ranks = [SeededSampler(dataset, seed=5, rank=r, world_size=2) for r in range(2)]
        for sampler in ranks:
            sampler.set_epoch(epoch)
        drawn = [index for sampler in ranks for index, _ in sampler]
        assert set(drawn) == set(range(7)) and len(drawn) == 8  # padded to equal shares
    first, second = SeededSampler(dataset, seed=5), SeededSampler(dataset, seed=5)
    second.set_epoch(1)
    assert list(first) != list(second)  # reshuffled every epoch
