"""Benchmark results → headline metrics, the full results JSON, a CSV for `dvc plots`, a PNG,
and a Markdown table.

Kept apart from the measuring modules so that measuring never depends on matplotlib.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

from fcn import atomic  # noqa: E402

log = logging.getLogger(__name__)


def iter_ok(results: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The configurations that were measured (not skipped), in run order."""
    return (e for e in results["configs"].values() if e["status"] == "ok")

CSV_FIELDS = ("config", "latency_ms_median", "latency_ms_p90", "throughput_ips",
              "throughput_ips_load_corrected", "peak_memory_mb", "utilisation", "agreement")


def memory_label(results: dict[str, Any]) -> str:
    """What `peak_memory_mb` means on this device."""
    if results["environment"]["device"] == "cuda":
        return "peak allocated (MB)"
    return "peak RSS growth (MB)"


def device_label(results: dict[str, Any]) -> str:
    env = results["environment"]
    if env["device"] == "cuda":
        return f"{env['device_name']} (CUDA {env['cuda']})"
    return f"{env['device_name']} CPU, {env['threads']} threads ({env['cpu_capability']})"


def write_csv(results: dict[str, Any], path: str | Path) -> None:
    """One row per measured configuration (the data of dvc.yaml's benchmark plots)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for entry in iter_ok(results):
        writer.writerow([entry["name"], *(_round(entry[k]) for k in CSV_FIELDS[1:])])
    atomic.write_text(path, buffer.getvalue())


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) and math.isfinite(value) else value


def write_figure(results: dict[str, Any], path: str | Path,
                 details_path: str | Path = "metrics/benchmark_details.json") -> None:
    """Latency (median, p90 tick) and peak memory per configuration, side by side."""
    entries = list(iter_ok(results))
    skipped = [e["name"] for e in results["configs"].values() if e["status"] != "ok"]
    height = 1.6 + 0.35 * max(1, len(entries))
    fig, (ax_lat, ax_mem) = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    names = [e["name"] for e in entries]
    ys = range(len(entries))
    ax_lat.barh(ys, [e["latency_ms_median"] for e in entries], color="#4c72b0")
    ax_lat.scatter([e["latency_ms_p90"] for e in entries], ys, marker="|", s=200, color="k",
                   label="p90", zorder=3)
    ax_lat.set_xlabel("latency per batch, median (ms)")
    if entries:
        ax_lat.legend(loc="lower right", fontsize=8)
    ax_mem.barh(ys, [e["peak_memory_mb"] or 0.0 for e in entries], color="#dd8452")  # None:
    # not measured (onnxruntime on CUDA)
    ax_mem.set_xlabel(memory_label(results))
    ax_lat.set_yticks(list(ys), names, fontsize=8)
    ax_lat.invert_yaxis()
    protocol = results["protocol"]
    title = (f"{results['model']['arch']}/{results['model']['backbone']} inference at {protocol['height']}x"
             f"{protocol['width']} on {device_label(results)}")
    fig.suptitle(title, fontsize=10)
    if skipped:
        fig.text(0.01, 0.01, f"skipped (see {details_path}): " + ", ".join(skipped),
                 fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.06 if skipped else 0, 1, 1))
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def markdown_table(results: dict[str, Any]) -> str:
    """The measured configurations as a Markdown table (see docs/performance.md)."""
    lines = ["| configuration | median ms | p90 ms | images/s | images/s load-corrected | "
             f"{memory_label(results)} | TFLOP/s | matmul TFLOP/s | × matmul | utilisation | "
             "agreement |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in iter_ok(results):
        agreement = "n/a" if e["agreement"] is None else f"{100 * e['agreement']:.4f}%"
        lines.append(
            f"| {e['name']} | {e['latency_ms_median']:.1f} | {e['latency_ms_p90']:.1f} | "
            f"{e['throughput_ips']:.3f} | {e['throughput_ips_load_corrected']:.3f} | "
            f"{_mb(e['peak_memory_mb'])} | {e['achieved_tflops']:.3f} | "
            f"{e['matmul_tflops']:.3f} | {e['matmul_ratio']:.2f} | "
            f"{100 * e['utilisation']:.0f}% of {e['ceiling_tflops']:.3g} | {agreement} |")
    skipped: dict[str, list[str]] = {}
    for e in results["configs"].values():
        if e["status"] != "ok":
            skipped.setdefault(e["reason"], []).append(e["name"])
    for reason, names in skipped.items():
        lines.append(f"| {', '.join(names)} | skipped: {reason} | | | | | | | | | |")
    return "\n".join(lines)


HEADLINE_FIELDS = ("latency_ms_median", "latency_ms_p90", "throughput_ips",
                   "throughput_ips_load_corrected", "peak_memory_mb", "utilisation",
                   "ceiling_tflops", "agreement")


def headline_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """What `dvc metrics show/diff` and `dvc exp show` list: the fp32 reference, the fast path
    (also the fastest eager one) and their speed ratio, slide mode, onnxruntime fp32 and int8
    and int8's speed over fp32 onnxruntime (median latencies of the same run), in numbers.

    The full results (environment, protocol, every configuration, skip reasons) would be
    hundreds of columns there; they go to the details JSON, per-configuration rows to the CSV.
    """
    configs = results["configs"]

    def headline(entry: dict[str, Any] | None) -> dict[str, Any] | None:
        if entry is None:
            return None
        measured = configs[entry["name"]]
        return {"config": measured["name"], **{k: measured[k] for k in HEADLINE_FIELDS}}

    reference = configs[results["protocol"]["agreement_reference"]]
    reference = reference if reference["status"] == "ok" else None
    fast = results["fast_path"]
    speedup = None
    if reference is not None and fast is not None:
        speedup = (configs[fast["name"]]["throughput_ips_load_corrected"]
                   / reference["throughput_ips_load_corrected"])
    def first(**match: str) -> dict[str, Any] | None:
        return next((e for e in iter_ok(results)
                     if all(e.get(k) == v for k, v in match.items())), None)

    slide = first(mode="slide")
    ort, int8 = (first(runtime="onnxruntime", precision=p) for p in ("fp32", "int8"))
    whole = configs.get(slide["name"].replace("-slide", "")) if slide else None
    slide_memory = None
    if slide and whole and whole["status"] == "ok" and whole["peak_memory_mb"]:
        slide_memory = slide["peak_memory_mb"] / whole["peak_memory_mb"]
    return {
        "gflops_per_image": results["model"]["flops_counted"] / 1e9,
        "reference": headline(reference),
        "fast_path": headline(fast),
        "fast_path_eager": headline(results["fast_path_eager"]),
        "fast_path_speedup": speedup,
        "slide": headline(slide),
        "slide_over_whole_memory": slide_memory,
        "onnxruntime": headline(ort),
        "onnxruntime_int8": headline(int8),
        "int8_speedup": (ort["latency_ms_median"] / int8["latency_ms_median"]
                         if ort and int8 else None),
        "configs_measured": sum(1 for _ in iter_ok(results)),
        "configs_skipped": sum(1 for e in configs.values() if e["status"] != "ok"),
    }


def write_report(results: dict[str, Any], metrics_path: str | Path, details_path: str | Path,
                 plots_dir: str | Path) -> None:
    """Headline metrics JSON, full results JSON, plots/benchmark/{configs.csv, benchmark.png},
    each written atomically."""
    plots_dir = Path(plots_dir)
    atomic.write_json(details_path, results)
    write_csv(results, plots_dir / "configs.csv")
    write_figure(results, plots_dir / "benchmark.png", details_path)
    atomic.write_json(metrics_path, headline_metrics(results))
    log.info("wrote %s, %s and %s", metrics_path, details_path, plots_dir)
