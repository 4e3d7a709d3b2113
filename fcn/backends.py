"""The switches in `torch.backends` that change what a computation returns or how fast:
TF32 math, deterministic algorithms and cuDNN autotuning. Each is set only here, as a context
that restores the previous values when it ends, so nothing one caller sets leaks into the next
(a training run used to leave deterministic algorithms on, and the next CUDA training in the
same process then failed: `nll_loss2d` has no deterministic CUDA kernel).

The policy (`math_mode`):
- TF32 is on for precision `tf32` on CUDA only; `fp32` is strict IEEE fp32 (matmuls and cuDNN
  convolutions), whatever PyTorch's defaults (cuDNN convolutions default to TF32).
- Training on a CPU uses deterministic algorithms (a resumed run is bit-identical to an
  uninterrupted one); on CUDA it lets cuDNN autotune (speed: cuDNN is not bit-exact anyway).
- Inference leaves determinism as it is and autotunes on CUDA.

`flags()` reads what is in force; the train and evaluate stages record it in their metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from fcn.device import autocast_dtype, uses_tf32

_NEW_API = (hasattr(torch.backends.cuda.matmul, "fp32_precision")
            and hasattr(torch.backends.cudnn.conv, "fp32_precision"))
"""torch >= 2.9 has `fp32_precision`; once it is used, reading the legacy `allow_tf32` flags
raises, so one API is used throughout."""


def tf32_enabled() -> tuple[bool, bool]:
    """(matmul, cuDNN convolution): whether each runs fp32 work in TF32 now (an unset new-API
    flag follows its parent, then the legacy default: matmuls IEEE, cuDNN convolutions TF32)."""
    if not _NEW_API:
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    def first(*chain: str) -> bool | None:
        return next((value == "tf32" for value in chain if value in ("tf32", "ieee")), None)

    parent = torch.backends.fp32_precision
    matmul = first(torch.backends.cuda.matmul.fp32_precision, parent)
    if matmul is None:  # read only then: after the new API is used, reading this raises
        matmul = torch.get_float32_matmul_precision() != "highest"
    conv = first(torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.fp32_precision,
                 parent)
    return matmul, True if conv is None else conv


def _raw() -> tuple[Any, Any]:
    if _NEW_API:
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _write(matmul: Any, conv: Any) -> None:
    if _NEW_API:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
    else:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = conv


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[tuple[bool, bool]]:
    """TF32 on or off for CUDA matmuls and cuDNN convolutions while the block runs (the only
    place the project sets these flags); yields the flags in force, and puts the previous
    values back after, exactly as they were."""
    previous = _raw()
    if _NEW_API:
        mode = "tf32" if enabled else "ieee"
        _write(mode, mode)
    else:
        _write(enabled, enabled)
    try:
        yield tf32_enabled()
    finally:
        _write(*previous)


@contextlib.contextmanager
def math_mode(device: torch.device, precision: str, *, deterministic: bool | None = None,
              benchmark: bool | None = None) -> Iterator[None]:
    """The backend switches for running at `precision` on `device`, restored afterwards:
    TF32 as `precision` says (`fcn.device.uses_tf32`); deterministic algorithms (and oneDNN's
    deterministic mode on a CPU) when `deterministic` is not None; cuDNN autotuning on CUDA
    when `benchmark` is not None (None leaves a switch as it is)."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.mkldnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    try:
        with tf32(uses_tf32(device, precision)):
            if deterministic is not None:
                torch.use_deterministic_algorithms(deterministic)
                if device.type == "cpu":
                    torch.backends.mkldnn.deterministic = deterministic
                else:
                    torch.backends.cudnn.deterministic = deterministic
            if benchmark is not None and device.type == "cuda":
                torch.backends.cudnn.benchmark = benchmark
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.mkldnn.deterministic = saved[2]
        torch.backends.cudnn.benchmark = saved[3]
        torch.backends.cudnn.deterministic = saved[4]


def training_mode(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """What `fit()` runs in: deterministic on a CPU (bit-exact resume), autotuned on CUDA."""
    cpu = device.type == "cpu"
    return math_mode(device, precision, deterministic=cpu, benchmark=not cpu)


def inference_mode(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """What the Predictor runs in: TF32 as `precision` says, cuDNN autotuning on CUDA."""
    return math_mode(device, precision, benchmark=True)


def flags(device: torch.device, precision: str) -> dict[str, Any]:
    """What a computation at `precision` on `device` runs with now (call inside the mode):
    recorded beside the scores, so two runs' numbers can be told apart by their math."""
    dtype = autocast_dtype(device, precision)
    cuda = device.type == "cuda"
    matmul, conv = tf32_enabled()
    return {"device": device.type, "precision": precision,
            "autocast": str(dtype).removeprefix("torch.") if dtype is not None else "none",
            "tf32_matmul": cuda and matmul, "tf32_cudnn": cuda and conv,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "cudnn_benchmark": cuda and torch.backends.cudnn.benchmark}
