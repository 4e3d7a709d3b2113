"""Whole-image prediction at full resolution: batching, mixed precision, flip TTA.

Predictions stream: `predict_stream` decodes images ahead in threads, runs batches of same-size
images, and yields one prediction at a time, so memory holds a few images whatever the split size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from fcn.checkpoint import load_model
from fcn.device import autocast_dtype, resolve_device
from fcn.model import FCN8s
from fcn.params import InferenceParams, ModelParams
from fcn.threads import read_ahead

log = logging.getLogger(__name__)

T = TypeVar("T")
P = TypeVar("P")


class Predictor:
    """Images → trainId maps. Mixed precision applies on CUDA only (CPU runs fp32)."""

    def __init__(self, model: FCN8s, device: torch.device | str = "cpu", precision: str = "fp32",
                 channels_last: bool = False, flip_tta: bool = False) -> None:
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        self.flip_tta = flip_tta
        self.autocast_dtype = autocast_dtype(self.device, precision)
        if precision != "fp32" and self.autocast_dtype is None:
            log.info("precision %s applies on CUDA only; running fp32 on %s", precision,
                     self.device)

    @classmethod
    def from_params(cls, checkpoint: str | Path, model: ModelParams,
                    inference: InferenceParams) -> Predictor:
        """The model of a checkpoint (checked against params.yaml's `model`), predicting as
        `inference` says (evaluate's or export's section)."""
        device = resolve_device(inference.device)
        net = load_model(checkpoint, model)
        log.info("predicting on %s, precision %s, channels_last %s, flip TTA %s", device,
                 inference.precision, inference.channels_last, inference.flip_tta)
        return cls(net, device, inference.precision, inference.channels_last,
                   inference.flip_tta)

    @torch.inference_mode()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores (N, 19, H, W) for uint8 images (N, H, W, 3) already on the device:
        logits, or with flip TTA the mean of both views' softmax probabilities."""
        x = images.permute(0, 3, 1, 2).float().div_(255)
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            logits = self.model(x)
            if not self.flip_tta:
                return logits.float()
            flipped = self.model(x.flip(-1)).flip(-1)
        return (logits.float().softmax(1) + flipped.float().softmax(1)) / 2

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) → uint8 (N, H, W) trainIds, full resolution."""
        batch = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        prediction = self.scores(batch).argmax(1).to(torch.uint8)
        return prediction.cpu().numpy()


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


def predict_stream(predictor: Predictor, items: Sequence[T],
                   load: Callable[[T], tuple[np.ndarray, P]], batch_size: int = 1,
                   workers: int = 2) -> Iterator[tuple[T, np.ndarray, P, np.ndarray]]:
    """Yield (item, image, payload, trainIds) per item, in order.

    `load(item)` returns the uint8 RGB image and anything else the caller needs alongside (its
    ground truth, say); it runs in `workers` threads ahead of the model.
    """
    stream = read_ahead(load, items, workers=workers, depth=max(2 * workers, batch_size + workers))
    for batch in _batches(stream, batch_size):
        predictions = predictor(np.stack([image for _, image, _ in batch]))
        for (item, image, payload), prediction in zip(batch, predictions):
            yield item, image, payload, prediction
