"""The model and images every configuration sees: synthetic street scenes at the benchmark's
size, and a trained-like (or a checkpoint's) FCN8s, plus the argmax reference they are
compared with.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fcn.backends import math_mode
from fcn.cityscapes.labels import NUM_CLASSES
from fcn.device import autocast, to_model_input
from fcn.model import FCN, score_layers
from fcn.params import BenchmarkParams, ModelParams
from fcn.synthetic import make_scene, render_image

CALIBRATION_PIXELS = 256 * 512
"""Batch-norm statistics of the trained-like model come from the image scaled to about this."""


def benchmark_images(count: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 (count, H, W, 3) synthetic street scenes: real-looking structure, so predictions
    form regions with boundaries instead of noise. Image i is the same whatever `count`."""
    images = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        images.append(render_image(make_scene(width, height, rng, index), rng))
    return np.stack(images)


def to_input(images: np.ndarray, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [0, 1] on `device`, as the model takes it
    (copied there as uint8, converted there by `fcn.device.to_model_input`)."""
    return to_model_input(torch.from_numpy(np.array(images, copy=True)).to(device),
                          channels_last)


@torch.no_grad()
def trained_like_model(params: ModelParams, image: np.ndarray, seed: int,
                       num_classes: int = NUM_CLASSES) -> FCN:
    """A seeded FCN (the arch `params` names) whose predictions vary like a trained one's, for the
    agreement check.

    A fresh FCN predicts one class everywhere (score layers start at zero). Here the backbone
    keeps its random initialisation, the score layers are random, and batch-norm statistics are
    measured on `image` (downscaled), so every layer sees unit-scale activations as in a trained
    network. Its logit margins are smaller than a trained model's, so its agreement figures are
    a pessimistic bound: benchmark.weights can point at a real checkpoint instead.
    """
    torch.manual_seed(seed)
    model = FCN.from_params(params, num_classes)
    gen = torch.Generator().manual_seed(seed)
    for layer in score_layers(model):
        layer.weight.normal_(0, layer.in_channels ** -0.5, generator=gen)
        layer.bias.normal_(0, 0.1, generator=gen)
    x = to_input(image[None], torch.device("cpu"), False)
    scale = min(1.0, (CALIBRATION_PIXELS / (x.shape[-2] * x.shape[-1])) ** 0.5)
    if scale < 1:
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: exactly this batch's statistics
    model.train()
    model(x)
    model.eval()
    for norm in norms:
        norm.momentum = 0.1
    return model


def load_weights(params: BenchmarkParams, model_params: ModelParams, image: np.ndarray) -> FCN:
    """The model every configuration times: trained-like, or a training checkpoint."""
    if params.weights == "trained_like":
        return trained_like_model(model_params, image, params.seed)
    from fcn.checkpoint import load_model  # only this option needs checkpoints

    return load_model(params.weights, model_params)


@torch.inference_mode()
def predict_classes(model: FCN, images: np.ndarray, device: torch.device, precision: str,
                    channels_last: bool) -> torch.Tensor:
    """Argmax class maps (N, H, W) of `model` on uint8 images at one precision and layout, in
    this process (the agreement check outside the timed workers). On a CPU without native
    bf16/fp16 this runs PyTorch's reference kernels: slow, numerically the same rounding."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(device, memory_format=memory_format)
    with math_mode(device, precision), autocast(device, precision, cuda_only=False):
        return model(to_input(images, device, channels_last)).argmax(1)
