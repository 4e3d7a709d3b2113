"""Whole-image prediction at full resolution: checkpoint loading, batching, AMP, flip TTA.

Predictions stream: `predict_stream` decodes images ahead in threads, runs batches of same-size
images, and yields one prediction at a time, so memory holds a few images whatever the split size.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from fcn.distributed import resolve_device
from fcn.errors import DataError
from fcn.labels import NUM_CLASSES
from fcn.model import FCN8s
from fcn.params import ModelParams
from fcn.prefetch import read_ahead

log = logging.getLogger(__name__)

T = TypeVar("T")
P = TypeVar("P")

CHECKPOINT_KEYS = ("model", "model_params", "num_classes")
SHAPE_PARAMS = ("backbone", "fc67", "fc_channels")
"""The model parameters that decide the architecture (`weights` only says how training began)."""


def load_checkpoint_model(path: str | Path, params: ModelParams) -> FCN8s:
    """The FCN8s stored in a training checkpoint, checked against params.yaml's model section.

    Loads with weights_only=True (no pickled code runs). A checkpoint made for another backbone,
    head or class count is an error naming the file and both values.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found (train first: `dvc repro train`, or pass "
                        "--checkpoint)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is an input error
        raise DataError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in CHECKPOINT_KEYS):
        have = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise DataError(f"{path}: not a training checkpoint: expected keys "
                        f"{list(CHECKPOINT_KEYS)}, found {have}")
    stored = checkpoint["model_params"]
    wanted = dataclasses.asdict(params)
    if not isinstance(stored, dict):
        raise DataError(f"{path}: 'model_params' is not a mapping")
    for key in SHAPE_PARAMS:
        if key == "fc_channels" and not wanted["fc67"]:
            continue  # no fc6/fc7 layers: their width does not matter
        if stored.get(key) != wanted[key]:
            raise DataError(f"{path}: checkpoint is for model.{key}={stored.get(key)!r} but "
                            f"params.yaml says model.{key}={wanted[key]!r}")
    if checkpoint["num_classes"] != NUM_CLASSES:
        raise DataError(f"{path}: checkpoint predicts {checkpoint['num_classes']} classes, "
                        f"Cityscapes evaluation needs {NUM_CLASSES}")
    model = FCN8s(params.backbone, NUM_CLASSES, params.fc67, params.fc_channels)
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: weights do not fit FCN8s/{params.backbone}: {exc}") from None
    log.info("loaded %s (epoch %s)", path, checkpoint.get("epoch", "?"))
    return model


class Predictor:
    """Images → trainId maps. Mixed precision applies on CUDA only (CPU runs fp32)."""

    def __init__(self, model: FCN8s, device: torch.device | str = "cpu", precision: str = "fp32",
                 channels_last: bool = False, flip_tta: bool = False) -> None:
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        self.flip_tta = flip_tta
        dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if precision not in dtypes:
            raise ValueError(f"precision must be one of {list(dtypes)}, got {precision!r}")
        self.autocast_dtype = dtypes[precision] if self.device.type == "cuda" else None
        if dtypes[precision] is not None and self.autocast_dtype is None:
            log.info("precision %s applies on CUDA only; running fp32 on %s", precision,
                     self.device)

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


def build_predictor(checkpoint: str | Path, model_params: ModelParams, section: Any) -> Predictor:
    """A Predictor from a checkpoint and a stage's section (device, precision, channels_last,
    flip_tta: EvaluateParams or ExportParams)."""
    device = resolve_device(section.device)
    model = load_checkpoint_model(checkpoint, model_params)
    log.info("predicting on %s, precision %s, channels_last %s, flip TTA %s", device,
             section.precision, section.channels_last, section.flip_tta)
    return Predictor(model, device, section.precision, section.channels_last, section.flip_tta)


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3); unreadable files are a DataError naming them."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None


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
