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


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, copied asynchronously (pinned first) for CUDA."""
    if device.type == "cpu":
        return tensor
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def jitter(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """`images` float[B, 3, H, W] in [0, 1] jittered per sample; `params` float[B, 8] as
    `augment.draw` makes them (order, then factors), on the host (as the loader yields them).
    Samples that share a step at the same position of their order are processed together.

    The groups are formed on the host from `params`, and everything the device needs (the
    factors, and the rows of every group in one index tensor) goes there in two asynchronous
    copies per batch: nothing here waits for the device.
    """
    if params.device.type != "cpu":
        raise ValueError("photometric parameters must be on the host (the loader's batch): "
                         "their grouping is decided there")
    order = params[:, :4].long().tolist()
    groups: list[tuple[int, slice | None]] = []  # (operation, rows in `index`; None: all)
    rows_all: list[int] = []
    for position in range(4):
        for op_id in range(len(OPERATIONS)):
            rows = [i for i, o in enumerate(order) if o[position] == op_id]
            if not rows:
                continue
            if len(rows) == len(order):
                groups.append((op_id, None))
                continue
            groups.append((op_id, slice(len(rows_all), len(rows_all) + len(rows))))
            rows_all += rows
    device = images.device
    factors = _to(params, device)[:, 4:].to(images.dtype)
    index = _to(torch.tensor(rows_all, dtype=torch.int64), device) if rows_all else None
    out = images.clone()
    for op_id, span in groups:
        operation = OPERATIONS[op_id]
        if span is None:
            out = operation(out, factors[:, op_id])
            continue
        rows = index[span]
        out[rows] = operation(out[rows], factors[rows, op_id])
    return out
