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


def _metrics(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "metrics" / name).read_text(encoding="utf-8"))


def _f(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def default_run() -> str:
    """The default synthetic run's headline scores (train, evaluate, masks)."""
    train, evaluate, masks = (_metrics("train/metrics.json"), _metrics("evaluate.json"),
                              _metrics("masks.json"))
    synthesize = Params().synthesize
    return "\n".join([
        "| what | value | from |",
        "|---|---:|---|",
        f"| synthetic images (train/val/test) | {masks['per_split'].get('train', 0)} / "
        f"{masks['per_split'].get('val', 0)} / {masks['per_split'].get('test', 0)} at "
        f"{synthesize.height}×{synthesize.width} | metrics/masks.json |",
        f"| masks written | {masks['files_written']} ({', '.join(masks['encodings_written'])}) "
        "| metrics/masks.json |",
        f"| epochs trained | {train['step'] + 1} (best: epoch {train['best']['epoch'] + 1}) "
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
    ])


def benchmark_headline() -> str:
    b = _metrics("benchmark.json")
    fast, ref = b["fast_path"], b["reference"]
    lines = [f"- FLOPs per 1024×2048 image: {b['gflops_per_image']:.1f} G."]
    if ref:
        lines.append(f"- fp32 reference `{ref['config']}`: {ref['latency_ms_median']:.0f} ms "
                     f"median, peak memory {ref['peak_memory_mb']:.0f} MB.")
    if fast:
        lines.append(f"- Fast path `{fast['config']}`: {fast['latency_ms_median']:.0f} ms median, "
                     f"{fast['throughput_ips']:.3f} images/s, {100 * fast['utilisation']:.0f}% of "
                     f"the measured matmul rate, argmax agreement with fp32 "
                     f"{100 * fast['agreement']:.4f}%; {b['fast_path_speedup']:.2f}× the reference.")
    slide, ort = b.get("slide"), b.get("onnxruntime")
    if slide:
        lines.append(f"- Slide mode `{slide['config']}`: {slide['latency_ms_median']:.0f} ms, "
                     f"peak memory {slide['peak_memory_mb']:.0f} MB = "
                     f"{b['slide_over_whole_memory']:.2f}× whole-image inference's.")
    if ort:
        lines.append(f"- onnxruntime `{ort['config']}`: {ort['latency_ms_median']:.0f} ms, "
                     f"peak memory {ort['peak_memory_mb']:.0f} MB, argmax agreement "
                     f"{100 * ort['agreement']:.4f}%.")
    lines.append(f"- Configurations measured: {b['configs_measured']}, skipped (device lacks "
                 f"them): {b['configs_skipped']}.")
    return "\n".join(lines)


def deploy_result() -> str:
    """The deploy stage's check and timings (metrics/deploy.json)."""
    d = _metrics("deploy.json")
    ms = d["latency_ms"]
    return "\n".join([
        "| what | value |", "|---|---:|",
        f"| argmax agreement with PyTorch on val | {100 * d['agreement']:.4f}% of "
        f"{d['pixels']} pixels ({d['images']} images) |",
        f"| largest logit difference | {d['max_abs_logit_diff']:.2g} |",
        f"| ONNX file (opset {d['opset']}) | {d['file_mb']:.1f} MB |",
        f"| CPU latency at {d['latency_height']}×{d['latency_width']}, PyTorch fp32 "
        f"channels-last | {ms['torch']:.0f} ms |",
        f"| CPU latency at {d['latency_height']}×{d['latency_width']}, onnxruntime | "
        f"{ms['onnxruntime']:.0f} ms ({d['onnxruntime_speedup']:.2f}× PyTorch) |",
    ])


def inference_modes() -> str:
    """docs/measured/inference_modes.json (benchmarks/inference_modes.py) as a table."""
    m = json.loads((ROOT / "docs" / "measured" / "inference_modes.json").read_text("utf-8"))
    lines = [f"Val of the default synthetic run: {m['images']} images of "
             f"{m['image_size'][0]}×{m['image_size'][1]}, {m['threads']} CPU threads, fp32 "
             f"(`{m['command']}`; slide windows {m['window'][0]}×{m['window'][1]}, stride "
             f"{m['stride'][0]}×{m['stride'][1]}).", "",
             "| option | class IoU | category IoU | ms per image |", "|---|---:|---:|---:|"]
    for row in m["rows"]:
        lines.append(f"| {row['option']} | {row['class_iou']:.4f} | {row['category_iou']:.4f} "
                     f"| {row['ms_per_image']:.0f} |")
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[], str]] = {
    "default-run": default_run, "benchmark-headline": benchmark_headline,
    "deploy-result": deploy_result, "inference-modes": inference_modes,
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args()
    stale = []
    for path, text in render().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            stale.append(path.relative_to(ROOT).as_posix())
            if not args.check:
                path.write_text(text, encoding="utf-8")
    if stale and args.check:
        print(f"stale: {', '.join(stale)} (run: python docs/generate.py)", file=sys.stderr)
        return 1
    if stale:
        print(f"rewrote {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
