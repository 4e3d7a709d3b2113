"""Static int8 quantisation of an ONNX model for onnxruntime's CPU provider: the one place the
project quantises (the deploy stage's `model_int8.onnx`, the benchmark's int8 configuration).

How, with `onnxruntime.quantization.quantize_static`:
- QDQ format: QuantizeLinear/DequantizeLinear pairs around each quantised operator, which
  onnxruntime fuses into integer kernels (QLinearConv) when a session is made; the file stays a
  standard ONNX graph that other runtimes (TensorRT) read as well.
- Weights int8, symmetric, one scale per output channel: filters of one layer differ in range
  by orders of magnitude, and one scale per tensor would crush the small ones.
- Activations uint8 (asymmetric): U8S8 is the pair x86 CPU kernels multiply natively
  (AVX512-VNNI's VPDPBUSD takes unsigned × signed bytes). onnxruntime's S8S8 path was slower
  on an AVX512-VNNI CPU with the default model (issue 24's measurement), at the same val
  agreement: after a ReLU both give the same grid. On x86 CPUs without VNNI the U8S8 kernels
  can saturate their 16-bit sums: the deploy stage's check, run on the deploying machine, is
  what tells.
- Calibration: the range of every activation over images the caller chooses (the deploy stage:
  a split the model was neither trained nor scored on). They are fed one at a time and each
  image's statistics merged before the next is read (`CalibStridedMinMax` = 1), so memory
  holds one image's activations plus what the method keeps: per-tensor min and max for
  `minmax`, a histogram per tensor for `entropy` (the KL-divergence threshold search over
  onnxruntime's histogram: 128 bins to start, widened as later images exceed its range;
  `quantize_static` does not expose the bin count) and `percentile` (the 99.999th percentile
  of |x|, 2048 bins).
- The head's outputs stay fp32 (`FP32_OUTPUTS`: the upsamplings, the skip adds, the final
  crop): quantised, all 19 class logits of a pixel share 256 levels, so near-ties collapse to
  the lower class index, a systematic bias. On the default model keeping them fp32 raised val
  agreement from 0.990645 to 0.992649 and cut the mIoU drop from 0.00114 to 0.00017, for 5% of
  int8's latency at 1024x2048 (944 -> 989 ms; issue 24's note). Every convolution still runs in
  int8.
- No `quant_pre_process`: the exporter has already folded batch norm into the convolutions (the
  pre-processed graph has the same operators), and its symbolic shape inference fails on the
  dynamic-size graph.

The output is a function of the input model, the images and the method: the same bytes every
time on one machine (tested).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)

from fcn.atomic import atomic_path
from fcn.params import INT8_METHODS

log = logging.getLogger(__name__)

FP32_OUTPUTS = ["ConvTranspose", "Add", "Slice"]
"""Operator types whose outputs are not re-quantised: the FCN head after its score layers."""

_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}
assert tuple(_METHODS) == INT8_METHODS  # one list of names (fcn.params)


class _OneAtATime(CalibrationDataReader):
    """The calibration images as onnxruntime's calibrator reads them: `set_range` opens a
    stride of images (one, here), `get_next` hands them out, reading each only then."""

    def __init__(self, images: Sequence[np.ndarray], input_name: str) -> None:
        self.images = images
        self.input_name = input_name
        self.next = self.end = 0

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.next, self.end = start_index, min(end_index, len(self.images))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.next >= self.end:
            return None
        image = self.images[self.next]
        if not (isinstance(image, np.ndarray) and image.dtype == np.float32
                and image.ndim == 4 and image.shape[:2] == (1, 3)):
            raise ValueError(f"calibration image {self.next}: expected float32 (1, 3, H, W), got "
                             f"{getattr(image, 'dtype', type(image).__name__)} "
                             f"{getattr(image, 'shape', '')}")
        self.next += 1
        return {self.input_name: image}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantisation tools print progress and log advice on the root logger
    ("consider pre-processing"): both go to this module's debug log instead."""

    def demote(record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname:
            log.debug("onnxruntime: %s", record.getMessage())
            return False
        return True

    root = logging.getLogger()
    printed = io.StringIO()
    root.addFilter(demote)
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        root.removeFilter(demote)
        if printed.getvalue().strip():
            log.debug("onnxruntime printed: %s", " | ".join(printed.getvalue().split("\n")))


def quantize_int8(fp32_onnx: str | Path, out: str | Path, calibration: Sequence[np.ndarray],
                  method: str = "minmax") -> None:
    """Write `out`: `fp32_onnx` with int8 weights (per channel) and uint8 activations, QDQ,
    activation ranges calibrated by `method` (one of INT8_METHODS) on `calibration`: float32
    (1, 3, H, W) inputs of the model, any sizes, indexed one at a time in order (pass a lazy
    sequence to keep one image in memory). Atomic: a failure leaves `out` as it was."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {INT8_METHODS}, got {method!r}")
    if len(calibration) == 0:
        raise ValueError("quantize_int8 needs at least one calibration image")
    inputs = onnx.load(str(fp32_onnx), load_external_data=False).graph.input
    if len(inputs) != 1:
        raise ValueError(f"{fp32_onnx}: expected a model with one input, got {len(inputs)}")
    with atomic_path(out) as tmp, _quiet():
        quantize_static(str(fp32_onnx), str(tmp), _OneAtATime(calibration, inputs[0].name),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=_METHODS[method],
                        extra_options={"CalibStridedMinMax": 1,
                                       "OpTypesToExcludeOutputQuantization": FP32_OUTPUTS})
