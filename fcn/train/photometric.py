"""Photometric jitter on the training device, batched, with per-sample parameters drawn by the
loader (`fcn.train.augment.draw`), so the result stays a function of each sample's seed.

It is torchvision's `ColorJitter` on float images: brightness, contrast, saturation and hue,
each sample in its own random order, with torchvision's formulas (float path of
`torchvision.transforms.v2.functional.adjust_*`, tested equal per sample). The only
difference from the old loader-side jitter is the dtype: it ran on uint8 and rounded after
each step; here the four steps run in float32 on images already scaled to [0, 1].

On a GPU this is a few element-wise passes over the batch; on the loader's CPU cores it was
a large share of each sample's cost (docs/performance.md, the training data path).
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _column(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _gray(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=-3)
    return r.mul(_GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(-3)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    ratio = _column(ratio)
    return (images * ratio).add_(other * (1.0 - ratio)).clamp_(0.0, 1.0)


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _column(factor)).clamp_(0.0, 1.0)


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _gray(images).mean(dim=(-3, -2, -1), keepdim=True), factor)


def saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _gray(images), factor)


def hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(images)
    h, s, v = hsv.unbind(dim=-3)
    h = (h + factor.view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


OPERATIONS = (brightness, contrast, saturation, hue)
"""In the order of the jitter vector's ids (torchvision's ColorJitter fn_idx)."""


def jitter(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """`images` float[B, 3, H, W] in [0, 1] jittered per sample; `params` float[B, 8] as
    `augment.draw` makes them (order, then factors). Samples that share a step at the same
    position of their order are processed together."""
    order = params[:, :4].long().tolist()  # small: the groups are formed on the host
    factors = params[:, 4:].to(images.device, images.dtype)
    out = images.clone()
    for position in range(4):
        for op_id, operation in enumerate(OPERATIONS):
            rows = [i for i, o in enumerate(order) if o[position] == op_id]
            if not rows:
                continue
            if len(rows) == len(order):
                out = operation(out, factors[:, op_id])
                continue
            index = torch.tensor(rows, device=images.device)
            out[index] = operation(out[index], factors[index, op_id])
    return out


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 in [0, 1] (on whatever device they are); floats pass through."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images
