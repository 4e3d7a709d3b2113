"""The inference benchmark steps of the check: `fcn.benchmark.run.run_benchmark` at the
profile's configurations, and the latency and memory goals for one 1024x2048 image."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fcn.benchmark.run import MIN_AGREEMENT, fastest_config, run_benchmark
from fcn.gpucheck.runner import Check, Outcome, Skip, StepOverran
from fcn.params import BenchmarkParams, ModelParams

GOAL_LATENCY_MS, GOAL_STRETCH_MS, GOAL_MEMORY_BYTES = 3.0, 1.5, 0.6e9
"""One 1024x2048 image on an H100-class GPU: latency (stretch) and peak allocated memory."""
COMPILED_PRECISIONS = ("bf16", "fp16")
"""The benchmark profile compiles these (the candidates for the goals) besides timing every
precision eager."""


def benchmark_runs(params: BenchmarkParams) -> list[BenchmarkParams]:
    """The benchmark step's runs: every precision eager (with slide mode and onnxruntime),
    then compiled bf16/fp16 (a full profile; a quick one is one run)."""
    if params.profile == "quick":
        return [params]
    return [params, dataclasses.replace(params, precisions=list(COMPILED_PRECISIONS),
                                        full_compile=[True], slide=False, onnxruntime=False)]


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several run_benchmark results as one: the first's environment, model and protocol,
    every configuration, each run's protocol, and the fast paths over all of them."""
    merged = {**runs[0], "configs": {}, "protocols": [r["protocol"] for r in runs]}
    for result in runs:
        merged["configs"].update(result["configs"])
    keys = ("name", "latency_ms_median", "throughput_ips", "peak_memory_mb", "agreement")
    for name, allow in (("fast_path", True), ("fast_path_eager", False)):
        best = fastest_config(merged, allow_compile=allow)
        merged[name] = None if best is None else {k: best[k] for k in keys}
    return merged


def step_benchmark(check: Check) -> Outcome:
    """run_benchmark on the check's trained checkpoint if there is one (trained-like weights
    otherwise): passes when no configuration failed and a fast path agrees with fp32. On a
    GPU the eager configurations share one worker process (fewer CUDA start-ups). Dry: the
    quick profile on the CPU, then the CUDA protocol in this process under the fakes."""
    weights = str(check.artifacts.get("checkpoint", "trained_like"))
    params: BenchmarkParams = dataclasses.replace(check.sizes.benchmark, weights=weights)
    start = time.perf_counter()
    device = "cuda" if check.real_gpu else "cpu"
    runs, overran = [], ""
    for run in benchmark_runs(params):
        try:
            runs.append(run_benchmark(dataclasses.replace(run, device=device), ModelParams(),
                                      progress=False, processes="shared"))
        except StepOverran:  # keep what was measured: the eager run's figures
            if not runs:
                raise
            overran = f"the run of {run.precisions} compiled overran the step's allowance"
            break
    results = merge(runs)
    figures: dict[str, Any] = {"weights": weights, "seconds": time.perf_counter() - start}
    if check.fakes is not None:  # the CUDA branch of the worker, measured in this process
        faked = run_benchmark(dataclasses.replace(params, device="cuda"), ModelParams(),
                              progress=False, processes="shared", isolate=False)
        figures["fakes"] = {"configs": {k: {"status": v["status"], "reason": v["reason"],
                                            "timer": v["timer"]}
                                        for k, v in faked["configs"].items()},
                            "cuda_calls": sorted({n for n, _, _ in check.fakes.calls})}
        failed_fake = {k: v["reason"] for k, v in faked["configs"].items()
                       if v["status"] != "ok" and str(v["reason"]).startswith("failed")}
    else:
        failed_fake = {}
    check.artifacts["benchmark"] = results
    configs = results["configs"].values()
    failed = {e["name"]: e["reason"] for e in configs
              if e["status"] != "ok" and str(e["reason"]).startswith("failed")}
    failed.update({f"{k} (fakes)": v for k, v in failed_fake.items()})
    measured = sum(e["status"] == "ok" for e in configs)
    fast = results["fast_path"]
    passed = not failed and fast is not None and not overran
    figures.update(measured=measured, failed=failed, fast_path=fast, overran=overran,
                   fast_path_eager=results["fast_path_eager"],
                   skipped={e["name"]: e["reason"] for e in configs if e["status"] != "ok"},
                   results=results)
    protocol = results["protocol"]
    head = (f"{measured} configurations at {protocol['height']}x{protocol['width']}; fast path "
            + (f"{fast['name']} {fast['latency_ms_median']:.2f} ms" if fast else "none"))
    return Outcome(passed, figures, head, "" if passed else overran or (
        f"configurations failed: {failed}" if failed else "no configuration agrees with fp32"))


