"""FLOPs of one forward pass of an FCN (32s, 16s, 8s): analytic (from the layer shapes) and counted by PyTorch.

Why both: the analytic count documents where the work is (and needs no tensors at all), the
counted one (`torch.utils.flop_counter.FlopCounterMode`) is what PyTorch's own tooling reports;
tests hold them to each other. Conventions, shared by both:

- one multiply-accumulate (MAC) = 2 FLOPs; biases are not counted;
- a convolution costs Cout · Cin/groups · kh · kw MACs per *output* position;
- a transposed convolution costs Cin · Cout/groups · kh · kw MACs per *input* position (every
  input pixel scatters one kernel), including the border that its padding crops away: that is
  the work the kernels do, and how FlopCounterMode counts it;
- ImageNet normalisation, batch norm, ReLU, max-pooling and the two skip additions are *not*
  in the FLOP total (FlopCounterMode counts only matmuls and convolutions); they are reported
  separately as `other_ops`, so the omission is visible: they are < 1% of the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fcn.cityscapes.labels import NUM_CLASSES
from fcn.model import FCN, STRIDE, score_layers
from fcn.params import ModelParams


@dataclass(frozen=True)
class FlopCount:
    """MACs of one forward pass of one image, by kind of layer."""

    conv_macs: int
    transposed_macs: int
    other_ops: int  # normalisation, BN, ReLU, pooling, skip adds: not in `flops`

    @property
    def macs(self) -> int:
        return self.conv_macs + self.transposed_macs

    @property
    def flops(self) -> int:
        return 2 * self.macs


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class _Walker:
    """Follows (channels, height, width) through layers, adding up their cost."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        self.shape = (channels, height, width)
        self.conv = self.transposed = self.other = 0

    def layer(self, module: nn.Module) -> None:
        c, h, w = self.shape
        if isinstance(module, nn.Conv2d):
            (kh, kw), (sh, sw) = _pair(module.kernel_size), _pair(module.stride)
            (ph, pw), (dh, dw) = _pair(module.padding), _pair(module.dilation)
            oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            self.conv += module.out_channels * (c // module.groups) * kh * kw * oh * ow
            self.shape = (module.out_channels, oh, ow)
        elif isinstance(module, nn.MaxPool2d):
            kh, kw = _pair(module.kernel_size)
            sh, sw = _pair(module.stride or module.kernel_size)
            oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
            self.other += c * oh * ow * (kh * kw - 1)  # comparisons
            self.shape = (c, oh, ow)
        elif isinstance(module, nn.BatchNorm2d):
            self.other += 2 * c * h * w  # inference: one scale, one shift per element
        elif isinstance(module, nn.ReLU):
            self.other += c * h * w
        elif isinstance(module, nn.Sequential):
            for child in module:
                self.layer(child)
        elif not isinstance(module, (nn.Identity, nn.Dropout, nn.Dropout2d)):
            raise TypeError(f"no FLOP rule for {type(module).__name__}")


def _transposed(module: nn.ConvTranspose2d, shape: tuple[int, int, int]
                ) -> tuple[int, tuple[int, int, int]]:
    """MACs of a transposed convolution on `shape`, and its output shape."""
    c, h, w = shape
    (kh, kw), (sh, sw) = _pair(module.kernel_size), _pair(module.stride)
    (ph, pw), (oph, opw) = _pair(module.padding), _pair(module.output_padding)
    macs = c * (module.out_channels // module.groups) * kh * kw * h * w
    oh = (h - 1) * sh - 2 * ph + kh + oph
    ow = (w - 1) * sw - 2 * pw + kw + opw
    return macs, (module.out_channels, oh, ow)


def analytic_flops(model: FCN, height: int, width: int) -> FlopCount:
    """The FLOPs of `model` on one height×width image, from layer shapes alone (no tensors).

    Follows FCN.forward: normalise, pad to a multiple of 32, backbone to pool3/pool4/pool5
    (+ fc6/fc7 when present), then per arch: FCN-8s three 1×1 score layers, three transposed
    convolutions, two adds; FCN-16s two, two, one; FCN-32s one score layer and one ×32
    transposed convolution.
    """
    ph, pw = height + (-height % STRIDE), width + (-width % STRIDE)
    walker = _Walker(3, ph, pw)
    walker.other += 2 * 3 * height * width  # (x - mean) / std
    walker.layer(model.to_pool3)
    pool3 = walker.shape
    walker.layer(model.to_pool4)
    pool4 = walker.shape
    walker.layer(model.to_pool5)
    walker.layer(model.head)
    pool5 = walker.shape
    classes = model.num_classes
    # (score layer, its input) from the coarsest skip down: as many as the arch has
    skips = list(zip(score_layers(model), (pool5, pool4, pool3)))
    score = sum(layer.out_channels * c * h * w for layer, (c, h, w) in skips)  # 1×1 convs
    ups = [getattr(model, name) for name in ("up_pool5", "up_pool4")[: len(skips) - 1]]
    ups.append(model.up_final)
    transposed = adds = 0
    for up, (_, (_, h, w)) in zip(ups, skips):  # each upsamples its skip's summed scores
        macs, _ = _transposed(up, (classes, h, w))
        transposed += macs
    for _, (_, h, w) in skips[1:]:
        adds += classes * h * w
    return FlopCount(conv_macs=walker.conv + score, transposed_macs=transposed,
                     other_ops=walker.other + adds)


def counted_flops(params: ModelParams, height: int, width: int, batch_size: int = 1,
                  num_classes: int = NUM_CLASSES) -> int:
    """FLOPs of one forward pass of the model `params` describe, as FlopCounterMode counts them.

    Runs on the meta device: tensors carry shapes but no data, so counting at 1024×2048 costs
    milliseconds and no memory.
    """
    with torch.device("meta"):
        model = FCN.from_params(params, num_classes).eval()
        images = torch.empty(batch_size, 3, height, width)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    return int(counter.get_total_flops())
