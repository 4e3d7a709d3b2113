"""A full-resolution rehearsal of the whole pipeline, stage by stage: what each costs per image,
its peak memory, its disk per image, and what repeating it costs.

    .venv/bin/python benchmarks/rehearsal.py [--args recipes/rehearsal_1024x2048.args]
        [--more 4] [--until STAGE] [--workdir DIR] [--out docs/measured/rehearsal.json]
        [--smoke]

It clones this repository's HEAD into a temporary folder, applies the overrides of `--args`
to params.yaml as `dvc exp run -S` would (the same file the documented command uses:
`dvc exp run -n rehearsal $(cat recipes/rehearsal_1024x2048.args)`), and runs every stage in
order with `dvc repro --single-item <stage>`, each in its own process tree, timing the wall
clock and the peak resident memory of its largest process. Then it runs each stage's command
again the same way: DVC finds nothing changed and only checks (hashes) the stage's
dependencies, which is what a repeated `dvc repro` costs. Last, it multiplies the images of
every split by `--more` and reruns the stages whose work grows with them (masks,
class_weights, decode, evaluate, export, deploy): the difference of the two runs over the
added images is the cost (time and disk) per image, without the start-up (imports, loading the model) or the fixed outputs (figures, the
ONNX file) that a few images would inflate. Disk is the size of each stage's
outputs in the workspace (DVC's cache holds a second copy unless it links). The train stage's
own per-epoch timings (DVCLive `time/*`) give the cost per training sample and per validated
image. docs/generate.py turns the JSON into the cost table of docs/performance.md, with the
extrapolation to real Cityscapes. Without `--workdir` the clone lives in a temporary folder,
removed at the end. `--until STAGE` stops after that stage (both passes).

`--smoke` is a real run at a tiny size that CI runs so the script cannot rot: clone, SMOKE_ARGS
instead of `--args` (64x128 images, 2/1/1 per split, 2 training iterations, CPU), every stage
up to train timed, repeated and (the per-image ones) run again on `--more 2` times the images,
the train stage's timings read, the figures printed. It stops after train (`--until train`)
because the later stages, at this size, cost only their start-up (importing torch, loading the
model: 7-13 s each here, the benchmark stage's worker processes ~45 s) and go through the same
loop; `--smoke --until benchmark` runs them too (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("synthesize", "masks", "class_weights", "decode", "train", "evaluate", "export",
          "deploy", "benchmark")
PER_IMAGE = {"masks": ("train", "val", "test"), "class_weights": ("train",),
             "decode": ("train", "val"), "evaluate": ("val",), "export": ("test",),
             "deploy": ("val",)}
"""The stages timed again on twice the images, and the splits whose images they process."""
WRAP = ("import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[2:]).returncode\n"
        "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN)"
        ".ru_maxrss))\n"
        "sys.exit(code)")
"""Runs a command and writes the peak RSS (KiB) of its largest descendant to a file."""
SMOKE_ARGS = """\
-S synthesize.height=64
-S synthesize.width=128
-S synthesize.train_cities=[aachen]
-S synthesize.val_cities=[frankfurt]
-S synthesize.test_cities=[berlin]
-S synthesize.train_per_city=2
-S synthesize.val_per_city=1
-S synthesize.test_per_city=1
-S synthesize.train_extra_cities=[]
-S masks.workers=1
-S masks.worst=1
-S masks.figure_images=1
-S decode.workers=1
-S train.epochs=null
-S train.iterations=2
-S train.batch_size=2
-S train.crop=[64,64]
-S train.workers=0
-S train.device=cpu
-S train.monitor_system=false
-S evaluate.batch_size=1
-S evaluate.samples=1
-S evaluate.sample_width=64
-S evaluate.device=cpu
-S evaluate.workers=1
-S export.batch_size=1
-S export.overlays=1
-S export.gif_frames=1
-S export.gif_width=64
-S export.device=cpu
-S export.workers=1
-S deploy.height=64
-S deploy.width=128
-S deploy.warmup=0
-S deploy.iters=1
-S deploy.threads=1
-S benchmark.device=cpu
-S benchmark.height=64
-S benchmark.width=128
-S benchmark.precisions=[fp32]
-S benchmark.channels_last=[false]
-S benchmark.threads=1
-S benchmark.quick_batch_sizes=[1]
-S benchmark.quick_warmup=1
-S benchmark.quick_iters=1
-S benchmark.quick_compile=[false]
-S benchmark.matmul_size=256
"""
"""The overrides of a `--smoke` run, in the format of recipes/*.args."""


def overrides(args_text: str) -> dict[str, Any]:
    """`-S section.key=value` lines → {dotted: value}, values read as YAML (as DVC reads them)."""
    found = re.findall(r"^-S (\S+?)=(\S+)$", args_text, re.MULTILINE)
    return {dotted: yaml.safe_load(value) for dotted, value in found}


def apply(params_file: Path, changes: dict[str, Any]) -> dict[str, Any]:
    params = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    for dotted, value in changes.items():
        section, key = dotted.split(".", 1)
        params[section][key] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return params


def measured(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB of its largest process, output) of `command`."""
    with tempfile.NamedTemporaryFile("r") as peak:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", WRAP, peak.name, *command], cwd=cwd,
                              env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}"
                             f"{done.stderr[-3000:]}")
        return seconds, int(peak.read() or 0) / 1024, done.stdout + done.stderr


def outputs(repo: Path, stage: str, params: dict[str, Any]) -> list[Path]:
    """The workspace paths of a stage's outs, metrics and plots (${...} filled in)."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]

    def fill(match: re.Match[str]) -> str:
        value: Any = params
        for part in match.group(1).split("."):
            value = value[part]
        return str(value)

    paths = []
    for kind in ("outs", "metrics", "plots"):
        for entry in spec.get(kind) or []:
            path = entry if isinstance(entry, str) else next(iter(entry))
            paths.append(repo / re.sub(r"\$\{([^}]+)\}", fill, path))
    return paths


def size_mb(paths: list[Path]) -> float:
    total = 0
    for path in paths:
        files = [path] if path.is_file() else path.rglob("*") if path.is_dir() else []
        total += sum(f.stat().st_size for f in files if f.is_file())
    return total / 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--args", type=Path,
                        default=ROOT / "recipes" / "rehearsal_1024x2048.args")
    parser.add_argument("--workdir", type=Path, help="clone here (kept) instead of a temp dir")
    parser.add_argument("--more", type=int, default=4,
                        help="the second pass's images, as a multiple of the first's")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--until", choices=STAGES,
                        help="the last stage to run (default: all; with --smoke: train)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run that checks the script works (CI): SMOKE_ARGS "
                             "(64x128, 2/1/1 images, 2 iterations, CPU), --more 2, --until "
                             "train unless given")
    args = parser.parse_args(argv)
    if args.smoke:
        args.more, args.until = 2, args.until or "train"
    stages = STAGES[:STAGES.index(args.until or STAGES[-1]) + 1]
    changes = overrides(SMOKE_ARGS if args.smoke else args.args.read_text(encoding="utf-8"))
    if args.workdir is not None:
        rehearse(args.workdir, changes, stages, args.more, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="fcn-rehearsal-") as tmp:
            rehearse(Path(tmp), changes, stages, args.more, args.out)


def rehearse(work: Path, changes: dict[str, Any], stages: Sequence[str], more: int,
             out: Path | None) -> None:
    """Clone HEAD into `work`/project, apply `changes` to its params.yaml, time each of
    `stages` (in pipeline order, from the first) and its repeat, and the per-image ones again
    on `more` times the images; print the figures and write them as JSON to `out` (if given)."""
    repo = work / "project"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True)
    params = apply(repo / "params.yaml", changes)
    env = dict(os.environ, PYTHONPATH=str(repo), DVC_NO_ANALYTICS="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
               XDG_CACHE_HOME=str(work / "cache"))
    synth = params["synthesize"]
    images = {split: synth[f"{split}_per_city"] * len(synth[f"{split}_cities"])
              for split in ("train", "val", "test")}
    train = params["train"]
    per_stage: dict[str, dict[str, Any]] = {}
    for stage in stages:
        dvc = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
        seconds, peak, log = measured(dvc, repo, env)
        if f"Running stage '{stage}'" not in log:
            raise SystemExit(f"{stage} did not run:\n{log[-3000:]}")
        again, again_peak, log = measured(dvc, repo, env)
        if f"Stage '{stage}' didn't change" not in log:
            raise SystemExit(f"{stage} ran again:\n{log[-3000:]}")
        per_stage[stage] = {"seconds": seconds, "peak_rss_mb": peak,
                            "disk_mb": size_mb(outputs(repo, stage, params)),
                            "repeat_seconds": again, "repeat_peak_rss_mb": again_peak}
        print(f"{stage:14s} {seconds:7.1f} s  peak {peak:7.0f} MB  disk "
              f"{per_stage[stage]['disk_mb']:8.1f} MB  repeat {again:5.1f} s", flush=True)

    # a second pass with twice the images per split through the stages whose work grows with
    # them: the difference is their cost per image, free of start-up (imports, model loading)
    for split in ("train", "val", "test"):
        apply(repo / "params.yaml",
              {f"synthesize.{split}_per_city": more * synth[f"{split}_per_city"]})
    measured([sys.executable, "-m", "dvc", "repro", "--single-item", "synthesize"], repo, env)
    for stage in (s for s in PER_IMAGE if s in stages):
        dvc = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
        seconds, _, log = measured(dvc, repo, env)
        if f"Running stage '{stage}'" not in log:
            raise SystemExit(f"{stage} did not run on more images:\n{log[-3000:]}")
        first = sum(images[s] for s in PER_IMAGE[stage])  # the first pass's images
        added = (more - 1) * first
        slope = (seconds - per_stage[stage]["seconds"]) / added
        disk = size_mb(outputs(repo, stage, params))
        disk_slope = (disk - per_stage[stage]["disk_mb"]) / added
        per_stage[stage].update(
            seconds_more=seconds, seconds_per_image=slope,
            startup_seconds=per_stage[stage]["seconds"] - slope * first,
            disk_mb_more=disk, disk_mb_per_image=disk_slope,
            disk_mb_fixed=per_stage[stage]["disk_mb"] - disk_slope * first)
        print(f"{stage:14s} x{more} images {seconds:7.1f} s: {slope:.2f} s and "
              f"{per_stage[stage]['disk_mb_per_image']:.2f} MB per image", flush=True)

    train_last_epoch = None
    if "train" in stages:  # the train stage's wall-clock figures (a timing output)
        timing = repo / "metrics" / "train_timing" / "metrics.json"
        times = json.loads(timing.read_text(encoding="utf-8"))["time"]
        train_last_epoch = {key: times[key]
                            for key in ("data_s", "compute_s", "val_s", "samples_per_s")}
    samples = train["batch_size"] * train["iterations"]
    result = {
        "images": images, "more": more, "samples": samples, "stages": per_stage,
        "train_last_epoch": train_last_epoch,
        "params": changes,
        "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "command": "python benchmarks/rehearsal.py",
    }
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(train_last_epoch))


if __name__ == "__main__":
    main()
