"""Measuring configurations in a fresh process: latency per call, peak memory, the matmul rate
alongside, and image 0's prediction for the agreement check.

Each job's process is forked from a server process that has imported this module and done
nothing else (multiprocessing's forkserver, with this module preloaded): as clean as a spawned
interpreter (no CUDA context, no thread pool, no model), without paying the ~3.5 s import of
torch and torchvision again for every configuration (`benchmarks/worker_start.py` measures
both).

A job is one or more configurations measured one after the other in the same process
(`fcn.benchmark.run` decides: one per process for the stage, so one configuration's caches,
compiled graphs or crash cannot colour another's figures; eager configurations sharing one
process for the GPU check, to save CUDA start-ups). Each configuration computes inside
`fcn.backends.math_mode` (TF32 only for `tf32`, cuDNN autotuning as the protocol says), so its
switches end with it.

Peak memory:
- CUDA, PyTorch: `max_memory_allocated` / `max_memory_reserved` over the timed calls, after the
  warm-up, `empty_cache` and `reset_peak_memory_stats` (steady state; weights and input
  included).
- CUDA, onnxruntime: not measured (None): its allocator is not PyTorch's, which cannot see it.
- CPU: the growth of the process's resident set during inference (warm-up included): Linux
  resets the kernel's high-water mark (`/proc/self/clear_refs` ← 5) once the model and input are
  in memory, and the figure is VmHWM − VmRSS at that point. Without /proc the growth of
  `ru_maxrss` is reported instead, which is a lower bound (the method is recorded per run).

Timing: CUDA events around each PyTorch call (the input already on the device); onnxruntime
on CUDA runs with its input and output bound on the device (`io_binding`: no host copies in the
timed call) and is timed by the host clock, since it synchronises its own stream before it
returns. Which execution provider really ran is checked, not assumed.

Matmul rate: on CUDA (a dedicated device) probed once per precision and process; on a CPU,
which other work may share, also after every timed call, and the median counts, so that
latency and matmul rate see the same load (the memory peak excludes those matmuls). The int8
configuration's is fp32's (`Config.host_precision`): PyTorch has no int8 matmul to probe.
"""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcn.backends import math_mode, tf32_enabled
from fcn.benchmark.capability import MATMUL_REPS, matmul_rate
from fcn.benchmark.inputs import to_input
from fcn.benchmark.plan import Config, Protocol
from fcn.cityscapes.labels import NUM_CLASSES
from fcn.device import (DTYPES, autocast, empty_cache, event_times, indexed, peak_memory,
                        reset_peak, synchronize)
from fcn.model import FCN
from fcn.params import ModelParams
from fcn.predict.predictor import slide_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """Everything a worker process needs: picklable, no tensors."""

    configs: tuple[Config, ...]
    protocol: Protocol
    model: ModelParams
    state_path: str
    images_path: str
    onnx_path: str | None = None
    onnx_int8_path: str | None = None
    """that export quantised by `fcn.quantize` (the int8 configuration's model)"""


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


class _Rates:
    """The dense matmul rate per precision for this process (`matmul_rate`)."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.device = torch.device(protocol.device)
        self.once: dict[str, float] = {}

    def probe(self, precision: str) -> float:
        return matmul_rate(self.device, DTYPES[precision], self.protocol.matmul_size,
                           MATMUL_REPS[self.device.type])

    def cached(self, precision: str) -> float:
        if precision not in self.once:
            self.once[precision] = self.probe(precision)
        return self.once[precision]


def measure(job: Job) -> list[dict[str, Any]]:
    """Time each configuration of `job` in this (fresh) process, in order: its figures plus
    image 0's prediction, or {'error': ...} for one that failed (the next ones still run)."""
    protocol = job.protocol
    torch.set_num_threads(protocol.threads)
    rates = _Rates(protocol)
    results = []
    for config in job.configs:
        try:
            results.append(_measure_one(job, config, rates))
        except Exception as exc:  # noqa: BLE001 - one configuration's failure is its own
            results.append({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                            if str(exc).strip() else type(exc).__name__})
        gc.collect()
        empty_cache(torch.device(protocol.device))
    return results


def _measure_one(job: Job, config: Config, rates: _Rates) -> dict[str, Any]:
    protocol = job.protocol
    device = torch.device(protocol.device)
    torch.manual_seed(protocol.seed)
    with math_mode(device, config.host_precision, benchmark=protocol.cudnn_benchmark):
        tf32 = tf32_enabled() if device.type == "cuda" else (None, None)
        if device.type == "cuda":
            matmul_rates = [rates.cached(config.host_precision)]
        else:
            matmul_rates = [rates.probe(config.host_precision)]
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        model = FCN.from_params(job.model, NUM_CLASSES)
        model.load_state_dict(torch.load(job.state_path, map_location="cpu", weights_only=True))
        model = model.eval().to(device, memory_format=memory_format)
        images = np.load(job.images_path, mmap_mode="r")[: config.batch_size]
        x = to_input(images, device, config.channels_last)
        del images
        if config.compile:
            import torch._inductor.config as inductor

            inductor.freezing = True  # inference: fold batch norm into convolutions, prepack
            model = torch.compile(model)
        forward, predict, timer = _forward(job, config, model, x)
        result = _time(device, config, protocol, forward, predict, timer, matmul_rates, rates)
        result.update(tf32_matmul=tf32[0], tf32_cudnn=tf32[1])
        if config.runtime == "onnxruntime" and device.type == "cuda":
            result.update(peak_allocated_mb=None, peak_reserved_mb=None,
                          memory_method="not measured: onnxruntime allocates outside "
                                        "PyTorch's caching allocator")
        del model, x, forward, predict
    return result


