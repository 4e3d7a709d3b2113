"""Dataset pairing and its errors; the new augmentation against the torchvision pipeline it
replaces; seeded (order-free) randomness across workers, resumes and the decoded cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from fcn.cityscapes.labels import IGNORE_INDEX
from fcn.errors import DataError
from fcn.train import photometric
from fcn.train.augment import Recipe, crop_pair, draw, reference_transform
from fcn.train.data import (SeededSampler, SegmentationDataset, ShardSampler, sample_seed,
                            worker_count)
from fcn.decode import array_path, decode_stage
from fcn.train.loop import to_device
from fcn.train.pairs import find_pairs

RECIPE = Recipe.of([48, 48], [0.75, 1.5], True, 0.2)


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
    image, mask = dataset[0]  # whole images stay uint8 until the device
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 128)
    assert mask.dtype == torch.uint8 and mask.shape == (64, 128)
    with Image.open(dataset.pairs[0].image) as png:
        assert torch.equal(image, torch.from_numpy(np.array(png)).permute(2, 0, 1))
    with Image.open(dataset.pairs[0].mask) as png:
        assert torch.equal(mask, torch.from_numpy(np.array(png)))
    images, targets = to_device((image[None], mask[None]), torch.device("cpu"))
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images[0], image.float() / 255) and targets.dtype == torch.int64


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


def _blocks(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A 128x256 image that *is* its mask: 16-pixel blocks of one class, gray level 10 x class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.repeat(rng.integers(0, 19, (8, 16)), 16, 0), 16, 1).astype(np.uint8)
    return torch.from_numpy(labels * 10)[None].repeat(3, 1, 1), torch.from_numpy(labels)


def _regions(image: torch.Tensor, mask: torch.Tensor):
    return (lambda t, l, h, w: image[:, t:t + h, l:l + w],
            lambda t, l, h, w: mask[None, t:t + h, l:l + w])


def _uniform(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Pixels whose size x size neighbourhood holds one label (and no padding)."""
    m = mask[None, None].float()
    one = (F.max_pool2d(m, size, 1, size // 2) == -F.max_pool2d(-m, size, 1, size // 2))[0, 0]
    return one & (mask != IGNORE_INDEX)


def test_augmentation_keeps_image_and_mask_aligned():
    """After rescale, crop and flip the image and its mask still agree wherever the mask is
    not padding (away from label edges, where bilinear and nearest differ)."""
    image, mask = _blocks()
    recipe = Recipe.of([160, 160], [0.5, 2.0], True, 0.0)
    padded = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out_mask = crop_pair(*_regions(image, mask), (128, 256),
                                        draw(recipe, 128, 256), recipe.crop)
        assert out_image.dtype == out_mask.dtype == torch.uint8
        assert out_image.shape == (3, 160, 160) and out_mask.shape == (160, 160)
        padded += int((out_mask == IGNORE_INDEX).sum())
        inside = _uniform(out_mask, 5)
        assert inside.sum() > 300
        gray = torch.round(out_image[0].float() / 10)
        assert torch.equal(gray[inside], out_mask[inside].float())
    assert padded > 0  # scales below 1 made crops larger than the image: padded with ignore


def test_new_geometry_matches_resize_then_crop_within_interpolation_tolerance():
    """The same seed makes the same draws as the old torchvision pipeline (rescale the whole
    image, then crop and flip); the crop shows the same region at the same scale: the padding
    is the same, the masks differ only next to a label edge (at most one pixel apart), and the
    images agree within 2 gray levels inside the blocks (3 pixels from the crop's frame, where
    the old pipeline's filter also saw pixels outside the window)."""
    image, mask = _blocks(1)
    recipe = Recipe.of([96, 160], [0.5, 2.0], True, 0.0)
    old = reference_transform(recipe)
    for seed in range(40):
        torch.manual_seed(seed)
        new_image, new_mask = crop_pair(*_regions(image, mask), (128, 256),
                                        draw(recipe, 128, 256), recipe.crop)
        torch.manual_seed(seed)
        old_image, old_mask = old(tv_tensors.Image(image), tv_tensors.Mask(mask[None]))
        old_image = (old_image * 255).round().to(torch.uint8)
        old_mask = old_mask[0].to(torch.uint8)
        assert torch.equal(new_mask == IGNORE_INDEX, old_mask == IGNORE_INDEX), seed
        differ = new_mask != old_mask  # only next to a label edge: at most 1 pixel apart
        differ[[0, -1], :] = differ[:, [0, -1]] = False  # the frame cannot see its neighbours
        assert not (differ & _uniform(old_mask, 3)).any(), seed
        inside = _uniform(old_mask, 5)
        inside[:3], inside[-3:], inside[:, :3], inside[:, -3:] = False, False, False, False
        diff = (new_image.int() - old_image.int()).abs()[:, inside]
        assert diff.max() <= 2, (seed, int(diff.max()))  # block interiors: same colour


def test_photometric_jitter_equals_torchvision_per_sample():
    """The batched device-side jitter is torchvision's ColorJitter on float images: each
    sample's four operations in its own order with its own factors."""
    torch.manual_seed(0)
    images = torch.rand(5, 3, 24, 40)
    params = []
    for seed in range(5):
        torch.manual_seed(seed)
        params.append(draw(Recipe.of([24, 40], [1.0, 1.0], False, 0.5), 24, 40).jitter)
    params = torch.stack(params)
    assert len({tuple(p[:4].tolist()) for p in params}) > 1  # orders differ between samples
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = []
    for image, p in zip(images, params):
        for op_id in p[:4].long().tolist():
            image = ops[op_id](image, float(p[4 + op_id]))
        expected.append(image)
    torch.testing.assert_close(photometric.jitter(images, params), torch.stack(expected),
                               atol=1e-5, rtol=0)


def test_same_seed_same_sample_other_seed_other_sample(tiny_dataset, masks):
    dataset = SegmentationDataset(tiny_dataset, masks, "train", RECIPE)
    a = dataset[(2, 1234)]
    torch.rand(100)  # global RNG use in between must not matter
    b = SegmentationDataset(tiny_dataset, masks, "train", RECIPE)[(2, 1234)]  # a new process
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
    c = dataset[(2, 1235)]
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])  # crop and jitter
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1)


