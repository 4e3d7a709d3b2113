"""The benchmark run: every configuration measured in its own process, assembled into the
results (environment, protocol, FLOPs, one `ConfigResult` per configuration) and the fast path:
the fastest configuration whose predictions agree with fp32.

See `fcn.benchmark.plan` for the protocol, `.worker` for how one configuration is timed and
its memory measured, `.capability` for the rates behind the utilisation figures.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fcn.benchmark.capability import (MATMUL_REPS, datasheet_peak, environment, load_average,
                                      precision_support, runtime_support)
from fcn.benchmark.flops import analytic_flops, counted_flops
from fcn.benchmark.inputs import benchmark_images, load_weights
from fcn.benchmark.plan import Config, Protocol, plan
from fcn.benchmark.worker import Job, measure, run_isolated
from fcn.cityscapes.labels import NUM_CLASSES
from fcn.model import FCN, describe
from fcn.params import BenchmarkParams, ModelParams
from fcn.predict.predictor import window_boxes

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.999
"""Argmax agreement with fp32 that a configuration needs to be the fast path."""


@dataclass
class ConfigResult:
    """One configuration's entry in metrics/benchmark_details.json (None = n/a)."""

    name: str
    precision: str
    channels_last: bool
    compile: bool
    batch_size: int
    mode: str = "whole"
    runtime: str = "torch"
    status: str | None = None
    reason: str | None = None
    warmup: int | None = None
    iters: int | None = None
    latency_ms_median: float | None = None
    latency_ms_p90: float | None = None
    latency_ms_min: float | None = None
    throughput_ips: float | None = None
    throughput_ips_load_corrected: float | None = None
    first_call_s: float | None = None
    compile_s: float | None = None
    peak_memory_mb: float | None = None
    peak_allocated_mb: float | None = None
    peak_reserved_mb: float | None = None
    rss_baseline_mb: float | None = None
    peak_rss_growth_mb: float | None = None
    memory_method: str | None = None
    flops_per_image: int | None = None
    achieved_tflops: float | None = None
    matmul_tflops: float | None = None
    matmul_ratio: float | None = None
    utilisation: float | None = None
    ceiling_tflops: float | None = None
    ceiling: str | None = None
    agreement: float | None = None
    tf32_matmul: bool | None = None
    tf32_cudnn: bool | None = None
    timer: str | None = None

    @classmethod
    def planned(cls, config: Config, protocol: Protocol) -> ConfigResult:
        return cls(name=config.name, precision=config.precision,
                   channels_last=config.channels_last, compile=config.compile,
                   batch_size=config.batch_size, mode=config.mode, runtime=config.runtime,
                   warmup=protocol.warmup, iters=protocol.iters)

    def fill(self, raw: dict[str, Any], flops_per_image: int) -> None:
        """Turn a worker's raw measurements into the reported figures."""
        latencies = raw["latencies_s"]
        median = statistics.median(latencies)
        achieved = flops_per_image * self.batch_size / median
        self.status = "ok"
        self.latency_ms_median = median * 1e3
        self.latency_ms_p90 = _percentile(latencies, 90) * 1e3
        self.latency_ms_min = min(latencies) * 1e3
        self.throughput_ips = self.batch_size / median
        self.first_call_s = raw["first_call_s"]
        self.compile_s = max(0.0, raw["first_call_s"] - median) if self.compile else None
        self.peak_allocated_mb = raw.get("peak_allocated_mb")
        self.peak_reserved_mb = raw.get("peak_reserved_mb")
        self.rss_baseline_mb = raw.get("rss_baseline_mb")
        self.peak_rss_growth_mb = raw.get("peak_rss_growth_mb")
        self.memory_method = raw["memory_method"]
        self.flops_per_image = flops_per_image
        self.achieved_tflops = achieved / 1e12
        self.matmul_tflops = raw["matmul_flops"] / 1e12
        self.matmul_ratio = achieved / raw["matmul_flops"]
        self.tf32_matmul = raw["tf32_matmul"]
        self.tf32_cudnn = raw["tf32_cudnn"]
        self.timer = raw["timer"]
        self.peak_memory_mb = (self.peak_allocated_mb if self.peak_allocated_mb is not None
                               else self.peak_rss_growth_mb)


