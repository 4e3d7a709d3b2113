"""Prediction at full resolution: whole images or sliding windows, mixed precision, multi-scale
and flip test-time augmentation, and a fallback when CUDA runs out of memory.

- `whole`: one forward pass per batch of whole images (FCN8s takes any size).
- `slide`: windows of `window` pixels every `stride` pixels; windows at the border are shifted
  inside the image (not padded), the logits of overlapping windows are summed and divided by
  the per-pixel count, as mmsegmentation's slide mode does.
- `scales` / `flip_tta`: the image is resized by each scale (bilinear) and optionally flipped;
  each view's logits are resized back to full resolution and their softmax probabilities
  averaged. One scale (1.0) without flip returns the logits themselves.
- Out of CUDA memory in whole mode: the batch is retried one image at a time, and an image that
  still does not fit is predicted in slide mode; each step is logged once and then kept.

Predictions stream: `predict_stream` decodes images ahead in threads, runs batches of same-size
images, and yields one prediction at a time, so memory holds a few images whatever the split size.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fcn.backends import flags, inference_mode
from fcn.checkpoint import load_model
from fcn.device import autocast, autocast_dtype, empty_cache, resolve_device, to_model_input
from fcn.errors import FcnError
from fcn.params import InferenceParams, ModelParams
from fcn.threads import read_ahead

log = logging.getLogger(__name__)

T = TypeVar("T")
P = TypeVar("P")


def window_boxes(height: int, width: int, window: Sequence[int], stride: Sequence[int]
                 ) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every sliding window, row by row: mmseg's grid, with the last
    window of a row or column shifted back inside the image; a window larger than the image
    is the whole image."""
    wh, ww = min(window[0], height), min(window[1], width)
    sh, sw = stride
    rows = max(height - wh + sh - 1, 0) // sh + 1
    cols = max(width - ww + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        y2 = min(r * sh + wh, height)
        for c in range(cols):
            x2 = min(c * sw + ww, width)
            boxes.append((y2 - wh, y2, x2 - ww, x2))
    return boxes


def slide_logits(model: nn.Module, x: torch.Tensor, window: Sequence[int],
                 stride: Sequence[int]) -> torch.Tensor:
    """float32 (N, C, H, W): the model's logits over sliding windows of `x` (N, 3, H, W),
    summed where windows overlap and divided by the per-pixel count."""
    height, width = x.shape[-2:]
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=x.device)
    for y1, y2, x1, x2 in window_boxes(height, width, window, stride):
        logits = model(x[..., y1:y2, x1:x2]).float()
        if total is None:
            total = torch.zeros(x.shape[0], logits.shape[1], height, width, device=x.device)
        total[..., y1:y2, x1:x2] += logits
        count[..., y1:y2, x1:x2] += 1
    assert total is not None
    return total / count


