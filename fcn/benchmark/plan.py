"""What the benchmark measures: the protocol and the configurations a profile asks for.

Protocol (mmsegmentation's, made explicit): whole images, warm-up calls first, then timed calls
of the model's forward pass (logits; no data loading, no argmax), synchronising the device
before reading the clock (CUDA events; `perf_counter` on CPU). Each configuration runs in a
fresh process (`fcn.benchmark.worker`: forked from a server that has only imported it), so one configuration's caches, compiled graphs,
allocator state or crash cannot colour another's figures.

A configuration is precision × channels-last × torch.compile × batch size. Precisions: `fp32`
is strict fp32 (TF32 off) and is the reference for agreement; `tf32` is fp32 storage with TF32
tensor-core math (CUDA ≥ sm80); `bf16`/`fp16` run under autocast, as
`fcn.predict.predictor.Predictor` runs them. With `runtime` onnxruntime, `fp32` is the ONNX
export of the same weights and `int8` that export quantised by `fcn.quantize` (the deploy
stage's `model_int8.onnx`; CPU only): it takes and returns fp32 tensors, so the PyTorch side
of its measurement (math mode, autocast, the matmul rate beside it) is fp32's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fcn.device import resolve_device
from fcn.params import BenchmarkParams

MATMUL_N = {"cpu": 2048, "cuda": 8192}
"""Default square matmul size for the device's dense rate: large enough to reach the plateau."""


@dataclass(frozen=True)
class Config:
    """One measured combination."""

    precision: str
    channels_last: bool
    compile: bool
    batch_size: int
    mode: str = "whole"
    """whole images, or sliding windows (fcn.predict.predictor.slide_logits)"""
    runtime: str = "torch"
    """torch, or onnxruntime running the ONNX export of the same weights (precision fp32, or
    int8: quantised)"""

    @property
    def host_precision(self) -> str:
        """The PyTorch precision around the timed call: the math mode, autocast and matmul
        probe of the worker (fp32 for the int8 model, whose inputs and outputs are fp32)."""
        return "fp32" if self.precision == "int8" else self.precision

    @property
    def name(self) -> str:
        if self.runtime == "onnxruntime":
            return f"onnxruntime-{self.precision}-b{self.batch_size}"
        layout = "cl" if self.channels_last else "nchw"
        mode = "compiled" if self.compile else "eager"
        slide = "-slide" if self.mode == "slide" else ""
        return f"{self.precision}-{layout}-{mode}{slide}-b{self.batch_size}"


@dataclass(frozen=True)
class Protocol:
    """How every configuration is measured (what the profile resolves to)."""

    profile: str
    device: str
    height: int
    width: int
    warmup: int
    iters: int
    seed: int
    cudnn_benchmark: bool
    threads: int
    matmul_size: int
    window: tuple[int, int]
    stride: tuple[int, int]


def plan(params: BenchmarkParams) -> tuple[Protocol, list[Config]]:
    """The protocol and the configurations `params` ask for (the profile picks quick_*/full_*)."""
    quick = params.profile == "quick"
    device = resolve_device(params.device, setting="benchmark.device")
    protocol = Protocol(
        profile=params.profile, device=device.type,
        height=params.height, width=params.width,
        warmup=params.quick_warmup if quick else params.full_warmup,
        iters=params.quick_iters if quick else params.full_iters,
        seed=params.seed, cudnn_benchmark=params.cudnn_benchmark,
        threads=params.threads or torch.get_num_threads(),
        matmul_size=params.matmul_size or MATMUL_N[device.type],
        window=(params.window[0], params.window[1]), stride=(params.stride[0], params.stride[1]))
    batch_sizes = params.quick_batch_sizes if quick else params.full_batch_sizes
    compiles = params.quick_compile if quick else params.full_compile
    configs = [Config(p, cl, c, b) for p in params.precisions for cl in params.channels_last
               for c in compiles for b in batch_sizes]
    if params.slide:  # whole vs slide memory: the same precision and layout, one image
        configs.append(Config("fp32", params.channels_last[-1], False, 1, mode="slide"))
    if params.onnxruntime:
        configs.append(Config("fp32", False, False, 1, runtime="onnxruntime"))
    if params.int8:
        configs.append(Config("int8", False, False, 1, runtime="onnxruntime"))
    return protocol, configs
