"""Datasets and paired transforms: Cityscapes images with their generated trainId masks.

Images come from `data.root`, their labelTrainIds masks from the masks stage's `data.generated`
(paths: fcn.cityscapes.layout), paired by stem. Every pair
is checked (mask present, same size) when the dataset is built, before any training starts.

Decoding uses `torchvision.io.decode_png` (`fcn.images.read_tensor`): it returns the CHW uint8
tensor the transforms want, and measures faster than PIL + permute (`benchmarks/decode.py`).

Augmentation is deterministic: each training sample is transformed under its own seed,
derived from (train seed, epoch, dataset index) by `sample_seed`. The result does not depend
on which worker or rank loads the sample, nor on what ran before, so a resumed run sees
exactly the crops an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from fcn.cityscapes import layout
from fcn.cityscapes.labels import IGNORE_INDEX, NUM_CLASSES
from fcn.errors import DataError
from fcn.images import read_size, read_tensor

MASK_ENCODING = "labelTrainIds"


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path

    @property
    def stem(self) -> str:
        return layout.stem_of(self.image)


def find_pairs(root: str | Path, generated: str | Path, split: str) -> list[Pair]:
    """Every image of `split` with its mask, sorted by path; each pair checked for presence
    and size, so a bad dataset fails here, before training, naming both files."""
    pairs = []
    for image in layout.list_images(root, split):
        mask = layout.mask_path(generated, split, layout.stem_of(image), MASK_ENCODING)
        if not mask.is_file():
            raise DataError(f"{mask}: mask missing for image {image} (run the masks stage)")
        image_size, mask_size = read_size(image), read_size(mask, "mask")
        if image_size != mask_size:
            raise DataError(f"image {image} is {image_size[0]}x{image_size[1]} but its mask "
                            f"{mask} is {mask_size[0]}x{mask_size[1]} (width x height)")
        pairs.append(Pair(image, mask))
    return pairs


def load_pair(pair: Pair) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """The image (uint8[3, H, W]) and its trainId mask (uint8[1, H, W]), checked."""
    image = read_tensor(pair.image, 3)
    mask = read_tensor(pair.mask, 1, "mask")
    if image.shape[-2:] != mask.shape[-2:]:
        raise DataError(f"image {pair.image} is {tuple(image.shape[-2:])} but its mask "
                        f"{pair.mask} is {tuple(mask.shape[-2:])} (height, width)")
    bad = (mask >= NUM_CLASSES) & (mask != IGNORE_INDEX)
    if bad.any():
        value = int(mask[bad][0])
        raise DataError(f"{pair.mask}: trainId {value} is neither a class "
                        f"(0..{NUM_CLASSES - 1}) nor ignore ({IGNORE_INDEX})")
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from [low, high] (image bilinear, mask nearest)."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = low, high

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        factor = self.low + (self.high - self.low) * float(torch.rand(()))
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt, params: dict):
        return self._call_kernel(TF.resize, inpt, params["size"], antialias=True)


def train_transform(crop: Sequence[int], scale: Sequence[float], flip: bool,
                    jitter: float) -> v2.Transform:
    """Random rescale, crop (padding the mask with ignore), flip, optional photometric jitter;
    the image ends as float in [0, 1], the mask as int64 trainIds."""
    steps: list[v2.Transform] = [
        RandomScale(scale[0], scale[1]),
        v2.RandomCrop(list(crop), pad_if_needed=True,
                      fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if jitter > 0:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter,
                                    hue=min(0.5, jitter / 4)))
    steps.append(v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64,
                             "others": None}, scale=True))
    return v2.Compose(steps)


def eval_transform() -> v2.Transform:
    """Whole images: only the conversion to float image and int64 mask."""
    return v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64,
                       "others": None}, scale=True)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, independent of loading order."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SegmentationDataset(Dataset):
    """(image float[3, H, W] in [0, 1], mask int64[H, W]) pairs of one split or several
    (their pairs one after the other, e.g. train then val for train+val training).

    Indexed either by an int (no randomness) or, for training, by `(index, seed)` tuples
    as `SeededSampler` yields them: the transform then runs under that seed.
    """

    def __init__(self, root: str | Path, generated: str | Path, split: str | Sequence[str],
                 transform: v2.Transform | None = None) -> None:
        self.splits = (split,) if isinstance(split, str) else tuple(split)
        self.pairs = [pair for s in self.splits for pair in find_pairs(root, generated, s)]
        self.transform = transform if transform is not None else eval_transform()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = load_pair(self.pairs[index])
        if seed is None:
            image, mask = self.transform(image, mask)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)[0]


class SeededSampler(Sampler[tuple[int, int]]):
    """Shuffled (index, augmentation seed) pairs for one rank, reshuffled per epoch.

    Wraps `DistributedSampler` (which also serves a single process: 1 replica, rank 0), so
    the order depends only on (seed, epoch) and each rank gets its share.
    """

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.seed = seed
        self.epoch = 0
        self.indices = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.indices.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.indices:
            yield index, sample_seed(self.seed, self.epoch, index)


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, …: each sample exactly once over all ranks (no padding,
    unlike DistributedSampler), so summed confusion matrices count every pixel once."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, length, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