def apply_temperature(scores: torch.Tensor, temperature: float, are_probabilities: bool,
                      dim: int = -3) -> torch.Tensor:
    """Probabilities calibrated by `temperature` (> 0), over the class axis `dim` ((C, H, W)
    or (N, C, H, W) by default).

    Logits: softmax(scores / T). Probabilities (multi-view TTA averages probabilities, not
    logits): softmax(ln(p) / T), i.e. p^(1/T) renormalised, with p clamped at the dtype's
    smallest normal number so ln never sees 0. Both are monotone in each score, so the
    argmax is unchanged for any T > 0. Allocates two tensors of the input's size.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"apply_temperature: temperature must be positive and finite, "
                         f"got {temperature}")
    if are_probabilities:
        logits = scores.clamp_min(torch.finfo(scores.dtype).tiny).log_()
        return torch.softmax(logits.div_(temperature), dim=dim)
    return torch.softmax(scores / temperature, dim=dim)


class Predictor:
    """Images → trainId maps. Mixed precision applies on CUDA only (CPU runs fp32)."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu",
                 precision: str = "fp32", channels_last: bool = False, flip_tta: bool = False,
                 mode: str = "whole", window: Sequence[int] = (512, 1024),
                 stride: Sequence[int] = (341, 683), scales: Sequence[float] = (1.0,),
                 temperature: float = 1.0) -> None:
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        self.flip_tta = flip_tta
        self.mode, self.window, self.stride = mode, tuple(window), tuple(stride)
        self.scales = tuple(float(s) for s in scales)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.precision = precision
        self.autocast_dtype = autocast_dtype(self.device, precision)
        self._fallback: str | None = None  # after an OOM: "per_image", then "slide"
        if precision != "fp32" and self.device.type != "cuda":
            log.info("precision %s applies on CUDA only; running fp32 on %s", precision,
                     self.device)

    @classmethod
    def from_params(cls, checkpoint: str | Path, model: ModelParams | None,
                    inference: InferenceParams, temperature: float = 1.0) -> Predictor:
        """The model of a checkpoint (checked against params.yaml's `model`; None: as the
        checkpoint describes itself), predicting as `inference` says (probabilities at
        `temperature`)."""
        device = resolve_device(inference.device)
        net = load_model(checkpoint, model)
        log.info("predicting on %s: %s mode%s, precision %s, channels_last %s, scales %s, "
                 "flip TTA %s", device, inference.mode,
                 f" (window {inference.window}, stride {inference.stride})"
                 if inference.mode == "slide" else "", inference.precision,
                 inference.channels_last, inference.scales, inference.flip_tta)
        return cls(net, device, inference.precision, inference.channels_last,
                   inference.flip_tta, inference.mode, inference.window, inference.stride,
                   inference.scales, temperature)

    def flags(self) -> dict[str, object]:
        """What this predictor computes with (`fcn.backends.flags` inside its mode)."""
        with inference_mode(self.device, self.precision):
            return flags(self.device, self.precision)

    def _logits(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        with autocast(self.device, self.precision):
            if mode == "slide":
                return slide_logits(self.model, x, self.window, self.stride)
            return self.model(x).float()

    def _scores(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if self.scales == (1.0,) and not self.flip_tta:
            return self._logits(x, mode)
        height, width = x.shape[-2:]
        total: torch.Tensor | None = None
        views = 0
        for scale in self.scales:
            xs = x
            if scale != 1.0:
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                xs = xs.contiguous(memory_format=self.memory_format)
            for flip in (False, True) if self.flip_tta else (False,):
                logits = self._logits(xs.flip(-1) if flip else xs, mode)
                if flip:
                    logits = logits.flip(-1)
                if scale != 1.0:
                    logits = F.interpolate(logits, size=(height, width), mode="bilinear",
                                           align_corners=False)
                probabilities = logits.softmax(1)
                total = probabilities if total is None else total + probabilities
                views += 1
        assert total is not None
        return total / views

    @torch.inference_mode()
    def scores(self, images: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Class scores (N, 19, H, W) for uint8 images (N, H, W, 3) already on the device:
        logits, or with several views the mean of their softmax probabilities. Computed in
        `fcn.backends.inference_mode` (strict fp32 unless the precision is tf32; cuDNN
        autotuning on CUDA), the switches restored afterwards."""
        x = to_model_input(images, self.memory_format == torch.channels_last)
        with inference_mode(self.device, self.precision):
            return self._scores(x, mode or self.mode)

    @property
    def averages_probabilities(self) -> bool:
        """Whether `scores` are mean softmax probabilities (several views) rather than logits."""
        return not (self.scales == (1.0,) and not self.flip_tta)

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-pixel class probabilities of `scores` (as `predict` returns them), with this
        predictor's temperature (1: the model's own): softmax(logits / T), or for averaged
        views softmax(log p / T). The argmax is the prediction's whatever the temperature."""
        return apply_temperature(scores, self.temperature, self.averages_probabilities)

    def _labels(self, batch: torch.Tensor, mode: str, keep_scores: bool
                ) -> tuple[np.ndarray, torch.Tensor | None]:
        scores = self.scores(batch, mode)
        if not bool(torch.isfinite(scores).all()):  # argmax would say "class 0" everywhere
            raise FcnError(f"the model's outputs hold NaN or infinite values (precision "
                           f"{self.precision}: fp16 can overflow, try bf16 or fp32; or the "
                           "weights are damaged)")
        labels = scores.argmax(1).to(torch.uint8).cpu().numpy()
        return labels, (scores.float().cpu() if keep_scores else None)

    def _free(self) -> None:
        gc.collect()
        empty_cache(self.device)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) → uint8 (N, H, W) trainIds, full resolution."""
        return self.predict(images)[0]

    @torch.inference_mode()
    def predict(self, images: np.ndarray, keep_scores: bool = False
                ) -> tuple[np.ndarray, torch.Tensor | None]:
        """uint8 (N, H, W, 3) → (uint8 (N, H, W) trainIds, and with `keep_scores` the float32
        (N, 19, H, W) scores on the CPU: logits, or mean probabilities of several views;
        `probabilities` turns them into calibrated probabilities)."""
        batch = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        if self.mode == "slide" or self._fallback is None:
            try:
                return self._labels(batch, self.mode, keep_scores)
            except torch.OutOfMemoryError as exc:
                if self.mode == "slide":
                    raise
                reason = str(exc).splitlines()[0]
            self._free()
            self._fallback = "per_image"
            log.warning("whole-image inference of a batch of %d %dx%d images ran out of memory "
                        "(%s): predicting one image at a time from now on", len(images),
                        images.shape[2], images.shape[1], reason)
        out: list[tuple[np.ndarray, torch.Tensor | None]] = []
        for i in range(len(batch)):
            one = batch[i:i + 1]
            if self._fallback == "per_image":
                try:
                    out.append(self._labels(one, "whole", keep_scores))
                    continue
                except torch.OutOfMemoryError as exc:
                    reason = str(exc).splitlines()[0]
                self._free()
                self._fallback = "slide"
                log.warning("one %dx%d image ran out of memory in whole-image inference (%s): "
                            "switching to slide mode (window %s, stride %s) from now on",
                            images.shape[2], images.shape[1], reason, self.window, self.stride)
            out.append(self._labels(one, "slide", keep_scores))
        labels = np.concatenate([one for one, _ in out])
        return labels, (torch.cat([s for _, s in out]) if keep_scores else None)  # type: ignore[misc]


def _batches(stream: Iterable[tuple[T, tuple[np.ndarray, P]]], batch_size: int
             ) -> Iterator[list[tuple[T, np.ndarray, P]]]:
    """Consecutive items of the same image size, at most `batch_size` per batch."""
    batch: list[tuple[T, np.ndarray, P]] = []
    for item, (image, payload) in stream:
        if batch and (len(batch) == batch_size or batch[0][1].shape != image.shape):
            yield batch
            batch = []
        batch.append((item, image, payload))
    if batch:
        yield batch


def predict_stream(predictor: Predictor, items: Iterable[T],
                   load: Callable[[T], tuple[np.ndarray, P]], batch_size: int = 1,
                   workers: int = 2, keep_scores: bool = False
                   ) -> Iterator[tuple[T, np.ndarray, P, np.ndarray, torch.Tensor | None]]:
    """Yield (item, image, payload, trainIds, scores) per item, in order; scores (float32
    (19, H, W) on the CPU, `Predictor.predict`) only with `keep_scores`, else None.

    `load(item)` returns the uint8 RGB image and anything else the caller needs alongside (its
    ground truth, say); it runs in `workers` threads ahead of the model. `items` is consumed
    lazily, a bounded number ahead of what has been yielded (a generator over a video's frames
    never piles up).
    """
    stream = read_ahead(load, items, workers=workers, depth=max(2 * workers, batch_size + workers))
    for batch in _batches(stream, batch_size):
        predictions, scores = predictor.predict(np.stack([image for _, image, _ in batch]),
                                                keep_scores)
        for i, (item, image, payload) in enumerate(batch):
            yield item, image, payload, predictions[i], None if scores is None else scores[i]