FIELDS = tuple(f.name for f in dataclasses.fields(ConfigResult))
"""Every configuration's entry in metrics/benchmark_details.json has exactly these keys."""


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of a short list."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


INT8_CALIBRATION = (4, 128, 256)
"""Synthetic scenes (count, height, width) the int8 configuration is calibrated on: the
benchmark has no dataset; these are seeded apart from the timed images, at the default
synthetic dataset's size (the benchmark's own if smaller)."""


def quantize_for_benchmark(fp32_onnx: Path, out: Path, seed: int, height: int,
                           width: int) -> None:
    """The int8 configuration's model: `fp32_onnx` quantised by `fcn.quantize` (minmax, the
    deploy stage's default) on INT8_CALIBRATION's scenes, random streams [seed, index, 8]
    (the timed images are [seed, index]), at most `height`×`width`."""
    from fcn.deploy import to_input
    from fcn.quantize import quantize_int8
    from fcn.synthetic import make_scene, render_image

    count, height, width = (INT8_CALIBRATION[0], min(height, INT8_CALIBRATION[1]),
                            min(width, INT8_CALIBRATION[2]))
    scenes = []
    for index in range(count):
        rng = np.random.default_rng([seed, index, 8])
        scenes.append(to_input(render_image(make_scene(width, height, rng, index), rng)[None]))
    quantize_int8(fp32_onnx, out, scenes, "minmax")


PROCESSES = ("per_config", "shared")


def jobs(configs: list[Config], processes: str) -> list[list[Config]]:
    """The configurations grouped into worker processes, in order: each alone (`per_config`,
    the benchmark stage: nothing one leaves behind colours another), or the eager PyTorch
    ones together and each compiled or onnxruntime one alone (`shared`: fewer CUDA start-ups,
    for the GPU check's short loan)."""
    if processes not in PROCESSES:
        raise ValueError(f"processes must be one of {PROCESSES}, got {processes!r}")
    if processes == "per_config":
        return [[c] for c in configs]
    eager = [c for c in configs if not c.compile and c.runtime == "torch"]
    rest = [[c] for c in configs if c.compile or c.runtime != "torch"]
    return ([eager] if eager else []) + rest


