"""Inference benchmark of FCN8s: latency, throughput, peak memory, FLOPs and utilisation per
configuration (precision × channels-last × torch.compile × batch size), and the fast path.

Protocol (mmsegmentation's, made explicit): whole images, warm-up calls first, then timed calls
of the model's forward pass (logits; no data loading, no argmax), synchronising the device
before reading the clock (CUDA events; `perf_counter` on CPU). Each configuration runs in a fresh
spawned process, so one configuration's caches, compiled graphs, allocator state or crash cannot
colour another's figures, and the CPU peak-memory figure means something (below).

Peak memory:
- CUDA: `max_memory_allocated` / `max_memory_reserved` over the timed calls, after the warm-up,
  `empty_cache` and `reset_peak_memory_stats` (steady state; weights and input included).
- CPU: the growth of the process's resident set during inference (warm-up included): Linux
  resets the kernel's high-water mark (`/proc/self/clear_refs` ← 5) once the model and input are
  in memory, and the figure is VmHWM − VmRSS at that point. Without /proc the growth of
  `ru_maxrss` is reported instead, which is a lower bound (the method is recorded per run).

Utilisation = achieved FLOP/s (FlopCounterMode's count of one forward × batch / median latency)
÷ the device's dense matmul FLOP/s, measured in the same process at the same precision (square
matmul_size matmuls, each figure the best of MATMUL_REPS). On CUDA the better of one taken
before and one after the model runs counts; on a CPU, which other work may share, a matmul
figure is also taken after every timed call and the median of all counts, so that latency and
matmul rate see the same load (the memory peak excludes those matmuls).

Precisions: `fp32` is strict fp32 (TF32 off) and is the reference for agreement; `tf32` is fp32
storage with TF32 tensor-core math (CUDA ≥ sm80); `bf16`/`fp16` run under autocast, as
`fcn.inference.Predictor` runs them. A precision the device has no kernels for is reported as
skipped with the reason, never run for minutes or faked.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import logging
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm import tqdm

from fcn.distributed import resolve_device
from fcn.flops import analytic_flops, counted_flops
from fcn.labels import NUM_CLASSES
from fcn.model import FCN8s
from fcn.params import BenchmarkParams, ModelParams
from fcn.synthetic import make_scene, render_image

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.999
"""Argmax agreement with fp32 that a configuration needs to be the fast path."""
MATMUL_N = {"cpu": 2048, "cuda": 8192}
"""Default square matmul size for the device's dense rate: large enough to reach the plateau."""
MATMUL_REPS = {"cpu": 4, "cuda": 20}
CALIBRATION_PIXELS = 256 * 512
"""Batch-norm statistics of the trained-like model come from the image scaled to about this."""
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}
FIELDS = (
    "name", "precision", "channels_last", "compile", "batch_size", "status", "reason",
    "warmup", "iters", "latency_ms_median", "latency_ms_p90", "latency_ms_min", "throughput_ips",
    "throughput_ips_load_corrected", "first_call_s", "compile_s", "peak_memory_mb", "peak_allocated_mb", "peak_reserved_mb",
    "rss_baseline_mb", "peak_rss_growth_mb", "memory_method", "flops_per_image",
    "achieved_tflops", "matmul_tflops", "utilisation", "agreement", "tf32_matmul", "tf32_cudnn",
)
"""Every configuration's entry in metrics/benchmark_details.json has exactly these keys (null = n/a)."""


@dataclass(frozen=True)
class Config:
    """One measured combination."""

    precision: str
    channels_last: bool
    compile: bool
    batch_size: int

    @property
    def name(self) -> str:
        layout = "cl" if self.channels_last else "nchw"
        mode = "compiled" if self.compile else "eager"
        return f"{self.precision}-{layout}-{mode}-b{self.batch_size}"


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
        matmul_size=params.matmul_size or MATMUL_N[device.type])
    batch_sizes = params.quick_batch_sizes if quick else params.full_batch_sizes
    compiles = params.quick_compile if quick else params.full_compile
    configs = [Config(p, cl, c, b) for p in params.precisions for cl in params.channels_last
               for c in compiles for b in batch_sizes]
    return protocol, configs


# --- what the device supports -------------------------------------------------------------

def _matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Best dense n×n matmul rate in FLOP/s over `reps` timed products (one warm-up first)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.float32, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32, generator=gen).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


@functools.lru_cache(maxsize=None)
def _probe(precision: str) -> tuple[float, float]:
    """CPU matmul FLOP/s at fp32 and at `precision` (512×512: a fraction of a second even on
    reference kernels)."""
    cpu = torch.device("cpu")
    return _matmul_rate(cpu, torch.float32, 512, 5), _matmul_rate(cpu, DTYPES[precision], 512, 1)


