"""The inference steps of the check: each precision's argmax agreement with strict fp32 (the
Predictor evaluate and export use), slide mode against whole images, and the fallback when
CUDA runs out of memory."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fcn.benchmark.run import MIN_AGREEMENT
from fcn.checkpoint import load_model
from fcn.params import InferenceParams
from fcn.device import memory_cap, peak_memory, reset_peak, synchronize
from fcn.gpucheck.data import images
from fcn.gpucheck.runner import Check, Outcome
from fcn.predict.predictor import Predictor, window_boxes

BF16_MIN_AGREEMENT = 0.995
"""bf16's gate, on images the model was trained on. bf16 keeps 8 bits of mantissa and changes
more argmax pixels than fp16: `benchmarks/precision_agreement.py --checkpoint models/best.pt`
on the default run's checkpoint measured bf16 99.80% (8 scenes of 128x256) and 99.72% (2 of
256x512) against fp32, fp16 99.97% and 99.96%, on scenes the model never saw. The 99.9% bar
of the fast path would fail bf16 for a reason that is not a bug; 99.5% is below every figure
measured, on images with larger margins than those (the model's own training images)."""


class Captured(logging.Handler):
    """The messages of one logger while the block runs (e.g. the predictor's OOM warnings)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @contextlib.contextmanager
    def on(self, name: str) -> Iterator[Captured]:
        logger = logging.getLogger(name)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels whose class is the same in both prediction arrays."""
    return float((a == b).mean())


def predictor(check: Check, precision: str = InferenceParams.precision,
              channels_last: bool = InferenceParams.channels_last, mode: str = "whole",
              window: Sequence[int] = (512, 1024), stride: Sequence[int] = (341, 683)
              ) -> Predictor:
    """The check's trained checkpoint in a Predictor on the step's device, as evaluate and
    export build it (their defaults: fp16, channels-last)."""
    return Predictor(load_model(check.artifacts["checkpoint"]), check.device, precision,
                     channels_last, mode=mode, window=window, stride=stride)


def predict_all(predictor_: Predictor, batch: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    """(trainIds of every image, median ms per image): one image per call after a warm-up."""
    predictor_(batch[0][None])
    times, out = [], []
    for image in batch:
        synchronize(predictor_.device)
        start = time.perf_counter()
        out.append(predictor_(image[None])[0])
        synchronize(predictor_.device)
        times.append(time.perf_counter() - start)
    return np.stack(out), 1e3 * statistics.median(times)


def step_reference(check: Check) -> Outcome:
    """Strict fp32 (TF32 off: `precision: fp32`) NCHW on the val and the train images of the
    trained checkpoint: the reference of the precision steps; channels-last fp32 must agree
    with it on >= 99.9% of pixels."""
    figures: dict[str, Any] = {}
    passed = True
    for split in ("val", "train"):
        batch = images(check, "overfit" if split == "train" else "small", split)
        reference, ms = predict_all(predictor(check, precision="fp32", channels_last=False),
                                    batch)
        channels_last, ms_cl = predict_all(predictor(check, precision="fp32",
                                                     channels_last=True), batch)
        check.artifacts[f"reference-{split}"] = reference
        share = agreement(channels_last, reference)
        passed &= share >= MIN_AGREEMENT
        figures[split] = {"images": len(batch), "pixels": int(reference.size),
                          "image_size": list(batch[0].shape[:2]), "ms_per_image_nchw": ms,
                          "ms_per_image_channels_last": ms_cl, "agreement_channels_last": share}
    return Outcome(passed, figures, "channels-last fp32 agrees on "
                   f"{figures['val']['agreement_channels_last']:.4%} (val), "
                   f"{figures['train']['agreement_channels_last']:.4%} (train)",
                   "" if passed else f"channels-last fp32 agreement below {MIN_AGREEMENT:.1%}")


def step_precision(check: Check, precision: str) -> Outcome:
    """evaluate/export at `precision` (channels-last: their default) against the strict fp32
    reference on the val images and on the images the model was trained on. The gate: 99.9%
    on val for tf32 and fp16; bf16's own gate (BF16_MIN_AGREEMENT) on the trained images."""
    figures: dict[str, Any] = {"precision": precision, "channels_last": True}
    for split in ("val", "train"):
        batch = images(check, "overfit" if split == "train" else "small", split)
        predicted, ms = predict_all(predictor(check, precision=precision, channels_last=True),
                                    batch)
        reference = check.artifacts[f"reference-{split}"]
        figures[split] = {"images": len(batch), "pixels": int(predicted.size),
                          "agreement": agreement(predicted, reference),
                          "differing_pixels": int((predicted != reference).sum()),
                          "ms_per_image": ms}
    split, gate = ("train", BF16_MIN_AGREEMENT) if precision == "bf16" else ("val", MIN_AGREEMENT)
    share = figures[split]["agreement"]
    figures.update(gate=gate, gate_split=split)
    passed = share >= gate
    return Outcome(passed, figures, f"agreement with fp32 {figures['val']['agreement']:.4%} "
                   f"(val), {figures['train']['agreement']:.4%} (trained-on images)",
                   "" if passed else f"{split} agreement {share:.4%} < {gate:.2%}")


def step_slide(check: Check) -> Outcome:
    """Slide mode (evaluate's defaults otherwise) against whole images on the full-size val
    images: full-size predictions from every window; on a GPU, less peak memory."""
    batch = images(check, "large")
    window, stride = check.sizes.slide_window, check.sizes.slide_stride
    runs: dict[str, dict[str, Any]] = {}
    predictions = {}
    for mode in ("whole", "slide"):
        p = predictor(check, mode=mode, window=list(window), stride=list(stride))
        p(batch[0][None])  # warm-up (cuDNN autotuning) before the peak is measured
        reset_peak(check.device)
        predictions[mode], ms = predict_all(p, batch)
        peaks = peak_memory(check.device)
        runs[mode] = {"ms_per_image": ms,
                      "peak_allocated_mb": None if peaks is None else peaks["allocated"] / 2**20}
        del p
    height, width = batch[0].shape[:2]
    windows = len(window_boxes(height, width, window, stride))
    full_size = predictions["slide"].shape == (len(batch), height, width)
    less_memory = (not check.real_gpu
                   or runs["slide"]["peak_allocated_mb"] < runs["whole"]["peak_allocated_mb"])
    figures = {"image_size": [height, width], "images": len(batch), "window": list(window),
               "stride": list(stride), "windows_per_image": windows, "whole": runs["whole"],
               "slide": runs["slide"], "memory_judged": check.real_gpu,
               "agreement_slide_vs_whole": agreement(predictions["slide"], predictions["whole"])}
    head = (f"{windows} windows/image, agreement with whole "
            f"{figures['agreement_slide_vs_whole']:.2%}")
    if check.real_gpu:
        head += (f", peak {runs['slide']['peak_allocated_mb']:.0f} vs "
                 f"{runs['whole']['peak_allocated_mb']:.0f} MB")
    passed = full_size and less_memory
    return Outcome(passed, figures, head, "" if passed else (
        "slide predictions are not full size" if not full_size
        else "slide mode did not use less memory than whole images"))


class OutOfMemoryAbove(nn.Module):
    """Raises CUDA's out-of-memory error for inputs above `pixels` (batch x height x width):
    the dry mode's stand-in for a real out-of-memory error."""

    def __init__(self, inner: nn.Module, pixels: int) -> None:
        super().__init__()
        self.inner, self.pixels = inner, pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[2] * x.shape[3] > self.pixels:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the dry mode)")
        return self.inner(x)


def step_oom(check: Check) -> Outcome:
    """Whole-image inference of a batch that does not fit: retried per image, then in slide
    mode. On a GPU: a real out-of-memory error, the allocator capped (`fcn.device.memory_cap`)
    halfway between slide mode's and whole-image inference's peak. Dry: the same cap under
    the CUDA fakes (its arguments checked as torch checks them) and the error injected."""
    device = check.device
    batch = np.stack(images(check, "large")[:2])
    window, stride = list(check.sizes.slide_window), list(check.sizes.slide_stride)
    figures: dict[str, Any] = {"images": len(batch), "image_size": list(batch.shape[1:3])}
    captured = Captured()
    expected = predictor(check, mode="slide", window=window, stride=stride)(batch)
    peaks = {}
    for mode in ("slide", "whole"):
        p = predictor(check, mode=mode, window=window, stride=stride)
        p(batch[:1])  # warm-up, then the peak of one image
        reset_peak(device)
        p(batch[:1])
        measured = peak_memory(device)
        peaks[mode] = None if measured is None else measured["reserved"]
        del p
    if check.real_gpu:
        figures["method"] = "real: the caching allocator capped (set_per_process_memory_fraction)"
        figures["peak_reserved_mb"] = {k: v / 2**20 for k, v in peaks.items()}
        if not peaks["slide"] < peaks["whole"]:
            return Outcome(False, figures, "no memory gap", "slide mode reserves no less memory "
                           "than whole-image inference: no limit separates them")
        limit = (peaks["slide"] + peaks["whole"]) / 2
        capped = predictor(check, mode="whole", window=window, stride=stride)
    else:
        figures["method"] = ("injected: a model raising torch.OutOfMemoryError above one "
                             "window" + (", under the CUDA fakes' capped allocator"
                                         if check.fakes is not None else ""))
        limit = 2**30
        inner = predictor(check).model
        capped = Predictor(OutOfMemoryAbove(inner, window[0] * window[1]), device,
                           window=window, stride=stride)
    figures["limit_mb"] = limit / 2**20
    cap = memory_cap(device, limit) if device.type == "cuda" else contextlib.nullcontext(1.0)
    with cap as fraction, captured.on("fcn.predict.predictor"):
        got = capped(batch)
    figures["fraction"] = fraction
    warnings = [m for m in captured.messages if "out of memory" in m]
    share = agreement(got, expected)
    steps_ok = (len(warnings) == 2 and "one image at a time" in warnings[0]
                and "slide mode" in warnings[1])
    needed = MIN_AGREEMENT if check.real_gpu else 1.0
    passed = steps_ok and share >= needed
    figures.update(warnings=warnings, agreement_with_slide_mode=share, needed=needed)
    return Outcome(passed, figures, f"per image, then slide mode; agreement with slide "
                   f"{share:.4%}", "" if passed else (
                       f"expected two fallback warnings (per image, then slide), got {warnings}"
                       if not steps_ok else f"agreement {share:.4%} < {needed:.2%}"))