def step_goals(check: Check) -> Outcome:
    """The goals for one 1024x2048 image on an H100-class GPU: the fastest batch-1 whole-image
    configuration that agrees with fp32 (>= 99.9%) within 3 ms (stretch 1.5 ms) and 0.6 GB
    peak allocated."""
    results = check.artifacts["benchmark"]
    protocol = results["protocol"]
    if (protocol["height"], protocol["width"]) != (1024, 2048):
        raise Skip(f"the benchmark ran at {protocol['height']}x{protocol['width']}, the goals "
                   "are for 1024x2048")
    batch1 = {name: e for name, e in results["configs"].items()
              if e["status"] == "ok" and e["batch_size"] == 1 and e["mode"] == "whole"
              and e["runtime"] == "torch"}
    best = fastest_config({"configs": batch1})
    if best is None:
        return Outcome(False, {}, "no batch-1 configuration", "no batch-1 configuration "
                       "was measured with agreement >= 99.9%")
    eligible = [e for e in batch1.values()
                if e["agreement"] is not None and e["agreement"] >= MIN_AGREEMENT]
    leanest = min(eligible, key=lambda e: e["peak_allocated_mb"])
    both = [e["name"] for e in eligible if e["latency_ms_median"] <= GOAL_LATENCY_MS
            and e["peak_allocated_mb"] * 2**20 <= GOAL_MEMORY_BYTES]
    env = results["environment"]
    capability = env.get("compute_capability") or "0.0"
    figures = {
        "device": env.get("device_name"), "compute_capability": capability,
        "h100_class": float(capability) >= 9.0,
        "goal_latency_ms": GOAL_LATENCY_MS, "stretch_latency_ms": GOAL_STRETCH_MS,
        "goal_peak_allocated_gb": GOAL_MEMORY_BYTES / 1e9,
        "fastest": {k: best[k] for k in ("name", "latency_ms_median", "peak_allocated_mb",
                                         "agreement", "achieved_tflops")},
        "leanest": {k: leanest[k] for k in ("name", "latency_ms_median", "peak_allocated_mb")},
        "latency_met": best["latency_ms_median"] <= GOAL_LATENCY_MS,
        "stretch_met": best["latency_ms_median"] <= GOAL_STRETCH_MS,
        "memory_met_by_fastest": best["peak_allocated_mb"] * 2**20 <= GOAL_MEMORY_BYTES,
        "configs_meeting_both": both}
    met = bool(both)
    head = (f"fastest {best['name']} {best['latency_ms_median']:.2f} ms "
            f"{best['peak_allocated_mb']:.0f} MB; leanest {leanest['name']} "
            f"{leanest['peak_allocated_mb']:.0f} MB")
    note = ("" if figures["h100_class"]
            else f" (goals are for H100-class; this is {env.get('device_name')})")
    return Outcome(met, figures, head + note, "" if met else
                   f"no batch-1 configuration within {GOAL_LATENCY_MS} ms and "
                   f"{GOAL_MEMORY_BYTES / 1e9} GB" + note)