def test_batches_do_not_depend_on_the_number_of_workers(tiny_dataset, masks):
    dataset = SegmentationDataset(tiny_dataset, masks, "train", RECIPE)

    def batches(workers: int) -> list[list[torch.Tensor]]:
        sampler = SeededSampler(dataset, seed=3)
        sampler.set_epoch(1)
        loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=workers)
        return list(loader)

    for a, b in zip(batches(0), batches(2), strict=True):
        assert len(a) == len(b) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_decoded_cache_gives_the_samples_of_the_pngs(tiny_dataset, masks, tmp_path):
    index = decode_stage(tiny_dataset, masks, tmp_path / "decoded", True, 2)
    assert [len(index["splits"][s]) for s in ("train", "val")] == [6, 2]
    png = SegmentationDataset(tiny_dataset, masks, ["train", "val"], RECIPE)
    npy = SegmentationDataset(tiny_dataset, masks, ["train", "val"], RECIPE, tmp_path / "decoded")
    for i in range(len(png)):
        key = (i, sample_seed(0, 3, i))
        assert all(torch.equal(x, y) for x, y in zip(png[key], npy[key]))
    whole_png = SegmentationDataset(tiny_dataset, masks, "val")
    whole_npy = SegmentationDataset(tiny_dataset, masks, "val", None, tmp_path / "decoded")
    assert all(torch.equal(x, y) for x, y in zip(whole_png[1], whole_npy[1]))


