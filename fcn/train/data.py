"""The training and validation datasets, and the samplers that feed them to one or more ranks.

A dataset reads its pairs (`fcn.train.pairs`) either from the PNGs or, when the decode stage
wrote them, from memory-mapped raw arrays (`fcn.decode`): only the rows and columns a
crop needs are read. Training samples are augmented on the loader side in uint8
(`fcn.train.augment`: scale, crop, flip) and carry their photometric parameters to the device
(`fcn.train.photometric`); validation samples are whole uint8 images. The training loop turns
both into float on the device.

Augmentation is deterministic: each training sample is drawn under its own seed, derived from
(train seed, epoch, dataset index) by `sample_seed` (rare-class sampling too, which may pick
another image for that index: `fcn.train.sampling`). The result does not depend on which worker
or rank loads the sample, nor on what ran before, nor on whether the pixels came from the PNGs
or the decoded cache, so a resumed run sees exactly the crops an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision.transforms import InterpolationMode

from fcn.errors import DataError
from fcn.images import MAX_PIXELS
from fcn import decode as cache
from fcn.cityscapes import layout
from fcn.cityscapes.labels import IGNORE_INDEX
from fcn.train import sampling
from fcn.train.augment import Recipe, Region, crop, crop_pair, draw
from fcn.train.pairs import Pair, find_pairs, load_mask, load_pair

Sample = tuple[torch.Tensor, ...]
"""(image uint8[3, H, W], mask uint8[H, W]) and, for a jittered training sample, its
photometric parameters float[8]."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, independent of loading order."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def read_region(array: np.ndarray, top: int, left: int, height: int,
                width: int) -> torch.Tensor:
    """A copy of array[top:top+height, left:left+width] as uint8[C, height, width]."""
    block = np.ascontiguousarray(array[top:top + height, left:left + width])
    tensor = torch.from_numpy(block)
    return tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor.unsqueeze(0)