def run_benchmark(params: BenchmarkParams, model_params: ModelParams,
                  progress: bool = True, processes: str = "per_config",
                  isolate: bool = True, start_method: str = "forkserver") -> dict[str, Any]:
    """Measure every configuration `params` asks for; the JSON-ready results.

    Configurations the device cannot run are entries with status 'skipped' and a reason; a
    configuration that fails (out of memory, compiler error) is skipped with the error.
    `processes`: how configurations share worker processes (`jobs`); `isolate` False measures
    in this process instead (the GPU check's dry run, whose CUDA fakes live in this process);
    `start_method`: how worker processes start (`fcn.benchmark.worker.worker_context`).
    """
    load_start = load_average()
    protocol, configs = plan(params)
    device = torch.device(protocol.device)
    flops = counted_flops(model_params, protocol.height, protocol.width)
    boxes = window_boxes(protocol.height, protocol.width, protocol.window, protocol.stride)
    window = (boxes[0][1] - boxes[0][0], boxes[0][3] - boxes[0][2])
    slide_flops = counted_flops(model_params, *window) * len(boxes)  # the work slide mode does
    with torch.device("meta"):
        meta_model = FCN.from_params(model_params, NUM_CLASSES)
    analytic = analytic_flops(meta_model, protocol.height, protocol.width)
    log.info("%s at %dx%d: %.1f GFLOPs per image counted, %.1f analytic",
             describe(model_params), protocol.height, protocol.width, flops / 1e9,
             analytic.flops / 1e9)

    # Agreement reference: fp32, eager, smallest batch, the first layout asked for (so a run
    # of channels_last only needs no extra reference run).
    reference = Config("fp32", params.channels_last[0], False, min(c.batch_size for c in configs))
    entries = {c.name: ConfigResult.planned(c, protocol) for c in configs}
    predictions: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="fcn-benchmark-") as tmp:
        images = benchmark_images(max(c.batch_size for c in configs), protocol.height,
                                  protocol.width, protocol.seed)
        images_path, state_path = Path(tmp) / "images.npy", Path(tmp) / "state.pt"
        np.save(images_path, images)
        model = load_weights(params, model_params, images[0])
        torch.save(model.state_dict(), state_path)
        todo = sorted(configs, key=lambda c: c != reference)  # the reference first
        if reference not in configs:
            todo.insert(0, reference)
        reasons = {c.name: (runtime_support(device, c.runtime)
                            or precision_support(device, c.precision)) for c in todo}
        runnable = [c for c in todo if reasons[c.name] is None]
        onnx_path = int8_path = None
        if any(c.runtime == "onnxruntime" for c in runnable):
            from fcn.deploy import export_onnx

            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(model, onnx_path, 18)
        int8 = [c for c in runnable if c.runtime == "onnxruntime" and c.precision == "int8"]
        if int8:  # quantised here, once, like the export: workers only time it
            int8_path = Path(tmp) / "model_int8.onnx"
            try:
                quantize_for_benchmark(onnx_path, int8_path, protocol.seed, protocol.height,
                                       protocol.width)
            except Exception as exc:  # noqa: BLE001 - the int8 configuration alone is skipped
                for config in int8:
                    reasons[config.name] = (f"failed: quantisation: {type(exc).__name__}: "
                                            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}")
                runnable = [c for c in runnable if c not in int8]
        del images, model
        bar = tqdm(total=len(todo), desc="benchmark", unit="config", disable=not progress)
        for group in jobs(runnable, processes):
            job = Job(tuple(group), protocol, model_params, str(state_path), str(images_path),
                      str(onnx_path) if onnx_path else None,
                      str(int8_path) if int8_path else None)
            try:
                raws = run_isolated(job, start_method) if isolate else measure(job)
            except Exception as exc:  # noqa: BLE001 - any failure skips just these configs
                failure = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                raws = [{"error": failure.removeprefix("failed: ")}] * len(group)
            for config, raw in zip(group, raws):
                if "error" in raw:
                    reasons[config.name] = f"failed: {raw['error']}"
                    continue
                predictions[config.name] = raw.pop("prediction")
                entry = entries.get(config.name)
                if entry is not None:
                    entry.fill(raw, slide_flops if config.mode == "slide" else flops)
            bar.update(len(group))
        bar.update(len(todo) - len(runnable))
        bar.close()
        for config in todo:
            entry = entries.get(config.name)
            if entry is None:
                continue
            reason = reasons[config.name]
            if reason is not None:
                entry.status, entry.reason = "skipped", reason
                log.warning("%s skipped: %s", config.name, reason)
            else:
                log.info("%s: median %.1f ms, p90 %.1f ms, %.2f images/s, peak %s MB, "
                         "%.2f TFLOP/s = %.2f× the matmul rate", config.name,
                         entry.latency_ms_median, entry.latency_ms_p90, entry.throughput_ips,
                         "n/a" if entry.peak_memory_mb is None else
                         f"{entry.peak_memory_mb:.0f}", entry.achieved_tflops,
                         entry.matmul_ratio)
    ref = predictions.get(reference.name)
    for name, prediction in predictions.items():
        if name in entries and ref is not None:
            entries[name].agreement = float((prediction == ref).mean())
    _correct_for_load(entries)
    env = environment(device, protocol)
    set_utilisation(entries, env["device_name"] if device.type == "cuda" else None)

    results: dict[str, Any] = {
        "environment": env,
        "protocol": {**dataclasses.asdict(protocol), "weights": params.weights,
                     "timed": "model forward (logits) on an input already on the device",
                     "matmul_reps": MATMUL_REPS[device.type],
                     "processes": processes,
                     "matmul_rate": ("probed once per precision and worker process"
                                     if device.type == "cuda" else "median of the rates before, "
                                     "after each timed call, and at the end"),
                     "agreement_reference": reference.name, "min_agreement": MIN_AGREEMENT},
        "model": {"arch": model_params.arch, "backbone": model_params.backbone,
                  "fc67": model_params.fc67, "flops_counted": flops, "flops_analytic": analytic.flops,
                  "macs_analytic": analytic.macs, "other_ops_analytic": analytic.other_ops,
                  "counted_over_analytic": flops / analytic.flops},
        "configs": {name: dataclasses.asdict(entry) for name, entry in entries.items()},
    }
    results["environment"]["load_average_start"] = load_start
    results["fast_path"] = _summary(fastest_config(results))
    results["fast_path_eager"] = _summary(fastest_config(results, allow_compile=False))
    return results