def test_a_damaged_decoded_array_is_refused_in_one_line(tiny_dataset, masks, tmp_path):
    decoded = tmp_path / "decoded"
    decode_stage(tiny_dataset, masks, decoded, True, 1)
    stem = find_pairs(tiny_dataset, masks, "val")[0].stem
    image = array_path(decoded, "val", stem, "image")
    np.save(image, np.zeros((64, 127, 3), np.uint8))
    with pytest.raises(DataError, match=r"decoded image is uint8 \(64, 127, 3\), expected uint8 "
                                        r"\(64, 128, 3\)"):
        SegmentationDataset(tiny_dataset, masks, "val", None, decoded)
    np.save(image, np.zeros((64, 128, 3), np.uint8))
    image.write_bytes(image.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        SegmentationDataset(tiny_dataset, masks, "val", None, decoded)
    disabled = decode_stage(tiny_dataset, masks, tmp_path / "off", False, 1)
    assert disabled["splits"] == {} and not list((tmp_path / "off").rglob("*.npy"))
    with pytest.raises(DataError, match="holds no arrays"):
        SegmentationDataset(tiny_dataset, masks, "val", None, tmp_path / "off")


@pytest.mark.parametrize("damage", ["mask of 77s", "inverted image"])
def test_altered_decoded_data_is_refused_before_training(tiny_dataset, masks, tmp_path, damage):
    """Headers intact, data altered: the arrays' SHA-256 in the index catch it in one line
    (it used to train on the altered data, or fail with a traceback 55 s into training)."""
    decoded = tmp_path / "decoded"
    decode_stage(tiny_dataset, masks, decoded, True, 1)
    stem = find_pairs(tiny_dataset, masks, "train")[1].stem
    kind = "mask" if damage == "mask of 77s" else "image"
    path = array_path(decoded, "train", stem, kind)
    data = np.load(path, mmap_mode="r+")
    if kind == "mask":
        data[:] = 77
    else:
        data[:] = 255 - data
    data.flush()
    del data
    with pytest.raises(DataError) as error:
        SegmentationDataset(tiny_dataset, masks, "train", RECIPE, decoded)
    assert str(error.value) == (f"{path}: decoded {kind} does not match its SHA-256 in "
                                f"{decoded / 'index.json'} (damaged or altered since the decode "
                                "stage wrote it; rerun it)")


def test_a_source_replaced_after_decoding_makes_the_cache_stale(tiny_dataset, masks, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(tiny_dataset, root)
    decoded = tmp_path / "decoded"
    decode_stage(root, masks, decoded, True, 1)
    first, second = [p.image for p in find_pairs(root, masks, "val")]
    original = first.read_bytes()
    first.write_bytes(second.read_bytes())  # another image of the same size in its place
    with pytest.raises(DataError) as error:
        SegmentationDataset(root, masks, "val", None, decoded)
    assert str(error.value) == (f"{first}: changed since the decode stage cached it (its SHA-256 "
                                f"differs from the one in {decoded / 'index.json'}); rerun the "
                                "decode stage")
    first.write_bytes(original)  # written again, same bytes, another mtime: not stale
    os.utime(second, ns=(0, 0))
    assert len(SegmentationDataset(root, masks, "val", None, decoded)) == 2


def test_two_clean_decodes_write_byte_identical_caches(tiny_dataset, masks, tmp_path):
    """The index records content (SHA-256), never sizes on disk or modification times: a
    cache rebuilt from the same data is the same bytes (issue 21)."""
    import shutil

    def tree(folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    root = tmp_path / "root"
    shutil.copytree(tiny_dataset, root)
    decode_stage(root, masks, tmp_path / "a", True, 2)
    for path in root.rglob("*.png"):
        os.utime(path, ns=(10**18, 10**18))  # the same data written again later
    decode_stage(root, masks, tmp_path / "b", True, 1)
    assert tree(tmp_path / "a") == tree(tmp_path / "b")


@pytest.mark.parametrize("damage, problem", [
    (lambda e: e.update(height="abc"), "height 'abc' is not a positive integer"),
    (lambda e: e.pop("height"), "height None is not a positive integer"),
    (lambda e: e.update(width=True), "width True is not a positive integer"),
    (lambda e: e.pop("image"), "no image record"),
    (lambda e: e["mask"].update(sha256="x" * 64), "mask sha256 'xxxx"),
    (lambda e: e["image"].update(source=[10, 20]), "image source [10, 20] is not a SHA-256"),
    (lambda e: e.pop("stem"), "no stem"),
])
def test_a_damaged_index_is_one_line(tiny_dataset, masks, tmp_path, damage, problem):
    """Before: KeyError, ValueError or AttributeError tracebacks (hunt finding 16)."""
    decoded = tmp_path / "decoded"
    decode_stage(tiny_dataset, masks, decoded, True, 1)
    index_file = decoded / "index.json"
    index = json.loads(index_file.read_text())
    damage(index["splits"]["val"][1])
    index_file.write_text(json.dumps(index))
    with pytest.raises(DataError) as error:
        SegmentationDataset(tiny_dataset, masks, "val", None, decoded)
    message = str(error.value)
    assert message.startswith(f"{index_file}: damaged index (val entry 1: {problem}")
    assert message.endswith("; rerun the decode stage") and "\n" not in message
    index["splits"] = []
    index_file.write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"split 'val' not decoded"):
        SegmentationDataset(tiny_dataset, masks, "val", None, decoded)


def test_workers_auto():
    assert worker_count(3, torch.device("cpu"), 1) == 3
    assert worker_count("auto", torch.device("cpu"), 1) == 0  # the model has every core
    assert 1 <= worker_count("auto", torch.device("cuda"), 1) <= 16


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
