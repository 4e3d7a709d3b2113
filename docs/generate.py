"""Regenerate the parts of the docs that state figures or parameters, from committed files.

    python docs/generate.py          # rewrite what is stale
    python docs/generate.py --check  # exit 1 naming each stale file (CI runs this via the tests)

Figures are never typed into the docs by hand: each one sits in a block

    <!-- generated: NAME -->
    ...
    <!-- /generated -->

whose body this script renders from the metrics files git holds (metrics/*.json and
metrics/train/metrics.json: `cache: false` outputs of the last clean `dvc repro`, so a fresh
clone has them; the cached outputs such as metrics/benchmark_details.json are not read) and
docs/measured/*.json (written by the scripts in benchmarks/ that say so), and docs/parameters.md is rendered whole from fcn/params.py (fields, types,
ranges, defaults, help). params.schema.json is regenerated too. So after a new `dvc repro`
(or a parameter change), one command brings every figure and table in line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fcn.params import SCHEMA_FILE, Params, type_name, json_schema  # noqa: E402

BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)",
                   re.DOTALL)


SOURCE = {"revision": None}
"""Where figures are read: the working tree (revision None) or a git revision ("HEAD")."""


def _read(relative: str) -> str:
    """A committed figures file, from the working tree or from SOURCE's revision."""
    if SOURCE["revision"] is None:
        return (ROOT / relative).read_text(encoding="utf-8")
    return subprocess.run(["git", "show", f"{SOURCE['revision']}:{relative}"], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout


def _metrics(name: str) -> dict[str, Any]:
    return json.loads(_read(f"metrics/{name}"))


def _f(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def default_run() -> str:
    """The default synthetic run's headline scores (train, evaluate, masks)."""
    train, evaluate, masks = (_metrics("train/metrics.json"), _metrics("evaluate.json"),
                              _metrics("masks.json"))
    synthesize = Params().synthesize
    fit = evaluate.get("calibration") or {}  # none with evaluate.temperature off
    return "\n".join([
        "| what | value | from |",
        "|---|---:|---|",
        f"| synthetic images (train/val/test) | {masks['per_split'].get('train', 0)} / "
        f"{masks['per_split'].get('val', 0)} / {masks['per_split'].get('test', 0)} at "
        f"{synthesize.height}×{synthesize.width} | metrics/masks.json |",
        f"| masks written | {masks['files_written']} ({', '.join(masks['encodings_written'])}) "
        "| metrics/masks.json |",
        f"| epochs trained | {train['step'] + 1} (best: epoch {train['best']['epoch']}) "
        "| metrics/train/metrics.json |",
        f"| val mIoU (training's validation) | {_f(train['val']['miou'])} "
        "| metrics/train/metrics.json |",
        f"| val class IoU / iIoU (official) | {_f(evaluate['class_iou_mean'])} / "
        f"{_f(evaluate['class_iiou_mean'])} | metrics/evaluate.json |",
        f"| val category IoU / iIoU (official) | {_f(evaluate['category_iou_mean'])} / "
        f"{_f(evaluate['category_iiou_mean'])} | metrics/evaluate.json |",
        f"| val mean Dice, mean pixel accuracy, pixel accuracy | {_f(evaluate['mean_dice'])}, "
        f"{_f(evaluate['mean_pixel_accuracy'])}, {_f(evaluate['pixel_accuracy'])} "
        "| metrics/evaluate.json |",
        f"| val Boundary IoU; trimap IoU within 1 / 32 px of an edge | "
        f"{_f(evaluate['boundary_iou'])}; {_f(evaluate['trimap_iou']['1px'])} / "
        f"{_f(evaluate['trimap_iou']['32px'])} | metrics/evaluate.json |",
        f"| val ECE; fitted temperature (ECE on its sample before → after) | "
        f"{_f(evaluate.get('ece'))}; {_f(fit.get('temperature'), 3)} "
        f"({_f(fit.get('ece_before'))} → {_f(fit.get('ece_after'))}) | metrics/evaluate.json |",
    ])


def benchmark_headline() -> str:
    b = _metrics("benchmark.json")
    fast, ref = b["fast_path"], b["reference"]
    lines = [f"- FLOPs per 1024×2048 image: {b['gflops_per_image']:.1f} G."]
    if ref:
        lines.append(f"- fp32 reference `{ref['config']}`: {ref['latency_ms_median']:.0f} ms "
                     f"median, peak memory {ref['peak_memory_mb']:.0f} MB.")
    if fast:
        ceiling = (f"{100 * fast['utilisation']:.0f}% of the {fast['ceiling_tflops']:.3g} TFLOP/s "
                   "ceiling")
        lines.append(f"- Fast path `{fast['config']}` (chosen among the PyTorch configurations "
                     f"evaluate and export run; onnxruntime is not a candidate): "
                     f"{fast['latency_ms_median']:.0f} ms median, "
                     f"{fast['throughput_ips']:.3f} images/s, {ceiling}, argmax agreement with "
                     f"fp32 {100 * fast['agreement']:.4f}%; {b['fast_path_speedup']:.2f}× the "
                     "reference.")
    slide, ort = b.get("slide"), b.get("onnxruntime")
    if slide:
        lines.append(f"- Slide mode `{slide['config']}`: {slide['latency_ms_median']:.0f} ms, "
                     f"peak memory {slide['peak_memory_mb']:.0f} MB = "
                     f"{b['slide_over_whole_memory']:.2f}× whole-image inference's.")
    if ort:
        lines.append(f"- onnxruntime `{ort['config']}`: {ort['latency_ms_median']:.0f} ms, "
                     f"peak memory {ort['peak_memory_mb']:.0f} MB, argmax agreement "
                     f"{100 * ort['agreement']:.4f}%.")
    int8 = b.get("onnxruntime_int8")
    if int8:
        speedup = (f"; {b['int8_speedup']:.2f}× onnxruntime fp32's speed"
                   if b.get("int8_speedup") else "")
        lines.append(f"- onnxruntime int8 `{int8['config']}` (the deploy stage's quantisation, "
                     f"calibrated on synthetic scenes): {int8['latency_ms_median']:.0f} ms, "
                     f"peak memory {int8['peak_memory_mb']:.0f} MB, argmax agreement with fp32 "
                     f"{100 * int8['agreement']:.4f}%{speedup}.")
    lines.append(f"- Configurations measured: {b['configs_measured']}, skipped (device lacks "
                 f"them): {b['configs_skipped']}.")
    return "\n".join(lines)


def deploy_result() -> str:
    """The deploy stage's check (metrics/deploy.json) and timings (deploy_latency.json)."""
    d = {**_metrics("deploy.json"), **_metrics("deploy_latency.json")}
    ms, miou, int8 = d["latency_ms"], d.get("miou", {}), d.get("int8")
    size = f"{d['latency_height']}×{d['latency_width']}"
    lines = [
        "| what | value |", "|---|---:|",
        f"| argmax agreement with PyTorch on val | {100 * d['agreement']:.4f}% of "
        f"{d['pixels']} pixels ({d['images']} images) |",
        f"| largest logit difference | {d['max_abs_logit_diff']:.2g} |",
        f"| ONNX file (opset {d['opset']}) | {d['file_mb']:.1f} MB |",
        f"| CPU latency at {size}, PyTorch fp32 channels-last | {ms['torch']:.0f} ms |",
        f"| CPU latency at {size}, onnxruntime | "
        f"{ms['onnxruntime']:.0f} ms ({d['onnxruntime_speedup']:.2f}× PyTorch) |",
    ]
    if miou:
        lines.append("| val mIoU (official class IoU): PyTorch fp32 / onnxruntime fp32"
                     + (" / int8" if "onnxruntime_int8" in miou else "") + " | "
                     + " / ".join(f"{value:.4f}" for value in miou.values()) + " |")
    if int8 and "onnxruntime_int8" in ms:
        lines += [
            f"| int8: argmax agreement with PyTorch fp32 on val | {100 * int8['agreement']:.4f}% "
            f"(largest logit difference {int8['max_abs_logit_diff']:.2g}) |",
            f"| int8: val mIoU drop from PyTorch fp32 | {int8['miou_drop']:.4f} |",
            f"| int8 ONNX file ({int8['calibration_images']} calibration images) | "
            f"{int8['file_mb']:.1f} MB |",
            f"| CPU latency at {size}, onnxruntime int8 | {ms['onnxruntime_int8']:.0f} ms "
            f"({d['int8_speedup']:.2f}× onnxruntime fp32) |",
        ]
    return "\n".join(lines)


def inference_modes() -> str:
    """docs/measured/inference_modes.json (benchmarks/inference_modes.py) as a table."""
    m = json.loads(_read("docs/measured/inference_modes.json"))
    lines = [f"Val of the default synthetic run: {m['images']} images of "
             f"{m['image_size'][0]}×{m['image_size'][1]}, {m['threads']} CPU threads, fp32 "
             f"(`{m['command']}`; slide windows {m['window'][0]}×{m['window'][1]}, stride "
             f"{m['stride'][0]}×{m['stride'][1]}).", "",
             "| option | class IoU | category IoU | ms per image |", "|---|---:|---:|---:|"]
    for row in m["rows"]:
        lines.append(f"| {row['option']} | {row['class_iou']:.4f} | {row['category_iou']:.4f} "
                     f"| {row['ms_per_image']:.0f} |")
    return "\n".join(lines)


def _measured(name: str) -> dict[str, Any]:
    return json.loads(_read(f"docs/measured/{name}"))


def class_sampling() -> str:
    """docs/measured/class_sampling.json (benchmarks/class_sampling.py) as a table."""
    m = _measured("class_sampling.json")
    rows = {r["setting"]: r for r in m["rows"]}
    names = ["random crops", "class_uniform 0.5", "cat_max_ratio 0.75", "both"]
    lines = [f"{m['samples']} crops of {m['crop'][0]}×{m['crop'][1]} per setting from the "
             f"default synthetic train split ({m['image_size'][0]}×{m['image_size'][1]} images), "
             f"one thread, best of {m['rounds']} rounds (`{m['command']}`). Share of crops "
             "holding each class:", "",
             "| class | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for cls in rows["random crops"]["class_share"]:
        lines.append(f"| {cls} | " + " | ".join(f"{rows[n]['class_share'][cls]:.3f}"
                                                for n in names) + " |")
    lines.append("| **samples/s per core** (× the loader before this change) | " + " | ".join(
        f"{rows[n]['samples_per_s_per_core']:.0f} ({rows[n]['ratio_to_today']:.2f}×)"
        for n in names) + " |")
    return "\n".join(lines)


def evaluate_analysis_cost() -> str:
    """docs/measured/evaluate_analysis.json (benchmarks/evaluate_analysis.py)."""
    m = _measured("evaluate_analysis.json")
    peaks = ", ".join(f"{mb:.0f} MB over {n} images" for n, mb in m["peak_python_mb"].items())
    return "\n".join([
        f"{m['images']} synthetic val images of {m['image_size'][0]}×{m['image_size'][1]}, fp32 "
        f"on {m['threads']} CPU threads, best of {m['rounds']} interleaved rounds "
        f"(`{m['command']}`):", "",
        "| what | value |", "|---|---:|",
        f"| evaluate, official scores only | {m['ms_per_image_before']:.0f} ms per image |",
        f"| with the analysis (Boundary IoU, trimap, ECE, temperature sample, row, gallery) | "
        f"{m['ms_per_image_streaming']:.0f} ms per image "
        f"({m['streaming_added_percent']:+.1f}%) |",
        f"| the temperature fit, once per run ({m['temperature_pixels']:,} pixels) | "
        f"{m['temperature_fit_s']:.2f} s |",
        f"| all of it over these {m['images']} images / over Cityscapes' 500 val images | "
        f"{m['added_percent_here']:+.1f}% / {m['added_percent_at_500_images']:+.1f}% |",
        f"| peak Python memory of an analysed run | {peaks} |",
    ])


def loader_throughput() -> str:
    """docs/measured/loader_throughput.json (benchmarks/loader_throughput.py) as a table."""
    m = _measured("loader_throughput.json")
    r = m["recipe"]
    steps = m["breakdown_ms_per_sample"]
    old, new = steps["old"], steps["new"]
    device_jitter = next(v for k, v in new.items() if k.startswith("photometric"))
    gpu = m["gpu"]
    lines = [f"One core (`torch.set_num_threads(1)`), {r['image'][0]}×{r['image'][1]} images, "
             f"crop {r['crop'][0]}×{r['crop'][1]}, scale {r['scale'][0]}–{r['scale'][1]}, "
             f"flip, jitter {r['jitter']}, batches of {r['batch']}, {m['samples']} samples, "
             f"best of {m['rounds']} interleaved rounds (`{m['command']}`, {m['machine']}):", "",
             "| path | samples/s per core | read / decode | geometry | photometric | collate |",
             "|---|---:|---:|---:|---:|---:|",
             f"| old: PNG decode, whole-image resize, jitter in uint8 | "
             f"{m['old_samples_per_s_per_core']:.1f} | {old['read/decode']:.1f} ms | "
             f"{old['geometry']:.1f} ms | {old['photometric']:.1f} ms | {old['collate']:.2f} ms |",
             f"| **new: decoded cache, crop-only resize, uint8 out** | "
             f"**{m['samples_per_s_per_core']:.1f}** ({m['ratio']:.1f}×) | "
             f"{new['read/decode']:.2f} ms | {new['geometry']:.2f} ms | on the device | "
             f"{new['collate']:.2f} ms |",
             f"| new without the cache (`decode.enabled: false`) | "
             f"{m['new_png_samples_per_s_per_core']:.1f} | PNG decode | as new | on the device "
             "| as new |", "",
             f"The jitter the new path moves to the device costs {device_jitter:.0f} ms per "
             "sample on this CPU's one core (float32, batched): on a GPU it is a few "
             "element-wise passes; on a CPU it is training-process work. PNG decoders on one "
             "1024×2048 photo: " + ", ".join(f"{k} {v:.1f} ms" for k, v in m["decode_ms"].items())
             + ".", "",
             f"**What a GPU takes.** One {r['crop'][0]}×{r['crop'][1]} training sample is "
             f"{gpu['sample_gflop']:.0f} GFLOP (3 × the forward pass); an H100 at 40–80% of "
             f"990 dense bf16 TFLOP/s takes {gpu['h100_samples_per_s'][0]:.0f}–"
             f"{gpu['h100_samples_per_s'][1]:.0f} samples/s. At the rates above that needs "
             f"{gpu['cores_needed']['new'][0]:.1f}–{gpu['cores_needed']['new'][1]:.1f} loader "
             f"cores with the new path, {gpu['cores_needed']['old'][0]:.0f}–"
             f"{gpu['cores_needed']['old'][1]:.0f} with the old one."]
    verify = m.get("cache_verify")
    if verify:
        per_gb = verify["seconds_per_gb"]
        lines += ["", f"**Checking the cache.** Before its first step a run checks every array "
                  f"of the cache, and every source PNG, against the SHA-256 the decode stage "
                  f"recorded: {per_gb:.2f} s per GB of arrays on one thread here (their sources "
                  f"hashed too), so real Cityscapes' ~28 GB of train+val arrays and ~8 GB of "
                  f"PNGs take at most about {36 * per_gb:.0f} s on one thread, "
                  f"{36 * per_gb / 8:.0f} s on the 8 threads it uses where there are 8 cores "
                  "(while the data are read from disk the first time, the disk sets the pace "
                  "instead)."]
    return "\n".join(lines)


CITYSCAPES = {"train": 2975, "val": 500, "test": 1525}
RECIPE_SAMPLES = 80_000 * 8
"""The named recipe: 80k iterations of batch 8."""


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _seconds(per_image: float) -> str:
    """A per-image time from two runs' difference: below the timing noise, say so."""
    return "< 0.05 s" if per_image < 0.05 else f"{per_image:.2f} s"


def _range(seconds: list[float]) -> str:
    low, high = _duration(min(seconds)), _duration(max(seconds))
    return low if low == high else f"{low}–{high}"


def cityscapes_costs() -> str:
    """What real Cityscapes costs, stage by stage: the rehearsal's measurements
    (docs/measured/rehearsal.json) scaled to 2,975 / 500 / 1,525 images on this CPU, and
    estimated for 16 cores with one H100 from the loader and FLOP figures."""
    m = _measured("rehearsal.json")
    loader = _measured("loader_throughput.json")
    hashing = _measured("dvc_hashing.json")
    stages = m["stages"]
    n = CITYSCAPES
    counts = {"masks": n["train"] + n["val"] + n["test"], "class_weights": n["train"],
              "decode": n["train"] + n["val"], "evaluate": n["val"], "export": n["test"],
              "deploy": n["val"]}
    cpu_forward = _metrics("benchmark.json")["fast_path"]["latency_ms_median"] / 1e3
    decode_s = loader["decode_ms"]["torchvision.io"] / 1e3
    gflop = _metrics("benchmark.json")["gflops_per_image"]
    h100 = [990e3 * u for u in (0.4, 0.8)]  # GFLOP/s at 40-80% of the bf16 peak
    gpu_forward = [gflop / rate for rate in h100]
    cores = 16 / m["cores"]
    rows = ["| stage | what | per image here | peak memory | disk | real Cityscapes here "
            "| 16 cores + 1 H100 (estimate) |", "|---|---|---:|---:|---:|---:|---:|"]
    for stage in ("masks", "class_weights", "decode", "evaluate", "export", "deploy"):
        s = stages[stage]
        per = s["seconds_per_image"]
        here = max(per, 0.0) * counts[stage] + s["startup_seconds"]
        if stage in ("evaluate", "export"):  # the same I/O and scoring; the forward on a GPU
            rest = max(per - cpu_forward, decode_s)  # at least reading the image
            gpu_text = _range([(rest + f) * counts[stage] for f in gpu_forward])
        elif stage == "class_weights":  # one process: as here
            gpu_text = _duration(here)
        else:  # masks.workers / decode.workers processes on 8x the cores
            gpu_text = _duration(here / cores)
        disk = (s["disk_mb_per_image"] * counts[stage] + s["disk_mb_fixed"]) / 1e3
        rows.append(f"| {stage} | {counts[stage]:,} images | {_seconds(per)} | "
                    f"{s['peak_rss_mb'] / 1e3:.1f} GB | {disk:.1f} GB | {_duration(here)} | "
                    f"{gpu_text} |")
    t = m["train_last_epoch"]
    per_sample = (t["data_s"] + t["compute_s"]) / (m["samples"] / 2)  # 2 epochs in the rehearsal
    per_val = t["val_s"] / m["images"]["val"]
    epochs = math.ceil(RECIPE_SAMPLES / n["train"])
    takes = loader["gpu"]["h100_samples_per_s"]
    rows.append(f"| train | {RECIPE_SAMPLES:,} samples (80k × 8) | {per_sample:.1f} s per "
                f"sample | {stages['train']['peak_rss_mb'] / 1e3:.1f} GB | "
                f"{stages['train']['disk_mb'] / 1e3:.1f} GB | {_duration(per_sample * RECIPE_SAMPLES)} "
                f"| {_range([RECIPE_SAMPLES / rate for rate in takes])} |")
    rows.append(f"| validation | {n['val']} images × {epochs} epochs | {per_val:.1f} s | "
                f"(in train) | – | {_duration(per_val * n['val'] * epochs)} | "
                f"{_range([n['val'] * f * epochs for f in gpu_forward])} |")
    b = stages["benchmark"]
    rows.append(f"| benchmark | fixed | – | {b['peak_rss_mb'] / 1e3:.1f} GB | – | "
                f"{_duration(b['seconds'])} | not measured |")
    first = hashing["gb"] / hashing["first_gb_per_s"]
    lines = [*rows, "",
             f"Measured here ({m['machine']}, {m['cores']} cores; `{m['command']}`, "
             f"{m['images']['train']}/{m['images']['val']}/{m['images']['test']} images, then "
             f"{m.get('more', 2)}× as many): *per image*, *peak memory* (the stage's largest process) and "
             "*disk* (the stage's outputs: per image from the two runs' difference, plus what "
             "does not grow with the images; DVC's cache holds a second copy unless it links; "
             "synthetic masks compress better than real ones, decoded arrays are exactly 8 MB a "
             "pair). *Real Cityscapes here* multiplies the measured "
             "cost per image by the real counts (plus the stage's start-up); train multiplies "
             "its measured seconds per sample (DVCLive `time/*`) by the recipe's samples. The "
             "last column is an **estimate**, not a measurement: train at the H100's 835–1,670 "
             "samples/s (40–80% of its bf16 peak, the loader section above: the loader keeps up "
             f"with ~{loader['gpu']['cores_needed']['new'][1]:.0f} cores); validation, evaluate "
             f"and export with the forward pass at that rate ({gflop:.0f} GFLOP per image) "
             "and the rest (reading, scoring, writing: the time per image here minus the "
             "benchmark stage's forward pass, at least one PNG decode) as measured here; masks "
             "and decode with 8× the workers on 8× the cores (`masks.workers`, "
             "`decode.workers`), class_weights (one process) as here.", "",
             f"A repeated `dvc repro` with nothing changed cost "
             f"{max(s['repeat_seconds'] for s in stages.values()):.1f} s or less per stage here. "
             f"At real scale DVC first hashes the dependencies: {hashing['files']:,} files of "
             f"2–5 MB ({hashing['gb']:.1f} GB) took {first:.0f} s the first time "
             f"({hashing['first_gb_per_s']:.2f} GB/s, page cache "
             f"{'dropped' if hashing['page_cache_dropped'] else 'warm'}), "
             f"{hashing['second_status_s']:.1f} s every later time (`{hashing['command']}`)."]
    return "\n".join(lines)



def train_throughput() -> str:
    """benchmarks/train_throughput.py's figures: the step before and after its host reads were
    removed, and compiled, from one run."""
    m = _measured("train_throughput.json")
    height, width = m["crop"]
    lines = [f"`{m['command']}` on {m['device']}: FCN8s/{m['backbone']} {m['precision']}, "
             f"batch {m['batch']}, crop {height}×{width}, jitter on, "
             f"{m['flops_per_step'] / 1e9:.1f} GFLOP per step; fp32 matmul "
             f"{m['matmul_gflops']:.0f} GFLOP/s in the same run.", "",
             "| training step | ms per step (best of rounds) | images/s | first steps (s) |",
             "|---|---:|---:|---:|"]
    labels = {"before": "before: the host read the loss, the confusion matrix and the jitter "
                        "groups every step",
              "after": "after: `TrainStep`, nothing read back",
              "compiled": "`train.compile`: `TrainStep` over `torch.compile(model)`"}
    for name, v in m["variants"].items():
        lines.append(f"| {labels[name]} | {v['ms_per_step']:.1f} | {v['images_per_s']:.2f} | "
                     f"{v['warmup_s']:.1f} |")
    lines += ["", f"After / before: {m['after_over_before']:.3f}× the throughput"
              + ("" if m["compiled_over_eager"] is None else
                 f"; compiled / eager: {m['compiled_over_eager']:.3f}×") + "."]
    return "\n".join(lines)


def gpu_check_estimate() -> str:
    """Each GPU-check profile's estimated seconds per step on one H100 (fcn.gpucheck.profiles,
    with the dry run's default host cost): code constants and sizes, no measurement."""
    from fcn.gpucheck import profiles
    from fcn.gpucheck.__main__ import DEFAULT_HOST_S_PER_MEGAPIXEL

    lines = ["| profile | estimated seconds | budget | largest steps (s) |",
             "|---|---:|---:|---|"]
    for name in ("loan", "benchmark"):
        steps = profiles.estimate(name, profiles.cuda_sizes(), DEFAULT_HOST_S_PER_MEGAPIXEL, 1)
        top = sorted(steps.items(), key=lambda kv: -kv[1])[:5]
        lines.append(f"| {name} | {sum(steps.values()):.0f} | {profiles.BUDGET_S[name]:.0f} | "
                     + ", ".join(f"{k} {v:.0f}" for k, v in top) + " |")
    assumed = profiles.ASSUMED
    lines += ["", "Assumed: sustained " + ", ".join(
        f"{k} {v:.0f}" for k, v in assumed["tflops"].items()) + " TFLOP/s; a CUDA process "
        f"start {assumed['process_start_s']:.0f} s; a training compile "
        f"{assumed['compile_train_s']:.0f} s, an inference compile "
        f"{assumed['compile_infer_s']:.0f} s; cuDNN autotuning {assumed['autotune_s']:.0f} s per "
        f"shape; host work over {assumed['cuda_cores']} cores at "
        f"{DEFAULT_HOST_S_PER_MEGAPIXEL} s per megapixel on one core."]
    return "\n".join(lines)


def timing_outputs() -> str:
    """fcn.outputs.TIMING_OUTPUTS: the outputs that hold this machine's figures."""
    from fcn.outputs import TIMING_OUTPUTS

    return "\n".join(["| output | holds |", "|---|---|"]
                     + [f"| `{path}` | {what} |" for path, what in TIMING_OUTPUTS.items()])


BLOCKS: dict[str, Callable[[], str]] = {
    "default-run": default_run, "benchmark-headline": benchmark_headline,
    "deploy-result": deploy_result, "inference-modes": inference_modes,
    "loader-throughput": loader_throughput, "cityscapes-costs": cityscapes_costs,
    "gpu-check-estimate": gpu_check_estimate, "train-throughput": train_throughput,
    "timing-outputs": timing_outputs, "evaluate-analysis-cost": evaluate_analysis_cost,
    "class-sampling": class_sampling,
}


def parameters_doc() -> str:
    """docs/parameters.md: every section and key of params.yaml."""
    lines = ["# Parameters", "",
             "Every key of `params.yaml`, generated from `fcn/params.py` by `docs/generate.py`",
             "(do not edit by hand). `load_params` checks the whole file before a stage does any",
             "work and lists every problem at once; editors check it against",
             f"`{SCHEMA_FILE}` (the first line of params.yaml points them there).", ""]
    hints = typing.get_type_hints(Params)
    for section in dataclasses.fields(Params):
        cls = hints[section.name]
        lines += [f"## `{section.name}`", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            lines += [" ".join(cls.__doc__.split()), ""]
        lines += ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        types_ = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            bounds = [f"{word} {meta[k]}" for k, word in
                      (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")) if meta.get(k) is not None]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{f.name}` | {type_name(types_[f.name])} | `{json.dumps(default)}` | "
                         f"{', '.join(bounds)} | {meta.get('help', '').replace('|', chr(92) + '|')} |")
        lines.append("")
    return "\n".join(lines)


def render() -> dict[Path, str]:
    """Every generated file's expected content."""
    out: dict[Path, str] = {ROOT / "docs" / "parameters.md": parameters_doc(),
                            ROOT / SCHEMA_FILE: json.dumps(json_schema(), indent=2) + "\n"}
    for path in sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")]):
        if path in out:
            continue
        text = path.read_text(encoding="utf-8")

        def fill(match: re.Match[str], path: Path = path) -> str:
            name = match.group("name")
            if name not in BLOCKS:
                raise SystemExit(f"{path}: unknown generated block {name!r} "
                                 f"(known: {', '.join(BLOCKS)})")
            return f"{match.group(1)}{BLOCKS[name]()}\n{match.group(4)}"

        out[path] = BLOCK.sub(fill, text)
    return out


def _committed() -> dict[Path, str] | None:
    """The docs as HEAD's figures make them (None outside a git checkout, or where HEAD
    lacks a file the working tree's docs read: a change not yet committed)."""
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=ROOT,
                      capture_output=True).returncode != 0:
        return None
    SOURCE["revision"] = "HEAD"
    try:
        return render()
    except subprocess.CalledProcessError:
        return None
    finally:
        SOURCE["revision"] = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only report stale files: a doc is current when it equals what "
                             "the committed figures (HEAD) make, or what the working tree's "
                             "make (a `make repro` rewrites the timing files; CI's fresh clone "
                             "has only the committed ones)")
    args = parser.parse_args()
    stale = stale_docs(check=args.check)
    if stale and args.check:
        print(f"stale: {', '.join(stale)} (run: python docs/generate.py)", file=sys.stderr)
        return 1
    if stale:
        print(f"rewrote {', '.join(stale)}")
    return 0


def stale_docs(check: bool = True) -> list[str]:
    """The docs that differ from what the working tree's figures make and (with `check`) from
    what the committed ones make; without `check` they are rewritten."""
    stale = []
    committed = _committed() if check else None
    for path, text in render().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text and (committed is None or current != committed.get(path)):
            stale.append(path.relative_to(ROOT).as_posix())
            if not check:
                path.write_text(text, encoding="utf-8")
    return stale


if __name__ == "__main__":
    sys.exit(main())