def _correct_for_load(entries: dict[str, ConfigResult]) -> None:
    """images/s scaled to the least loaded moment of the run: × (best matmul rate seen at that
    precision / the rate measured alongside this configuration). On a dedicated GPU the factor
    is ~1; on a shared CPU it keeps other jobs' load from deciding the ranking (observed here:
    the same configuration's latency varying 2× with the machine's load, its matmul alike)."""
    best: dict[str, float] = {}
    for entry in entries.values():
        if entry.status == "ok":
            best[entry.precision] = max(best.get(entry.precision, 0.0), entry.matmul_tflops)
    for entry in entries.values():
        if entry.status == "ok":
            entry.throughput_ips_load_corrected = (
                entry.throughput_ips * best[entry.precision] / entry.matmul_tflops)


def set_utilisation(entries: dict[str, ConfigResult], device_name: str | None) -> None:
    """Each measured configuration's `utilisation`: its achieved FLOP/s over the ceiling at its
    precision, the datasheet peak of `device_name` (fcn.benchmark.capability.PEAK_TFLOPS)
    raised to the best rate measured in this run (any configuration's or matmul's) if higher;
    so at most 1, and `ceiling` says which it is."""
    measured: dict[str, float] = {}
    for entry in entries.values():
        if entry.status == "ok":
            measured[entry.precision] = max(measured.get(entry.precision, 0.0),
                                            entry.achieved_tflops, entry.matmul_tflops)
    for entry in entries.values():
        if entry.status != "ok":
            continue
        peak = datasheet_peak(device_name, entry.precision)
        best = measured[entry.precision]
        if peak is not None and peak >= best:
            entry.ceiling_tflops, entry.ceiling = peak, f"datasheet peak of {device_name}"
        else:
            entry.ceiling_tflops = best
            entry.ceiling = (f"best {entry.precision} rate measured in this run (above the "
                             f"datasheet peak of {device_name})" if peak is not None else
                             f"best {entry.precision} rate measured in this run (a matmul or "
                             "a configuration; no datasheet peak for this device)")
        entry.utilisation = entry.achieved_tflops / entry.ceiling_tflops


def fastest_config(results: dict[str, Any], min_agreement: float = MIN_AGREEMENT,
                   allow_compile: bool = True) -> dict[str, Any] | None:
    """The measured configuration with the most images/s (load-corrected where known) whose
    argmax predictions agree with fp32 on at least `min_agreement` of the pixels; None when
    none qualifies.

    allow_compile=False restricts the choice to eager configurations (what
    fcn.predict.predictor.Predictor can run today).
    """
    eligible = [entry for entry in results["configs"].values()
                if entry["status"] == "ok" and entry.get("runtime", "torch") == "torch"
                and entry.get("mode", "whole") == "whole" and entry["agreement"] is not None
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


def benchmark_stage(params: BenchmarkParams, model_params: ModelParams, metrics: str | Path,
                    details: str | Path, plots: str | Path) -> dict[str, Any]:
    """The benchmark stage: measure, then write the headline metrics, the details JSON and the
    plots (fcn.benchmark.report). Returns the results."""
    from fcn.benchmark.report import write_report  # matplotlib: only for writing

    results = run_benchmark(params, model_params)
    write_report(results, metrics, details, plots)
    return results
