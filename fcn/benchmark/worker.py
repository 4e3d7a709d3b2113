"""Measuring one configuration, in a fresh spawned process: latency per call, peak memory,
the matmul rate alongside, and image 0's prediction for the agreement check.

Peak memory:
- CUDA: `max_memory_allocated` / `max_memory_reserved` over the timed calls, after the warm-up,
  `empty_cache` and `reset_peak_memory_stats` (steady state; weights and input included).
- CPU: the growth of the process's resident set during inference (warm-up included): Linux
  resets the kernel's high-water mark (`/proc/self/clear_refs` ← 5) once the model and input are
  in memory, and the figure is VmHWM − VmRSS at that point. Without /proc the growth of
  `ru_maxrss` is reported instead, which is a lower bound (the method is recorded per run).

Matmul rate: on CUDA the better of one taken before and one after the model runs counts; on a
CPU, which other work may share, a matmul figure is also taken after every timed call and the
median of all counts, so that latency and matmul rate see the same load (the memory peak
excludes those matmuls).
"""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcn.benchmark.capability import MATMUL_REPS, matmul_rate, set_tf32
from fcn.benchmark.inputs import to_input
from fcn.benchmark.plan import Config, Protocol
from fcn.cityscapes.labels import NUM_CLASSES
from fcn.device import DTYPES, autocast, synchronize
from fcn.model import FCN8s
from fcn.params import ModelParams
from fcn.predict.predictor import slide_logits


@dataclass(frozen=True)
class Job:
    """Everything a worker process needs: picklable, no tensors."""

    config: Config
    protocol: Protocol
    model: ModelParams
    state_path: str
    images_path: str
    onnx_path: str | None = None


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


def measure(job: Job) -> dict[str, Any]:
    """Time one configuration in this (fresh) process; figures plus image 0's prediction."""
    config, protocol = job.config, job.protocol
    device = torch.device(protocol.device)
    torch.set_num_threads(protocol.threads)
    torch.manual_seed(protocol.seed)
    tf32 = (None, None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = protocol.cudnn_benchmark
        tf32 = set_tf32(config.precision == "tf32")
    # The dense matmul rate at this precision, in this process. CUDA (a dedicated device):
    # before and after the model runs, the better counts. CPU (shared with whatever else the
    # machine runs): after every timed call too, and the median counts, so that the rate and
    # the latency are measured under the same load.
    matmul_args = (device, DTYPES[config.precision], protocol.matmul_size,
                   MATMUL_REPS[device.type])
    matmul_rates = [matmul_rate(*matmul_args)]
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
    casting = autocast(device, config.precision, cuda_only=False)
    forward = _forward(job, model, x)

    rss = PeakRss()
    latencies: list[float] = []
    with torch.inference_mode(), casting:
        if device.type == "cpu":
            rss.reset()
        synchronize(device)
        start = time.perf_counter()
        out = forward()
        synchronize(device)
        first_call = time.perf_counter() - start
        del out
        for _ in range(protocol.warmup - 1):
            forward()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(protocol.iters)]
            for i, (begin, end) in enumerate(events):
                begin.record()
                out = forward()
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
                out = forward()
                latencies.append(time.perf_counter() - start)
                rss.checkpoint()
                if i < protocol.iters - 1:
                    del out
                matmul_rates.append(matmul_rate(*matmul_args))
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
    del out, model, x, forward
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    matmul_rates.append(matmul_rate(*matmul_args))
    if device.type == "cuda":
        result["matmul_flops"] = max(matmul_rates)
    else:
        result["matmul_flops"] = statistics.median(matmul_rates)
    return result


def _forward(job: Job, model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The timed call: the model on whole images, on sliding windows, or onnxruntime."""
    config, protocol = job.config, job.protocol
    if config.runtime == "onnxruntime":
        from fcn.deploy import INPUT, OUTPUT, session

        sess = session(job.onnx_path, protocol.threads, cuda=x.device.type == "cuda")
        feed = {INPUT: x.cpu().numpy()}
        return lambda: torch.from_numpy(sess.run([OUTPUT], feed)[0])
    if config.mode == "slide":
        return lambda: slide_logits(model, x, protocol.window, protocol.stride)
    return lambda: model(x)


def run_isolated(job: Job) -> dict[str, Any]:
    """`measure(job)` in a fresh spawned process; an exception or a dead worker is re-raised
    as RuntimeError naming what happened."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(measure, job).result()
        except concurrent.futures.process.BrokenProcessPool:
            raise RuntimeError("the worker process died (out of memory?)") from None