def _time(device: torch.device, config: Config, protocol: Protocol,
          forward: Callable[[], Any], predict: Callable[[Any], np.ndarray], timer: str,
          matmul_rates: list[float], rates: _Rates) -> dict[str, Any]:
    casting = autocast(device, config.host_precision, cuda_only=False)
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
            empty_cache(device)
            reset_peak(device)
            if timer == "events":
                latencies, out = event_times(device, forward, protocol.iters)
            else:
                for _ in range(protocol.iters):
                    start = time.perf_counter()
                    out = forward()
                    synchronize(device)
                    latencies.append(time.perf_counter() - start)
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
                matmul_rates.append(rates.probe(config.host_precision))
        prediction = predict(out)
    result: dict[str, Any] = {"latencies_s": latencies, "first_call_s": first_call,
                              "prediction": prediction, "timer": timer}
    peaks = peak_memory(device)
    if peaks is not None:
        result["peak_allocated_mb"] = peaks["allocated"] / 2**20
        result["peak_reserved_mb"] = peaks["reserved"] / 2**20
        result["memory_method"] = ("torch.cuda.max_memory_allocated/reserved over the timed "
                                   "calls, after warm-up, empty_cache, reset_peak_memory_stats")
    else:
        result["peak_rss_growth_mb"] = rss.growth() / 2**20
        result["rss_baseline_mb"] = rss.baseline / 2**20
        result["memory_method"] = rss.method + " (model and input loaded; warm-up included)"
    del out
    gc.collect()
    empty_cache(device)
    if device.type == "cuda":
        result["matmul_flops"] = max(matmul_rates)
    else:
        matmul_rates.append(rates.probe(config.host_precision))
        result["matmul_flops"] = statistics.median(matmul_rates)
    return result


def _forward(job: Job, config: Config, model: torch.nn.Module, x: torch.Tensor
             ) -> tuple[Callable[[], Any], Callable[[Any], np.ndarray], str]:
    """(the timed call, its output → image 0's class map, how it is timed): the model on
    whole images, on sliding windows, or onnxruntime."""
    protocol = job.protocol
    if config.runtime == "onnxruntime":
        return _onnxruntime(job, x, int8=config.precision == "int8")

    def classes(out: torch.Tensor) -> np.ndarray:
        return out[0].argmax(0).to(torch.uint8).cpu().numpy()

    if config.mode == "slide":
        return (lambda: slide_logits(model, x, protocol.window, protocol.stride), classes,
                "events")
    return lambda: model(x), classes, "events"


def _onnxruntime(job: Job, x: torch.Tensor, int8: bool = False
                 ) -> tuple[Callable[[], Any], Callable[[Any], np.ndarray], str]:
    """onnxruntime on the input's device, running the fp32 export or (`int8`) its quantised
    copy: the session's provider must be that device's (CUDA: onnxruntime-gpu), else the
    configuration fails saying which provider would have run."""
    from fcn.deploy import INPUT, OUTPUT, session

    device = torch.device(job.protocol.device)
    cuda = device.type == "cuda"
    sess = session(job.onnx_int8_path if int8 else job.onnx_path, job.protocol.threads,
                   cuda=cuda)
    wanted = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    used = sess.get_providers()
    if used[:1] != [wanted]:
        raise RuntimeError(f"onnxruntime would run on {used[0] if used else 'no provider'}, "
                           f"not {wanted} (providers {used})")
    if not cuda:
        feed = {INPUT: x.contiguous().numpy()}
        return (lambda: sess.run([OUTPUT], feed)[0],
                lambda out: np.asarray(out)[0].argmax(0).astype(np.uint8), "host clock")
    x = x.contiguous()
    binding = sess.io_binding()
    index = indexed(device).index
    binding.bind_input(name=INPUT, device_type="cuda", device_id=int(index),
                       element_type=np.float32, shape=tuple(int(n) for n in x.shape),
                       buffer_ptr=int(x.data_ptr()))
    binding.bind_output(OUTPUT, "cuda", int(index))

    def call() -> Any:
        sess.run_with_iobinding(binding)
        return binding

    def classes(out: Any) -> np.ndarray:
        return np.asarray(out.copy_outputs_to_cpu()[0])[0].argmax(0).astype(np.uint8)

    return call, classes, "host clock"


START_METHODS = ("forkserver", "spawn")


def worker_context(start_method: str = "forkserver") -> multiprocessing.context.BaseContext:
    """The context job processes start from: `forkserver` (the default), whose server imports
    this module once, so every job forks from an interpreter that holds the imports and
    nothing else; or `spawn`, a new interpreter per job (the reference the start-up benchmark
    compares with). The server starts before any CUDA call here, so forking it is safe."""
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload([__name__])  # no effect once the server runs
        try:
            forkserver.ensure_running()
        except OSError as exc:  # its Unix socket lives in $TMPDIR: a path over 107 bytes fails
            log.warning("no forkserver for the benchmark workers (%s, TMPDIR %s): each starts "
                        "with spawn instead", exc, tempfile.gettempdir())
            return multiprocessing.get_context("spawn")
    return context


def run_isolated(job: Job, start_method: str = "forkserver") -> list[dict[str, Any]]:
    """`measure(job)` in a fresh process (`worker_context`); a dead worker is re-raised as
    RuntimeError naming what happened, and an interrupted wait kills the worker (a compile
    would otherwise hold the caller until it finished)."""
    context = worker_context(start_method)
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context)
    try:
        return pool.submit(measure, job).result()
    except concurrent.futures.process.BrokenProcessPool:
        raise RuntimeError("the worker process died (out of memory?)") from None
    except BaseException:  # interrupted (Ctrl-C, the GPU check's allowance): stop it now
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