def precision_support(device: torch.device, precision: str) -> str | None:
    """None when `device` runs `precision` natively, else the reason it is skipped.

    CPU low precision is decided by oneDNN's own capability check (bf16 needs AVX512-BF16 or
    AMX, fp16 AVX512-FP16 or AMX-FP16): without them PyTorch falls back to reference kernels
    tens to hundreds of times slower than fp32, and a small probe matmul shows by how much.
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if precision == "tf32" and major < 8:
            return f"TF32 needs compute capability >= 8.0; {name} is {major}.{minor}"
        if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
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


# --- the model and images every configuration sees ----------------------------------------

def benchmark_images(count: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 (count, H, W, 3) synthetic street scenes: real-looking structure, so predictions
    form regions with boundaries instead of noise. Image i is the same whatever `count`."""
    images = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        images.append(render_image(make_scene(width, height, rng, index), rng))
    return np.stack(images)


def to_input(images: np.ndarray, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [0, 1] on `device`, as the model takes it."""
    x = torch.from_numpy(np.array(images, copy=True)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last if channels_last else
                        torch.contiguous_format)


@torch.no_grad()
def trained_like_model(params: ModelParams, image: np.ndarray, seed: int,
                       num_classes: int = NUM_CLASSES) -> FCN8s:
    """A seeded FCN8s whose predictions vary like a trained one's, for the agreement check.

    A fresh FCN8s predicts one class everywhere (score layers start at zero). Here the backbone
    keeps its random initialisation, the score layers are random, and batch-norm statistics are
    measured on `image` (downscaled), so every layer sees unit-scale activations as in a trained
    network. Its logit margins are smaller than a trained model's, so its agreement figures are
    a pessimistic bound: benchmark.weights can point at a real checkpoint instead.
    """
    torch.manual_seed(seed)
    model = FCN8s(params.backbone, num_classes, params.fc67, params.fc_channels)
    gen = torch.Generator().manual_seed(seed)
    for layer in (model.score_pool5, model.score_pool4, model.score_pool3):
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


def load_weights(params: BenchmarkParams, model_params: ModelParams, image: np.ndarray) -> FCN8s:
    """The model every configuration times: trained-like, or a training checkpoint."""
    if params.weights == "trained_like":
        return trained_like_model(model_params, image, params.seed)
    from fcn.inference import load_checkpoint_model  # only this option needs checkpoints

    return load_checkpoint_model(params.weights, model_params)


@torch.inference_mode()
def predict_classes(model: FCN8s, images: np.ndarray, device: torch.device, precision: str,
                    channels_last: bool) -> torch.Tensor:
    """Argmax class maps (N, H, W) of `model` on uint8 images at one precision and layout, in
    this process (the agreement check outside the timed workers). On a CPU without native
    bf16/fp16 this runs PyTorch's reference kernels: slow, numerically the same rounding."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(device, memory_format=memory_format)
    if device.type == "cuda":
        _set_tf32(precision == "tf32")
    low = precision in ("bf16", "fp16")
    with torch.autocast(device.type, dtype=DTYPES[precision], enabled=low):
        return model(to_input(images, device, channels_last)).argmax(1)


# --- measuring one configuration (runs in a fresh process) --------------------------------

@dataclass(frozen=True)
class Job:
    """Everything a worker process needs: picklable, no tensors."""

    config: Config
    protocol: Protocol
    model: ModelParams
    state_path: str
    images_path: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _set_tf32(enabled: bool) -> tuple[bool, bool]:
    """Allow/forbid TF32 for CUDA matmuls and cuDNN convolutions; the flags now in force."""
    mode = "tf32" if enabled else "ieee"
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        matmul.fp32_precision = mode
        conv.fp32_precision = mode
        return matmul.fp32_precision == "tf32", conv.fp32_precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


class PeakRss:
    """Peak growth of this process's resident memory from `reset()` on."""

    def __init__(self) -> None:
        self.method = "VmHWM - VmRSS after /proc/self/clear_refs reset"
        self.baseline = 0
        self.peak = 0

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(f"{key} not in /proc/self/status")

    @staticmethod
    def _maxrss() -> int:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024

    def reset(self) -> None:
        """Take the current resident size as the baseline and start watching for the peak."""
        gc.collect()
        self.peak = 0
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = self._status("VmRSS")
        except OSError:
            self.method = "ru_maxrss growth (lower bound: no /proc peak reset)"
            self.baseline = self._maxrss()

    def checkpoint(self) -> None:
        """Fold the peak since the last (re)arming into the result."""
        high = self._maxrss() if self.method.startswith("ru_maxrss") else self._status("VmHWM")
        self.peak = max(self.peak, high - self.baseline)

    def rearm(self) -> None:
        """Restart the high-water mark (same baseline), so work done between checkpoint() and
        rearm() (the interleaved matmul) does not count."""
        if not self.method.startswith("ru_maxrss"):
            Path("/proc/self/clear_refs").write_text("5")

    def growth(self) -> int:
        return max(0, self.peak)


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of a short list."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def measure(job: Job) -> dict[str, Any]:
    """Time one configuration in this (fresh) process; figures plus image 0's prediction."""
    config, protocol = job.config, job.protocol
    device = torch.device(protocol.device)
    torch.set_num_threads(protocol.threads)
    torch.manual_seed(protocol.seed)
    tf32 = (None, None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = protocol.cudnn_benchmark
        tf32 = _set_tf32(config.precision == "tf32")
    # The dense matmul rate at this precision, in this process. CUDA (a dedicated device):
    # before and after the model runs, the better counts. CPU (shared with whatever else the
    # machine runs): after every timed call too, and the median counts, so that the rate and
    # the latency are measured under the same load.
    matmul_args = (device, DTYPES[config.precision], protocol.matmul_size,
                   MATMUL_REPS[device.type])
    matmul_rates = [_matmul_rate(*matmul_args)]
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = FCN8s(job.model.backbone, NUM_CLASSES, job.model.fc67, job.model.fc_channels)
    model.load_state_dict(torch.load(job.state_path, map_location="cpu", weights_only=True))
    model = model.eval().to(device, memory_format=memory_format)
    images = np.load(job.images_path, mmap_mode="r")[: config.batch_size]
    x = to_input(images, device, config.channels_last)
    del images
    if config.compile:
        import torch._inductor.config as inductor

        inductor.freezing = True  # inference: fold batch norm into the convolutions, prepack
        model = torch.compile(model)
    low = config.precision in ("bf16", "fp16")
    autocast = torch.autocast(device.type, dtype=DTYPES[config.precision], enabled=low)

    rss = PeakRss()
    latencies: list[float] = []
    with torch.inference_mode(), autocast:
        if device.type == "cpu":
            rss.reset()
        _sync(device)
        start = time.perf_counter()
        out = model(x)
        _sync(device)
        first_call = time.perf_counter() - start
        del out
        for _ in range(protocol.warmup - 1):
            model(x)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(protocol.iters)]
            for i, (begin, end) in enumerate(events):
                begin.record()
                out = model(x)
                end.record()
                if i < protocol.iters - 1:
                    del out
            torch.cuda.synchronize(device)
            latencies = [begin.elapsed_time(end) / 1e3 for begin, end in events]
        else:
            rss.checkpoint()  # the warm-up's peak
            for i in range(protocol.iters):
                rss.rearm()
                start = time.perf_counter()
                out = model(x)
                latencies.append(time.perf_counter() - start)
                rss.checkpoint()
                if i < protocol.iters - 1:
                    del out
                matmul_rates.append(_matmul_rate(*matmul_args))
        prediction = out[0].argmax(0).to(torch.uint8).cpu().numpy()
    result: dict[str, Any] = {"latencies_s": latencies, "first_call_s": first_call,
                              "prediction": prediction, "tf32_matmul": tf32[0],
                              "tf32_cudnn": tf32[1]}
    if device.type == "cuda":
        result["peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
        result["memory_method"] = ("torch.cuda.max_memory_allocated/reserved over the timed "
                                   "calls, after warm-up, empty_cache, reset_peak_memory_stats")
    else:
        result["peak_rss_growth_mb"] = rss.growth() / 2**20
        result["rss_baseline_mb"] = rss.baseline / 2**20
        result["memory_method"] = rss.method + " (model and input loaded; warm-up included)"
    del out, model, x
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    matmul_rates.append(_matmul_rate(*matmul_args))
    if device.type == "cuda":
        result["matmul_flops"] = max(matmul_rates)
    else:
        result["matmul_flops"] = statistics.median(matmul_rates)
    return result


def _run_isolated(job: Job) -> dict[str, Any]:
    """`measure(job)` in a fresh spawned process; an exception or a dead worker is re-raised
    as RuntimeError naming what happened."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(measure, job).result()
        except concurrent.futures.process.BrokenProcessPool:
            raise RuntimeError("the worker process died (out of memory?)") from None


# --- the whole run ------------------------------------------------------------------------

def environment(device: torch.device, protocol: Protocol) -> dict[str, Any]:
    """What the figures were measured on and with."""
    env: dict[str, Any] = {
        "device": device.type, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "threads": protocol.threads,
        "interop_threads": torch.get_num_interop_threads(), "cores": os.cpu_count(),
        "load_average_start": None, "load_average_end": _load_average(),
        "cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda": torch.version.cuda, "cudnn": None, "cudnn_benchmark": None,
        "tf32": "off except in tf32 configurations (per-configuration flags recorded)",
        "device_name": _cpu_name(), "compute_capability": None, "device_memory_gb": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, compute_capability=f"{props.major}.{props.minor}",
                   device_memory_gb=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version(), cudnn_benchmark=protocol.cudnn_benchmark)
    else:
        env["tf32"] = "n/a (CPU)"
    return env


def _load_average() -> list[float] | None:
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


def _entry(config: Config, protocol: Protocol) -> dict[str, Any]:
    entry: dict[str, Any] = dict.fromkeys(FIELDS)
    entry.update(name=config.name, precision=config.precision,
                 channels_last=config.channels_last, compile=config.compile,
                 batch_size=config.batch_size, warmup=protocol.warmup, iters=protocol.iters)
    return entry


def _fill(entry: dict[str, Any], raw: dict[str, Any], flops_per_image: int) -> None:
    """Turn a worker's raw measurements into the reported figures."""
    latencies = raw["latencies_s"]
    median = statistics.median(latencies)
    batch = entry["batch_size"]
    achieved = flops_per_image * batch / median
    entry.update(
        status="ok", latency_ms_median=median * 1e3,
        latency_ms_p90=_percentile(latencies, 90) * 1e3, latency_ms_min=min(latencies) * 1e3,
        throughput_ips=batch / median, first_call_s=raw["first_call_s"],
        compile_s=max(0.0, raw["first_call_s"] - median) if entry["compile"] else None,
        peak_allocated_mb=raw.get("peak_allocated_mb"),
        peak_reserved_mb=raw.get("peak_reserved_mb"), rss_baseline_mb=raw.get("rss_baseline_mb"),
        peak_rss_growth_mb=raw.get("peak_rss_growth_mb"),
        memory_method=raw["memory_method"], flops_per_image=flops_per_image,
        achieved_tflops=achieved / 1e12, matmul_tflops=raw["matmul_flops"] / 1e12,
        utilisation=achieved / raw["matmul_flops"], tf32_matmul=raw["tf32_matmul"],
        tf32_cudnn=raw["tf32_cudnn"])
    entry["peak_memory_mb"] = (entry["peak_allocated_mb"] if entry["peak_allocated_mb"] is not None
                               else entry["peak_rss_growth_mb"])


def run_benchmark(params: BenchmarkParams, model_params: ModelParams,
                  progress: bool = True) -> dict[str, Any]:
    """Measure every configuration `params` asks for; the JSON-ready results.

    Configurations the device cannot run are entries with status 'skipped' and a reason; a
    configuration that fails (out of memory, compiler error) is skipped with the error.
    """
    load_start = _load_average()
    protocol, configs = plan(params)
    device = torch.device(protocol.device)
    flops = counted_flops(model_params, protocol.height, protocol.width)
    with torch.device("meta"):
        meta_model = FCN8s(model_params.backbone, NUM_CLASSES, model_params.fc67,
                           model_params.fc_channels)
    analytic = analytic_flops(meta_model, protocol.height, protocol.width)
    log.info("FCN8s/%s at %dx%d: %.1f GFLOPs per image counted, %.1f analytic",
             model_params.backbone, protocol.height, protocol.width, flops / 1e9,
             analytic.flops / 1e9)

    # Agreement reference: fp32, eager, smallest batch, the first layout asked for (so a run
    # of channels_last only needs no extra reference run).
    reference = Config("fp32", params.channels_last[0], False, min(c.batch_size for c in configs))
    entries = {c.name: _entry(c, protocol) for c in configs}
    predictions: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="fcn-benchmark-") as tmp:
        images = benchmark_images(max(c.batch_size for c in configs), protocol.height,
                                  protocol.width, protocol.seed)
        images_path, state_path = Path(tmp) / "images.npy", Path(tmp) / "state.pt"
        np.save(images_path, images)
        torch.save(load_weights(params, model_params, images[0]).state_dict(), state_path)
        del images
        todo = sorted(configs, key=lambda c: c != reference)  # the reference first
        if reference not in configs:
            todo.insert(0, reference)
        for config in tqdm(todo, desc="benchmark", unit="config", disable=not progress):
            entry = entries.get(config.name)
            reason = precision_support(device, config.precision)
            if reason is None:
                job = Job(config, protocol, model_params, str(state_path), str(images_path))
                try:
                    raw = _run_isolated(job)
                except Exception as exc:  # noqa: BLE001 - any failure skips just this config
                    reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                else:
                    predictions[config.name] = raw.pop("prediction")
                    if entry is not None:
                        _fill(entry, raw, flops)
            if entry is None:
                continue
            if reason is not None:
                entry.update(status="skipped", reason=reason)
                log.warning("%s skipped: %s", config.name, reason)
            else:
                log.info("%s: median %.1f ms, p90 %.1f ms, %.2f images/s, peak %.0f MB, "
                         "%.2f TFLOP/s = %.0f%% of matmul", config.name,
                         entry["latency_ms_median"], entry["latency_ms_p90"],
                         entry["throughput_ips"], entry["peak_memory_mb"],
                         entry["achieved_tflops"], 100 * entry["utilisation"])
    ref = predictions.get(reference.name)
    for name, prediction in predictions.items():
        if name in entries and ref is not None:
            entries[name]["agreement"] = float((prediction == ref).mean())
    _correct_for_load(entries)

    results: dict[str, Any] = {
        "environment": environment(device, protocol),
        "protocol": {**dataclasses.asdict(protocol), "weights": params.weights,
                     "timed": "model forward (logits) on an input already on the device",
                     "matmul_reps": MATMUL_REPS[device.type],
                     "matmul_rate": ("best of the rates before and after the model runs"
                                     if device.type == "cuda" else "median of the rates before, "
                                     "after each timed call, and at the end"),
                     "agreement_reference": reference.name, "min_agreement": MIN_AGREEMENT},
        "model": {"backbone": model_params.backbone, "fc67": model_params.fc67,
                  "flops_counted": flops, "flops_analytic": analytic.flops,
                  "macs_analytic": analytic.macs, "other_ops_analytic": analytic.other_ops,
                  "counted_over_analytic": flops / analytic.flops},
        "configs": entries,
    }
    results["environment"]["load_average_start"] = load_start
    results["fast_path"] = _summary(fastest_config(results))
    results["fast_path_eager"] = _summary(fastest_config(results, allow_compile=False))
    return results


def _correct_for_load(entries: dict[str, dict[str, Any]]) -> None:
    """images/s scaled to the least loaded moment of the run: × (best matmul rate seen at that
    precision / the rate measured alongside this configuration). On a dedicated GPU the factor
    is ~1; on a shared CPU it keeps other jobs' load from deciding the ranking (observed here:
    the same configuration's latency varying 2× with the machine's load, its matmul alike)."""
    best: dict[str, float] = {}
    for entry in entries.values():
        if entry["status"] == "ok":
            best[entry["precision"]] = max(best.get(entry["precision"], 0.0),
                                           entry["matmul_tflops"])
    for entry in entries.values():
        if entry["status"] == "ok":
            entry["throughput_ips_load_corrected"] = (
                entry["throughput_ips"] * best[entry["precision"]] / entry["matmul_tflops"])


def fastest_config(results: dict[str, Any], min_agreement: float = MIN_AGREEMENT,
                   allow_compile: bool = True) -> dict[str, Any] | None:
    """The measured configuration with the most images/s (load-corrected where known) whose
    argmax predictions agree with fp32 on at least `min_agreement` of the pixels; None when
    none qualifies.

    allow_compile=False restricts the choice to eager configurations (what
    fcn.inference.Predictor can run today).
    """
    eligible = [entry for entry in results["configs"].values()
                if entry["status"] == "ok" and entry["agreement"] is not None
                and entry["agreement"] >= min_agreement and (allow_compile or not entry["compile"])]

    def speed(entry: dict[str, Any]) -> float:
        corrected = entry.get("throughput_ips_load_corrected")
        return entry["throughput_ips"] if corrected is None else corrected

    return max(eligible, key=speed, default=None)


def _summary(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    keys = ("name", "precision", "channels_last", "compile", "batch_size", "latency_ms_median",
            "throughput_ips", "throughput_ips_load_corrected", "peak_memory_mb", "agreement")
    return {key: entry[key] for key in keys}


def iter_ok(results: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The configurations that were measured (not skipped), in run order."""
    return (e for e in results["configs"].values() if e["status"] == "ok")