class SegmentationDataset(Dataset):
    """The pairs of one training source or several (one after the other, e.g. train then val
    for train+val training, or gtCoarse/train then gtCoarse/train_extra).

    A source is a split (gtFine: masks under `generated`) or `<set>/<split>` (`gtCoarse/…`:
    masks under `generated_coarse`, the coarse_masks stage's folder); `layout.parse_source`.
    Without a `recipe`, item `i` is the whole image and mask (uint8). With one, items are
    indexed by `(index, seed)` tuples as `SeededSampler` yields them (an int draws from the
    global generator): a crop drawn under that seed, plus its jitter vector if jitter is on.
    `decoded`: the decode stage's folder (gtFine train and val), read instead of the PNGs.
    """

    def __init__(self, root: str | Path, generated: str | Path, split: str | Sequence[str],
                 recipe: Recipe | None = None, decoded: str | Path | None = None,
                 max_pixels: int = MAX_PIXELS,
                 generated_coarse: str | Path | None = None) -> None:
        self.splits = (split,) if isinstance(split, str) else tuple(split)
        self.recipe = recipe
        self.max_pixels = max_pixels
        self.pairs: list[Pair] = []
        self.arrays: list[tuple[Path, Path]] = []
        for source in self.splits:
            s, annotation = layout.parse_source(source)
            masks = generated
            if annotation != layout.FINE:
                if generated_coarse is None:
                    raise DataError(f"{source}: {annotation} masks are the coarse pipeline's "
                                    "(coarse.generated): train on them there, through "
                                    "coarse.pretrain_splits or coarse.finetune_splits")
                if decoded is not None:
                    raise DataError(f"{decoded}: the decode stage's cache holds gtFine only, "
                                    f"not {source}; read it from PNGs (no decoded cache)")
                masks = generated_coarse
            pairs = find_pairs(root, masks, s, max_pixels, annotation)
            self.pairs += pairs
            if decoded is not None:
                sizes = cache.check_covers(decoded, s, [p.stem for p in pairs])
                if os.environ.get("LOCAL_RANK", "0") == "0":  # one process per machine
                    cache.verify(decoded, s, pairs, max_pixels)
                for pair in pairs:
                    if sizes[pair.stem] != pair.size:
                        raise DataError(
                            f"{cache.array_path(decoded, s, pair.stem, 'image')}: decoded at "
                            f"{sizes[pair.stem]} but {pair.image} is {pair.size} (height, "
                            "width; rerun the decode stage)")
                    image = cache.array_path(decoded, s, pair.stem, "image")
                    mask = cache.array_path(decoded, s, pair.stem, "mask")
                    for path, kind in ((image, "image"), (mask, "mask")):
                        cache.open_array(path, kind, *pair.size, max_pixels)  # header check
                    self.arrays.append((image, mask))
        self.positions: sampling.ClassPositions | None = None
        if recipe is not None and recipe.class_uniform > 0:  # once, not per sample
            self.positions = sampling.class_positions(self.mask(i) for i in range(len(self)))

    def __len__(self) -> int:
        return len(self.pairs)

    def memmaps(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Pair `index`'s decoded image [H, W, 3] and mask [H, W], memory-mapped read-only
        (headers checked again: the files may have changed since the dataset was built)."""
        image, mask = self.arrays[index]
        size = self.pairs[index].size
        return (cache.open_array(image, "image", *size, self.max_pixels),
                cache.open_array(mask, "mask", *size, self.max_pixels))

    def whole(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image uint8[3, H, W], mask uint8[H, W]) of pair `index`."""
        if not self.arrays:
            return load_pair(self.pairs[index], self.max_pixels)
        image, mask = self.memmaps(index)
        return (torch.from_numpy(np.array(image)).permute(2, 0, 1),
                torch.from_numpy(np.array(mask)))

    def mask(self, index: int) -> np.ndarray:
        """Pair `index`'s trainId mask [H, W] (memory-mapped when decoded; else its PNG alone,
        checked as `load_pair` checks it)."""
        if self.arrays:
            return self.memmaps(index)[1]
        return load_mask(self.pairs[index], self.max_pixels).numpy()

    def _regions(self, index: int) -> tuple[Region, Region]:
        if self.arrays:
            image, mask = self.memmaps(index)
            return (lambda *box: read_region(image, *box),
                    lambda *box: read_region(mask, *box))
        image_t, mask_t = load_pair(self.pairs[index], self.max_pixels)
        return (lambda t, l, h, w: image_t[:, t:t + h, l:l + w],
                lambda t, l, h, w: mask_t[None, t:t + h, l:l + w])

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if self.recipe is None:
            return self.whole(index)
        if seed is None:
            return self._sample(index, self.recipe)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also queues a lazy seed for every
            # accelerator backend, recording a stack trace each time (~0.3 ms a sample)
            torch.default_generator.manual_seed(seed)
            return self._sample(index, self.recipe)

    def _sample(self, index: int, recipe: Recipe) -> Sample:
        """One crop, every draw from torch's global generator (seeded by the caller): a
        class-uniform choice of image and centre when on, the augmentation's draws, and
        windows drawn again while cat_max_ratio refuses them (random windows only: a
        class-uniform crop is centred on its class on purpose)."""
        choice = (sampling.class_uniform_choice(self.positions, recipe.class_uniform)
                  if self.positions is not None else None)
        if choice is not None:
            index = choice[0]
        size = self.pairs[index].size
        d = draw(recipe, *size)
        if choice is not None:
            d = sampling.centred(d, size, recipe.crop, choice[1], choice[2])
        regions = self._regions(index)
        if recipe.cat_max_ratio < 1 and choice is None:  # a centred crop stays centred
            d, mask_crop = sampling.limit_dominance(
                d, recipe.crop,
                lambda candidate: crop(regions[1], IGNORE_INDEX, size, candidate, recipe.crop,
                                       InterpolationMode.NEAREST, False)[0],
                recipe.cat_max_ratio, recipe.cat_max_tries)
            image_crop = crop(regions[0], 0, size, d, recipe.crop, InterpolationMode.BILINEAR,
                              True)
        else:
            image_crop, mask_crop = crop_pair(*regions, size, d, recipe.crop)
        return (image_crop, mask_crop) if d.jitter is None else (image_crop, mask_crop, d.jitter)


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


def worker_count(choice: int | str, device: torch.device, processes: int) -> int:
    """`train.workers`: a number as given; `auto` → 0 on a CPU device (the model already uses
    every core, and loading in the main process costs no copies between processes), else the
    cores this process may use divided among the local training processes, one left to each
    process itself, at most 16."""
    if choice != "auto":
        return int(choice)
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(16, (cores or 1) // max(1, processes) - 1))
