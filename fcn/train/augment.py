"""Training augmentation, split where it runs cheapest: the random draws and the geometry on the
loader side, in uint8; the photometric jitter batched on the training device
(`fcn.train.photometric`).

Semantics are those of the torchvision v2 pipeline this replaces (`RandomScale` → `RandomCrop`
with `pad_if_needed` → `RandomHorizontalFlip` → `ColorJitter`): the same random draws, made in
the same order from the same generator (`draw`), so one seed gives the same scale factor, crop
window, flip and jitter factors as before. What changed is where the work happens:

- **Crop in source coordinates, resize only the crop.** The old pipeline resized the whole
  image (up to 2048×4096 at scale 2) and then cropped. Here the crop window is mapped back to
  the source image and only that region is resized to the crop's size (`torchvision`'s
  `resized_crop`, antialiased bilinear for the image, nearest for the mask). The region's
  bounds are rounded to whole source pixels, so a crop is at most half a resized pixel away
  from the old one and its scale within one pixel over its extent; pixels at the crop's
  border interpolate from inside the region only.
- **uint8 until the device.** Crops leave the loader as uint8 (a quarter of float's bytes to
  collate, pin and copy); the conversion to float, the jitter and the normalisation run batched
  on the device, in float (the old jitter rounded to uint8 after each of its four steps).

Each sample's draws come from its own seed (`fcn.train.data.sample_seed`: train seed, epoch,
index), so crops do not depend on workers, ranks or restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fcn.cityscapes.labels import IGNORE_INDEX


@dataclass(frozen=True)
class Recipe:
    """What the `train` parameters ask of augmentation (plain values); the rare-class
    sampling options are `fcn.train.sampling`'s (class_uniform 0 and cat_max_ratio 1: off)."""

    crop: tuple[int, int]
    scale: tuple[float, float]
    flip: bool
    jitter: float
    class_uniform: float = 0.0
    cat_max_ratio: float = 1.0
    cat_max_tries: int = 10

    @classmethod
    def of(cls, crop: Sequence[int], scale: Sequence[float], flip: bool,
           jitter: float, class_uniform: float = 0.0, cat_max_ratio: float = 1.0,
           cat_max_tries: int = 10) -> Recipe:
        return cls((int(crop[0]), int(crop[1])), (float(scale[0]), float(scale[1])), flip,
                   float(jitter), float(class_uniform), float(cat_max_ratio), int(cat_max_tries))


@dataclass(frozen=True)
class Draw:
    """One sample's random choices: the rescaled size, the crop window's top-left corner in
    rescaled coordinates (negative inside the padding), the flip, the jitter vector: float[8],
    the order of the four operations (brightness 0, contrast 1, saturation 2, hue 3), then
    their factors (b, c, s, h)."""

    size: tuple[int, int]
    top: int
    left: int
    flip: bool
    jitter: torch.Tensor | None


def window(length: int, crop: int) -> int:
    """The crop's start in the rescaled image along one axis: drawn as v2.RandomCrop with
    pad_if_needed draws it (padding `crop - length` on both sides when short)."""
    pad = max(0, crop - length)
    canvas = length + 2 * pad
    start = int(torch.randint(0, canvas - crop + 1, size=())) if canvas > crop else 0
    return start - pad


def draw(recipe: Recipe, height: int, width: int) -> Draw:
    """Every random choice for one sample, from torch's global generator (the caller seeds it),
    in the order and form of the torchvision pipeline it replaces."""
    low, high = recipe.scale
    factor = low + (high - low) * float(torch.rand(()))
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    top = window(size[0], recipe.crop[0])
    left = window(size[1], recipe.crop[1])
    flip = recipe.flip and bool(torch.rand(1) < 0.5)
    jitter = None
    if recipe.jitter > 0:
        order = torch.randperm(4)
        j = recipe.jitter
        factors = [float(torch.empty(1).uniform_(max(0.0, 1 - j), 1 + j)) for _ in range(3)]
        hue = min(0.5, j / 4)
        factors.append(float(torch.empty(1).uniform_(-hue, hue)))
        jitter = torch.cat([order.float(), torch.tensor(factors)])
    return Draw(size, top, left, flip, jitter)


Region = Callable[[int, int, int, int], torch.Tensor]
"""`region(top, left, height, width)` → uint8[C, height, width] of a source image: a slice of
a decoded tensor, or a read from a memory-mapped file of only those rows and columns."""


def _span(start: int, length: int, crop: int, resized: int, source: int) -> tuple[int, int, int, int]:
    """Along one axis: (output offset, output length, source start, source length) of the
    part of a crop window [start, start + crop) that lies inside the rescaled image."""
    first, last = max(0, start), min(resized, start + crop)
    src_first = round(first * source / resized)
    src_last = max(src_first + 1, min(source, round(last * source / resized)))
    return first - start, last - first, src_first, src_last - src_first


def crop(region: Region, fill: int, source: tuple[int, int], d: Draw, crop_hw: tuple[int, int],
         interpolation: InterpolationMode, antialias: bool) -> torch.Tensor:
    """The crop `d` selects, uint8[C, crop_h, crop_w]: the source region under the window
    resized to the window's inside part, `fill` around it, flipped if drawn."""
    oy, oh, sy, sh = _span(d.top, crop_hw[0], crop_hw[0], d.size[0], source[0])
    ox, ow, sx, sw = _span(d.left, crop_hw[1], crop_hw[1], d.size[1], source[1])
    patch = region(sy, sx, sh, sw)
    if (sh, sw) != (oh, ow):
        patch = TF.resize(patch, [oh, ow], interpolation=interpolation, antialias=antialias)
    if (oh, ow) == crop_hw:
        out = patch.contiguous()
    else:
        out = torch.full((patch.shape[0], *crop_hw), fill, dtype=torch.uint8)
        out[:, oy:oy + oh, ox:ox + ow] = patch
    return out.flip(-1) if d.flip else out


def crop_pair(image: Region, mask: Region, source: tuple[int, int], d: Draw,
              crop_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image uint8[3, h, w], mask uint8[h, w]) of one draw: the image antialiased bilinear
    and padded with 0, the mask nearest-neighbour and padded with ignore."""
    return (crop(image, 0, source, d, crop_hw, InterpolationMode.BILINEAR, True),
            crop(mask, IGNORE_INDEX, source, d, crop_hw, InterpolationMode.NEAREST, False)[0])


def reference_transform(recipe: Recipe):
    """The torchvision v2 pipeline this module replaces (rescale the whole image, then crop,
    flip, jitter in uint8, convert to float): kept as the reference that tests compare the
    new geometry and jitter with and that `benchmarks/loader_throughput.py` times as the old
    path. Call it on (tv_tensors.Image, tv_tensors.Mask) under the sample's seed; it makes the
    same draws as `draw`."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    class RandomScale(v2.Transform):
        def make_params(self, flat_inputs: list) -> dict:
            height, width = v2.query_size(flat_inputs)
            low, high = recipe.scale
            factor = low + (high - low) * float(torch.rand(()))
            return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

        def transform(self, inpt, params: dict):
            return self._call_kernel(TF.resize, inpt, params["size"], antialias=True)

    steps: list[v2.Transform] = [
        RandomScale(),
        v2.RandomCrop(list(recipe.crop), pad_if_needed=True,
                      fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
    ]
    if recipe.flip:
        steps.append(v2.RandomHorizontalFlip())
    if recipe.jitter > 0:
        j = recipe.jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 4)))
    steps.append(v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64,
                             "others": None}, scale=True))
    return v2.Compose(steps)
