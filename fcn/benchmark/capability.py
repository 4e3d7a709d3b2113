"""What the device can do: its dense matmul rate, which precisions it runs natively, and the
environment the figures were measured in (the TF32 switches themselves are `fcn.backends`').

Two rates stand beside a configuration's achieved FLOP/s (fcn.benchmark.run):
- the dense matmul rate measured in the same process at the same precision (`matmul_rate`):
  `matmul_ratio` = achieved ÷ it, a diagnostic that can exceed 1 (convolution kernels such as
  oneDNN's direct or Winograd ones reach more counted FLOP/s than its sgemm: Winograd does
  fewer multiply-adds than the count);
- the ceiling at that precision: the datasheet peak where the device is known (`PEAK_TFLOPS`),
  raised to the best rate measured in the run (any configuration's, or the matmul's) if that
  is higher: `utilisation` = achieved ÷ ceiling, at most 1 by construction.

A precision the device has no kernels for is reported as skipped with the reason
(`precision_support`), never run for minutes or faked.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

from fcn.benchmark.plan import Protocol
from fcn.device import DTYPES, capability, device_name, native_bf16, properties, synchronize

MATMUL_REPS = {"cpu": 4, "cuda": 20}
"""Timed products per matmul-rate figure; the best counts."""

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},   # SXM5
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
}
"""NVIDIA datasheet dense (no sparsity) peaks per precision, by the name's model; the first
key found in the device name wins (so 'H100 PCIe' before 'H100')."""


def datasheet_peak(device_name: str | None, precision: str) -> float | None:
    """The datasheet peak TFLOP/s of `precision` on the named device, or None (a CPU, or a
    GPU not in PEAK_TFLOPS; an NVL or other variant is not guessed)."""
    if not device_name or "NVL" in device_name:
        return None
    for model, peaks in PEAK_TFLOPS.items():
        if model in device_name:
            return peaks.get(precision)
    return None


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Best dense n×n matmul rate in FLOP/s over `reps` timed products (one warm-up first)."""
    with torch.random.fork_rng(devices=[]):  # the caller's CPU random stream is untouched
        a = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
        b = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


@functools.lru_cache(maxsize=None)
def _probe(precision: str) -> tuple[float, float]:
    """CPU matmul FLOP/s at fp32 and at `precision` (512×512: a fraction of a second even on
    reference kernels)."""
    cpu = torch.device("cpu")
    return matmul_rate(cpu, torch.float32, 512, 5), matmul_rate(cpu, DTYPES[precision], 512, 1)


def runtime_support(device: torch.device, runtime: str) -> str | None:
    """None when `runtime` can run on `device`, else the reason it is skipped."""
    if runtime == "torch":
        return None
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("onnxruntime has no CUDA provider here (install onnxruntime-gpu for GPU "
                "serving); its CPU figure would not compare with this device's")
    return None


def precision_support(device: torch.device, precision: str) -> str | None:
    """None when `device` runs `precision` natively, else the reason it is skipped (`int8`:
    the onnxruntime configuration, measured on CPUs only).

    CPU low precision is decided by oneDNN's own capability check (bf16 needs AVX512-BF16 or
    AMX, fp16 AVX512-FP16 or AMX-FP16): without them PyTorch falls back to reference kernels
    tens to hundreds of times slower than fp32, and a small probe matmul shows by how much.
    """
    if precision == "fp32":
        return None
    if precision == "int8":  # onnxruntime's QDQ model (fcn.quantize), for CPUs
        return None if device.type == "cpu" else (
            "int8 is the deploy stage's model for CPUs: onnxruntime's CUDA provider has no "
            "int8 convolutions and would run fp32 ones between quantise/dequantise steps "
            "(TensorRT builds its own int8 engine from the QDQ file)")
    if device.type == "cuda":
        major, minor = capability(device)
        name = device_name(device)
        if precision == "tf32" and major < 8:
            return f"TF32 needs compute capability >= 8.0; {name} is {major}.{minor}"
        if precision == "bf16" and not native_bf16(device):
            return f"{name} (compute capability {major}.{minor}) has no native bf16"
        if precision == "fp16" and (major, minor) < (5, 3):
            return f"{name} (compute capability {major}.{minor}) has no native fp16"
        return None
    if precision == "tf32":
        return "TF32 is a CUDA tensor-core math mode; this device is a CPU"
    check = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[precision]
    native = getattr(torch.ops.mkldnn, check, None)
    fp32, low = _probe(precision)
    probe = (f"probe 512x512 matmul: {precision} {low / 1e9:.1f} GFLOP/s vs fp32 "
             f"{fp32 / 1e9:.1f} GFLOP/s")
    if native is not None and native():
        return None
    if native is None and low >= fp32 / 2:
        return None  # no capability check in this torch: trust a probe that is not slow
    return (f"no native {precision} kernels on this CPU ({torch.backends.cpu.get_cpu_capability()}"
            f", oneDNN {check[4:]} = False); {probe}")


def environment(device: torch.device, protocol: Protocol) -> dict[str, Any]:
    """What the figures were measured on and with."""
    env: dict[str, Any] = {
        "device": device.type, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "threads": protocol.threads,
        "interop_threads": torch.get_num_interop_threads(), "cores": os.cpu_count(),
        "load_average_start": None, "load_average_end": load_average(),
        "cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda": torch.version.cuda, "cudnn": None, "cudnn_benchmark": None,
        "tf32": "off except in tf32 configurations (per-configuration flags recorded)",
        "device_name": _cpu_name(), "compute_capability": None, "device_memory_gb": None,
    }
    if device.type == "cuda":
        props = properties(device)
        env.update(device_name=props["name"], compute_capability=props["compute_capability"],
                   device_memory_gb=round(props["memory_bytes"] / 2**30, 1),
                   cudnn=torch.backends.cudnn.version(), cudnn_benchmark=protocol.cudnn_benchmark)
    else:
        env["tf32"] = "n/a (CPU)"
    return env


def load_average() -> list[float] | None:
    """1/5/15-minute load: other work on the machine makes CPU figures noisy; this says how much."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
