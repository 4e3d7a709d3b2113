"""`make gpu-check`: one command that proves the project's CUDA paths on a GPU, and runs as a
dry mode on a machine without one, so that it cannot rot.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--dry-run] [--only STEP ...] [--list]

Every step is built from the library (`fcn.train`, `fcn.predict`, `fcn.deploy`,
`fcn.benchmark`) or runs a stage script as a subprocess; none re-implements what it checks.
Each has a name, whether it needs CUDA, a pass criterion (`Step.checks`, also in
docs/gpu-check.md), and records every figure it measures. With CUDA the steps run at their
real sizes (1024x2048 for the loader, slide mode, the OOM fallback and the benchmark).
Without CUDA (or with `--dry-run`) the script runs in dry mode: every step that does not need
CUDA runs on the CPU at tiny sizes, and every CUDA step is listed as skipped with its reason.

Output: a summary table on stdout (one row per step: passed / failed / skipped and why /
missed for a performance goal), the benchmark's configurations as a Markdown table, and one
JSON report (`--out`) with every figure and every outcome. Exit status 1 when any executed
step failed (a missed goal counts only with `--strict-goals`), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import math
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not {"-v", "--verbose"} & set(sys.argv):
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars the library does not force on

import numpy as np  # noqa: E402 - after the environment is set for tqdm
import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from fcn import checkpoint as ckpt  # noqa: E402
from fcn.atomic import write_json
from fcn.benchmark.capability import load_average, set_tf32
from fcn.benchmark.run import MIN_AGREEMENT, fastest_config, run_benchmark
from fcn.cityscapes.labels import NUM_CLASSES
from fcn.cityscapes.layout import list_images
from fcn.device import synchronize
from fcn.images import read_rgb
from fcn.masks.generate import generate
from fcn.metrics import summary
from fcn.model import build_model
from fcn.params import (BenchmarkParams, DeployParams, InferenceParams, ModelParams, Params,
                        SynthesizeParams, TrainParams, default_params_dict, parse_params,
                        sections_dict)
from fcn.predict.predictor import Predictor, window_boxes
from fcn.synthetic import dataset_items, synthesize, write_item
from fcn.train.data import SegmentationDataset, ShardSampler
from fcn.train.distributed import Context
from fcn.train.fit import fit, make_loaders, seed_everything
from fcn.train.loop import (build_criterion, build_optimizer, build_scheduler, train_one_epoch,
                            validate)

log = logging.getLogger("gpu_check")

REPO = Path(__file__).resolve().parents[1]
TRAIN_STAGE = REPO / "stages" / "train.py"
RECIPE = REPO / "recipes" / "fcn8s_vgg11bn_512x1024_80k_cityscapes.args"

PASSED, FAILED, SKIPPED, MISSED = "passed", "failed", "skipped", "missed"
REPORT_FORMAT = 1
BUDGET_S = 480
"""What the CUDA run should take on one H100/H200 (issue 15: at most 8 minutes)."""

# Pass criteria (stated in each step's `checks` and in docs/gpu-check.md).
MIN_DECREASE = 0.9
"""Fixed-batch training: the mean loss of the last quarter of the steps must be below this
fraction of the first quarter's."""
OVERFIT_MIOU = 0.9
RESUME_MIOU_TOL = 0.02
"""CUDA kill/resume: |final val mIoU, resumed - uninterrupted| (cuDNN is not bit-exact)."""
RESUME_LOSS_TOL = 0.05
"""CUDA kill/resume: |final val loss difference| / uninterrupted val loss."""
DDP_MIOU_TOL_CUDA = 1e-3
"""nccl DDP: logged val mIoU against one process re-validating the saved model (CPU: exact)."""
GOAL_LATENCY_MS, GOAL_STRETCH_MS, GOAL_MEMORY_BYTES = 3.0, 1.5, 0.6e9
"""One 1024x2048 image on an H100-class GPU: latency (stretch) and peak allocated memory."""


# --- what a run is made of -------------------------------------------------------------------

class Skip(Exception):
    """Raised by a step that finds it cannot run here (the message is the reason)."""


@dataclass
class Outcome:
    """What a step returns: pass or fail, every figure it measured, a one-line headline for the
    table, and (when failing) what was wrong."""

    passed: bool
    figures: dict[str, Any]
    headline: str = ""
    problem: str = ""


@dataclass(frozen=True)
class Sizes:
    """How big each step's work is: tiny in dry mode, real on CUDA."""

    small: SynthesizeParams
    """training runs' data: kill/resume, DDP; the precision agreement's and ONNX's images"""
    large: SynthesizeParams | None
    """full-size images for fixed-batch steps, the loader, slide mode and the OOM fallback
    (None: use `small`)"""
    overfit: SynthesizeParams
    """the overfit's train images (all of them, whole)"""
    steps_batch: int
    steps_crop: tuple[int, int]
    steps: int
    overfit_max_steps: int
    resume_epochs: int
    resume_batch: int
    resume_crop: tuple[int, int]
    loader_crop: tuple[int, int] | None
    """None: the recipe's crop; else a crop in the same proportion to tiny images"""
    loader_batch: int | None
    loader_workers: int | None
    """None: the recipe's"""
    window: tuple[int, int]
    stride: tuple[int, int]
    benchmark: tuple[BenchmarkParams, ...]
    data_workers: int


def dry_sizes() -> Sizes:
    """Tiny sizes for the CPU: the whole dry run in about two minutes on two cores."""
    small = SynthesizeParams(seed=7, height=64, width=128, train_cities=["aachen", "bochum"],
                             val_cities=["frankfurt"], test_cities=["berlin"],
                             train_per_city=3, val_per_city=2, test_per_city=1)
    bench = BenchmarkParams(profile="quick", device="cpu", height=64, width=128,
                            channels_last=[True], window=[32, 64], stride=[21, 42],
                            onnxruntime=False, matmul_size=512, quick_batch_sizes=[1],
                            quick_warmup=1, quick_iters=2, quick_compile=[False])
    overfit = dataclasses.replace(small, seed=3, train_cities=["aachen"], train_per_city=1,
                                  val_per_city=1)
    return Sizes(small=small, large=None, overfit=overfit, steps_batch=2, steps_crop=(32, 64),
                 steps=8, overfit_max_steps=150, resume_epochs=2, resume_batch=2,
                 resume_crop=(64, 64),
                 loader_crop=(32, 64), loader_batch=2, loader_workers=2,
                 window=(32, 64), stride=(21, 42), benchmark=(bench,), data_workers=1)


def cuda_sizes(benchmark: str) -> Sizes:
    """The real sizes: 1024x2048 images and the benchmark's full profile (see `--benchmark`)."""
    small = SynthesizeParams(seed=7, height=256, width=512, train_cities=["aachen", "bochum"],
                             val_cities=["frankfurt"], test_cities=["berlin"],
                             train_per_city=4, val_per_city=4, test_per_city=1)
    large = SynthesizeParams(seed=11, height=1024, width=2048, train_cities=["aachen"],
                             val_cities=["frankfurt"], test_cities=["berlin"],
                             train_per_city=48, val_per_city=2, test_per_city=1)
    full = BenchmarkParams(profile="full", device="cuda")
    if benchmark == "full":  # the benchmark stage's full profile, exactly
        bench: tuple[BenchmarkParams, ...] = (full,)
    else:  # every precision x layout x batch size eager, and compiled where it counts
        bench = (dataclasses.replace(full, full_compile=[False]),
                 dataclasses.replace(full, channels_last=[True], full_batch_sizes=[1],
                                     full_compile=[True], slide=False, onnxruntime=False))
    workers = min(16, os.cpu_count() or 1)
    overfit = dataclasses.replace(small, seed=3, train_cities=["aachen"], train_per_city=2,
                                  val_per_city=1)
    return Sizes(small=small, large=large, overfit=overfit, steps_batch=8,
                 steps_crop=(512, 1024), steps=20, overfit_max_steps=400, resume_epochs=3, resume_batch=4,
                 resume_crop=(128, 256),
                 loader_crop=None, loader_batch=None, loader_workers=None,
                 window=(512, 1024), stride=(341, 683), benchmark=bench, data_workers=workers)


@dataclass
class Check:
    """One run of the check: where it runs, its work folder, sizes, and what steps hand on."""

    mode: str
    """'cuda' or 'dry'"""
    device: torch.device
    work: Path
    sizes: Sizes
    gpus: int
    artifacts: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.mode == "cuda"

    @property
    def context(self) -> Context:
        return Context(0, 1, self.device)

    def data(self, name: str) -> tuple[Path, Path, SynthesizeParams]:
        """(root, generated masks, parameters) of the 'small' or 'large' dataset."""
        if name == "large" and "large" not in self.artifacts:
            name = "small"
        return self.artifacts[name]


@dataclass(frozen=True)
class Step:
    """One check: `run(check)` returns an Outcome, raises Skip, or fails by raising."""

    name: str
    needs_cuda: bool
    checks: str
    """what it checks and its pass criterion"""
    run: Callable[[Check], Outcome]
    requires: tuple[str, ...] = ()
    why_cuda: str = "needs CUDA"
    goal: bool = False
    """a performance goal: not met is 'missed', a failure only with --strict-goals"""
    min_gpus: int = 0


@dataclass
class StepResult:
    """A step's entry in the report."""

    name: str
    needs_cuda: bool
    goal: bool
    status: str
    reason: str
    device: str | None
    seconds: float | None
    checks: str
    headline: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# --- helpers built on the library ------------------------------------------------------------

def make_dataset(root: Path, generated: Path, params: SynthesizeParams, workers: int) -> int:
    """A synthetic Cityscapes root (fcn.synthetic) and its labelTrainIds masks (the masks
    stage's `generate`), with `workers` processes; the number of images."""
    if workers <= 1:
        count = synthesize(root, params)
    else:  # the library's per-item writer, in parallel (items are independent)
        items = [(root, params, *item) for item in dataset_items(params)]
        with multiprocessing.Pool(workers) as pool:
            pool.starmap(write_item, items)
        count = len(items)
    generate(root, generated, ["labelTrainIds"], ["train", "val"], max(1, workers))
    return count


def decode_cache(check: Check, name: str) -> Path:
    """The decode stage's cache of a dataset (`fcn.train.decoded.decode_stage`), made once:
    what the train stage reads by default (decode.enabled)."""
    from fcn.train.decoded import decode_stage  # the decoded cache (issue 15, landing now)

    key = f"decoded-{name}"
    if key not in check.artifacts:
        root, generated, _ = check.data(name)
        out = check.work / key
        decode_stage(root, generated, out, True, max(2, check.sizes.data_workers))
        check.artifacts[key] = out
    return check.artifacts[key]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_start(device: torch.device) -> None:
    """Start measuring the peak: after this, `peak_mb` is the step's own peak."""
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device, kind: str = "allocated") -> float | None:
    if device.type != "cuda":
        return None
    value = (torch.cuda.max_memory_allocated(device) if kind == "allocated"
             else torch.cuda.max_memory_reserved(device))
    return value / 2**20


def tf32_flags() -> dict[str, Any]:
    """The TF32 switches now in force, read through the API that set_tf32 uses (after the new
    `fp32_precision` API is used, reading the legacy `allow_tf32` flags raises)."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        return {"matmul_fp32_precision": matmul.fp32_precision,
                "cudnn_conv_fp32_precision": conv.fp32_precision}
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


@contextlib.contextmanager
def strict_fp32(device: torch.device) -> Iterator[None]:
    """fp32 without TF32 for matmuls and cuDNN convolutions (the agreement reference), the
    previous flags restored afterwards; nothing to do on a CPU."""
    if device.type != "cuda":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        saved = (matmul.fp32_precision, conv.fp32_precision)

        def restore() -> None:
            matmul.fp32_precision, conv.fp32_precision = saved
    else:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

        def restore() -> None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    set_tf32(False)
    try:
        yield
    finally:
        restore()


@contextlib.contextmanager
def deterministic_reset() -> Iterator[None]:
    """fit() turns on deterministic algorithms on a CPU (bit-exact resume); turn them off
    again, so the steps after it run as they would alone."""
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


class Captured(logging.Handler):
    """The messages of one logger while the block runs (e.g. the predictor's OOM warnings)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @contextlib.contextmanager
    def on(self, name: str) -> Iterator[Captured]:
        logger = logging.getLogger(name)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels whose class is the same in both prediction arrays."""
    return float((a == b).mean())


def quarter_means(values: Sequence[float]) -> tuple[float, float]:
    """(mean of the first quarter, mean of the last quarter) of a sequence (at least 1 each)."""
    k = max(1, len(values) // 4)
    return statistics.fmean(values[:k]), statistics.fmean(values[-k:])


def read_recipe(path: Path = RECIPE) -> dict[str, dict[str, Any]]:
    """The named recipe's `-S section.key=value` overrides, as {section: {key: value}}."""
    overrides: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line.startswith("-S "):
            continue
        key, value = line[3:].split("=", 1)
        section, name = key.split(".", 1)
        overrides.setdefault(section, {})[name] = yaml.safe_load(value)
    return overrides


def stage_params(check: Check, run_dir: Path, **train: Any) -> dict[str, Any]:
    """params.yaml for a short train-stage run on the small dataset, its checkpoints and state
    folder inside `run_dir`."""
    root, generated, synth = check.data("small")
    params = default_params_dict()
    params["data"].update(root=str(root), generated=str(generated))
    params["synthesize"] = dataclasses.asdict(synth)
    params["train"].update(epochs=check.sizes.resume_epochs,
                           batch_size=check.sizes.resume_batch,
                           crop=list(check.sizes.resume_crop), workers=0, nproc=1,
                           device=check.device.type, monitor_system=False,
                           out=str(run_dir / "models"), resume_dir=str(run_dir / "resume"))
    params["train"].update(train)
    params["decode"].update(enabled=True, out=str(decode_cache(check, "small")))
    return params


def stage_command(params: dict[str, Any], run_dir: Path) -> list[str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    params_file = run_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return [sys.executable, str(TRAIN_STAGE), "--params", str(params_file),
            "--live-dir", str(run_dir / "live")]


def start_stage(params: dict[str, Any], run_dir: Path) -> tuple[subprocess.Popen, Path]:
    """The train stage in the background, its stderr to `<run_dir>/stderr.log`."""
    command = stage_command(params, run_dir)
    log_file = run_dir / "stderr.log"
    with log_file.open("w") as stderr:
        process = subprocess.Popen(command, cwd=run_dir, stdout=subprocess.DEVNULL,
                                   stderr=stderr, text=True)
    return process, log_file


def finish_stage(process: subprocess.Popen, log_file: Path, timeout: float) -> str:
    """Wait for a background stage; its stderr; a non-zero exit raises with the tail of it."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise RuntimeError(f"the train stage ran over {timeout:.0f} s: "
                           f"{log_file.read_text()[-1500:]}") from None
    stderr = log_file.read_text()
    if process.returncode != 0:
        raise RuntimeError(f"the train stage exited with {process.returncode}: {stderr[-1500:]}")
    return stderr


def run_stage(params: dict[str, Any], run_dir: Path, timeout: float = 600) -> str:
    process, log_file = start_stage(params, run_dir)
    return finish_stage(process, log_file, timeout)


def state_folder(params: dict[str, Any]) -> Path:
    """Where the train stage keeps this run's checkpoints until it ends
    (fcn.train.resume.state_dir of the hash the stage computes)."""
    from fcn.train import resume  # the resume_dir interface (issue 15)

    parsed = parse_params(params)
    hashed = ckpt.hashed_params(parsed.model, parsed.train,
                                sections_dict(parsed, "data", "synthesize"))
    return resume.state_dir(parsed.train.resume_dir, hashed)


def revalidate(check: Check, checkpoint: Path, precision: str) -> dict[str, float]:
    """Scores of a saved model on the small dataset's val split, in this one process."""
    root, generated, _ = check.data("small")
    model = ckpt.load_model(checkpoint).to(check.device)
    val = SegmentationDataset(root, generated, "val")
    loader = DataLoader(val, batch_size=1, sampler=ShardSampler(len(val)))
    result = validate(model, loader, build_criterion(None, check.device), check.context,
                      precision)
    return {"loss": result.loss, **summary(result.confusion)}


def eval_images(check: Check, name: str = "small") -> list[np.ndarray]:
    root, _, _ = check.data(name)
    return [np.array(read_rgb(path)) for path in list_images(root, "val")]  # writable


def predictor(check: Check, **inference: Any) -> Predictor:
    """The check's trained checkpoint in a Predictor, as evaluate/export build it."""
    options = {"device": check.device.type, **inference}
    return Predictor.from_params(check.artifacts["checkpoint"], None, InferenceParams(**options))


def predict_all(predictor_: Predictor, images: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    """(trainIds of every image, median ms per image): one image per call after a warm-up."""
    predictor_(images[0][None])
    times, out = [], []
    for image in images:
        synchronize(predictor_.device)
        start = time.perf_counter()
        out.append(predictor_(image[None])[0])
        synchronize(predictor_.device)
        times.append(time.perf_counter() - start)
    return np.stack(out), 1e3 * statistics.median(times)


# --- the steps -------------------------------------------------------------------------------

def step_data(check: Check) -> Outcome:
    figures: dict[str, Any] = {}
    ok = True
    for name, params in (("small", check.sizes.small), ("large", check.sizes.large),
                         ("overfit", check.sizes.overfit)):
        if params is None:
            continue
        root, generated = check.work / f"data-{name}", check.work / f"masks-{name}"
        start = time.perf_counter()
        count = make_dataset(root, generated, params, check.sizes.data_workers)
        check.artifacts[name] = (root, generated, params)
        train = len(SegmentationDataset(root, generated, "train"))
        val = len(SegmentationDataset(root, generated, "val"))
        expected = (len(params.train_cities) * params.train_per_city,
                    len(params.val_cities) * params.val_per_city)
        ok &= (train, val) == expected
        figures[name] = {"height": params.height, "width": params.width, "images": count,
                         "train_pairs": train, "val_pairs": val,
                         "seconds": time.perf_counter() - start}
        if name != "overfit":  # the train stage's default input; the loader measures both
            start = time.perf_counter()
            decode_cache(check, name)
            figures[name]["decode_s"] = time.perf_counter() - start
    parts = [f"{n} {f['height']}x{f['width']}: {f['train_pairs']}+{f['val_pairs']} pairs"
             for n, f in figures.items()]
    return Outcome(ok, figures, "; ".join(parts),
                   "" if ok else "the datasets do not hold the image/mask pairs asked for")


def fixed_batch(check: Check) -> list[torch.Tensor]:
    """One batch of the training loader (`fcn.train.fit.make_loaders`) at the recipe's
    augmentation, from the full-size train images (drawn once)."""
    if "batch" not in check.artifacts:
        root, generated, _ = check.data("large")
        recipe = read_recipe()["train"]
        t = TrainParams(crop=list(check.sizes.steps_crop), scale=recipe["scale"],
                        flip=recipe["flip"], jitter=recipe["jitter"],
                        batch_size=check.sizes.steps_batch, workers=0)
        loader, _ = make_loaders(root, generated, t, check.context)
        check.artifacts["batch"] = next(iter(loader))
    return check.artifacts["batch"]


def train_steps(check: Check, precision: str) -> Outcome:
    """`steps` optimizer steps of `fcn.train.loop.train_one_epoch` on one fixed batch."""
    device = check.device
    batch = fixed_batch(check)
    seed_everything(0)
    model = build_model(ModelParams(), NUM_CLASSES).to(device)
    params = TrainParams(precision=precision, poly_power=0.0)  # the default AdamW, constant LR
    steps = check.sizes.steps
    optimizer = build_optimizer(model, params)
    scheduler = build_scheduler(optimizer, params, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")
    criterion = build_criterion(None, device)
    one_batch = [batch]  # a loader of one batch: one optimizer step per call
    losses: list[float] = []
    seconds: list[float] = []
    scales: list[float] = []
    initial_scale = float(scaler.get_scale()) if scaler.is_enabled() else None
    peak_start(device)
    for step in range(steps):
        synchronize(device)
        start = time.perf_counter()
        result = train_one_epoch(model, one_batch, criterion, optimizer, scheduler, scaler,
                                 check.context, precision, step)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        losses.append(result.loss)
        if scaler.is_enabled():
            scales.append(float(scaler.get_scale()))
    first, last = quarter_means(losses)
    finite = all(math.isfinite(v) for v in losses)
    decreasing = finite and last < MIN_DECREASE * first
    step_s = statistics.median(seconds[1:] or seconds)
    figures: dict[str, Any] = {
        "precision": precision, "batch": list(batch[0].shape), "steps": steps, "losses": losses,
        "loss_first_quarter": first, "loss_last_quarter": last, "finite": finite,
        "decreasing": decreasing, "step_ms_median": 1e3 * step_s,
        "samples_per_s": len(batch[0]) / step_s, "peak_allocated_mb": peak_mb(device)}
    if device.type == "cuda":  # fp32 convolutions run TF32 under PyTorch's default flags
        figures["tf32_flags"] = tf32_flags()
    if scales:  # a halved scale is a skipped step (inf/NaN gradients)
        figures["grad_scaler"] = {"scales": scales, "final_scale": scales[-1],
                                  "skipped_steps": sum(b < a for a, b in
                                                       zip([initial_scale, *scales], scales))}
    reference = check.artifacts.get("losses_fp32")
    if reference is not None and precision != "fp32":
        figures["max_abs_loss_diff_vs_fp32"] = max(abs(a - b) for a, b in zip(losses, reference))
    if precision == "fp32":
        check.artifacts["losses_fp32"] = losses
    del model, optimizer
    problem = "" if decreasing else (
        f"loss not finite: {losses}" if not finite else
        f"loss not decreasing: last-quarter mean {last:.4f} >= {MIN_DECREASE} x first "
        f"{first:.4f}")
    head = f"loss {first:.3f} -> {last:.3f}, {1e3 * step_s:.0f} ms/step"
    if scales:
        head += f", scaler skipped {figures['grad_scaler']['skipped_steps']}"
    return Outcome(decreasing, figures, head, problem)


def step_overfit(check: Check) -> Outcome:
    """The overfit dataset's train images (two; dry mode: one), whole, no augmentation, until
    their mIoU >= 0.9 (validated every 10 steps); the model is saved as the check's trained
    checkpoint."""
    device = check.device
    root, generated, synth = check.data("overfit")
    size = [synth.height, synth.width]
    count = len(synth.train_cities) * synth.train_per_city
    precision = "bf16" if check.cuda else "fp32"  # train.precision's default applies on CUDA
    max_steps = check.sizes.overfit_max_steps
    params = TrainParams(lr=2e-3, epochs=max_steps, weight_decay=0.0, precision=precision,
                         crop=size, scale=[1.0, 1.0], flip=False, jitter=0.0, batch_size=count,
                         workers=0)
    loader, _ = make_loaders(root, generated, params, check.context)  # fit's own loader
    plain = DataLoader(SegmentationDataset(root, generated, "train"), batch_size=1)
    seed_everything(0)
    model_params = ModelParams()
    model = build_model(model_params, NUM_CLASSES).to(device)
    optimizer = build_optimizer(model, params)
    scheduler = build_scheduler(optimizer, params, max_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    criterion = build_criterion(None, device)
    curve: list[tuple[int, float]] = []
    start = time.perf_counter()
    miou, record = math.nan, {}
    for step in range(max_steps):
        trained = train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler,
                                  check.context, precision, step)
        if (step + 1) % 10 == 0 or step + 1 == max_steps:
            result = validate(model, plain, criterion, check.context, precision)
            scores = summary(result.confusion)
            miou = scores["miou"]
            curve.append((step + 1, miou))
            record = {"epoch": step, "train/loss": trained.loss, "val/loss": result.loss,
                      **{f"val/{k}": v for k, v in scores.items()}}
            if miou >= OVERFIT_MIOU:
                break
    seconds = time.perf_counter() - start
    path = check.work / "overfit" / ckpt.BEST
    state = ckpt.training_state(
        model=model, model_params=model_params, epoch=curve[-1][0], step=scheduler.last_epoch,
        optimizer=optimizer, scheduler=scheduler, scaler=scaler, best_miou=miou,
        best_epoch=curve[-1][0] - 1, history=[record],
        hashed=ckpt.hashed_params(model_params, params,
                                  {"synthesize": dataclasses.asdict(synth)}),
        rng=[ckpt.rng_state()])
    ckpt.save(path, ckpt.best_subset(state))
    check.artifacts["checkpoint"] = path
    passed = miou >= OVERFIT_MIOU
    figures = {"precision": precision, "image_size": size, "images": count, "steps": curve[-1][0],
               "max_steps": max_steps, "val_miou": miou, "val_loss": record.get("val/loss"),
               "train_loss": record.get("train/loss"), "curve": curve, "seconds": seconds,
               "checkpoint": str(path)}
    del model, optimizer
    return Outcome(passed, figures, f"val mIoU {miou:.4f} after {curve[-1][0]} steps "
                   f"({precision})", "" if passed else
                   f"val mIoU {miou:.4f} < {OVERFIT_MIOU} after {max_steps} steps")


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """(bit-identical, largest absolute difference) of two state dicts."""
    identical, largest = a.keys() == b.keys(), 0.0
    for key in a.keys() & b.keys():
        x, y = a[key], b[key]
        identical &= torch.equal(x, y)
        if x.is_floating_point():
            largest = max(largest, float((x.double() - y.double()).abs().max()))
    return identical, largest


def _untimed(history: list[dict[str, Any]]) -> str:
    return json.dumps([{k: v for k, v in r.items() if not k.startswith("time/")}
                       for r in history])


def step_kill_resume(check: Check) -> Outcome:
    """The train stage SIGKILLed after epoch 1 (of 3 on CUDA, 2 in dry mode) and run again,
    against an uninterrupted run: bit-identical on a CPU, equal within the stated tolerance on
    CUDA."""
    epochs = check.sizes.resume_epochs
    base = check.work / "kill-resume"
    whole_params = stage_params(check, base / "whole")
    cut_params = stage_params(check, base / "cut")
    start = time.perf_counter()
    whole, whole_log = start_stage(whole_params, base / "whole")  # alongside the cut run
    process = subprocess.Popen(stage_command(cut_params, base / "cut"), cwd=base / "cut",
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(600, process.kill)
    watchdog.start()
    try:
        lines: list[str] = []
        for line in process.stderr:  # logged after epoch 1's checkpoint is written
            lines.append(line)
            if f"epoch 1/{epochs}" in line:
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=120)
        watchdog.cancel()
        if process.returncode != -signal.SIGKILL:
            return Outcome(False, {"returncode": process.returncode}, "not killed",
                           f"the run ended ({process.returncode}) before epoch 1 was logged: "
                           f"{''.join(lines)[-1500:]}")
        state = state_folder(cut_params)
        left = ckpt.load(state / ckpt.LAST)["epoch"] if (state / ckpt.LAST).exists() else None
        out_absent = not Path(cut_params["train"]["out"]).exists()
        resumed = run_stage(cut_params, base / "cut")
        finish_stage(whole, whole_log, 600)
    finally:
        watchdog.cancel()
        for running in (process, whole):
            if running.poll() is None:
                running.kill()
                running.wait()
    seconds = time.perf_counter() - start

    a = ckpt.load(Path(whole_params["train"]["out"]) / ckpt.LAST)
    b = ckpt.load(Path(cut_params["train"]["out"]) / ckpt.LAST)
    identical, max_diff = _same_weights(a["model"], b["model"])
    final_a, final_b = a["history"][-1], b["history"][-1]
    miou_diff = abs(final_a["val/miou"] - final_b["val/miou"])
    loss_rel = abs(final_a["val/loss"] - final_b["val/loss"]) / abs(final_a["val/loss"])
    if check.device.type == "cpu":
        criterion = "bit-identical weights and history"
        equal = identical and _untimed(a["history"]) == _untimed(b["history"])
    else:
        criterion = (f"|val mIoU diff| <= {RESUME_MIOU_TOL} and |val loss diff| <= "
                     f"{RESUME_LOSS_TOL:.0%} (cuDNN is not bit-exact)")
        equal = miou_diff <= RESUME_MIOU_TOL and loss_rel <= RESUME_LOSS_TOL
    checks = {  # each True when as expected
        "killed after epoch 1, state folder holding epoch 1": left == 1,
        "train.out not written before the run ended": out_absent,
        f"the rerun resumed after epoch 1 of {epochs}":
            "resuming from" in resumed and f"after epoch 1 of {epochs}" in resumed,
        "state folder removed once published": not state.exists(),
        f"both runs ended after epoch {epochs}, same optimizer step":
            a["epoch"] == b["epoch"] == epochs and a["step"] == b["step"],
        criterion: equal}
    ok = all(checks.values())
    figures = {"device": check.device.type, "epochs": epochs, "checks": checks,
               "state_epoch_after_kill": left, "bit_identical_weights": identical,
               "max_abs_weight_diff": max_diff,
               "final_val_miou": {"uninterrupted": final_a["val/miou"],
                                  "resumed": final_b["val/miou"]},
               "final_val_loss": {"uninterrupted": final_a["val/loss"],
                                  "resumed": final_b["val/loss"]},
               "val_miou_diff": miou_diff, "val_loss_rel_diff": loss_rel, "seconds": seconds}
    return Outcome(ok, figures, f"resumed after epoch 1; weights "
                   f"{'bit-identical' if identical else f'max diff {max_diff:.2e}'}, "
                   f"val mIoU diff {miou_diff:.2e}",
                   "" if ok else "not as expected: " + "; ".join(
                       k for k, v in checks.items() if not v))


def ddp(check: Check, nproc: int, device: str) -> Outcome:
    """The train stage under torchrun with `nproc` processes (gloo on CPU, nccl on CUDA),
    sync_bn on; the logged val mIoU against one process re-validating the saved model."""
    run_dir = check.work / f"ddp-{device}"
    params = stage_params(check, run_dir, epochs=1, nproc=nproc, device=device, sync_bn=True,
                          batch_size=2)
    start = time.perf_counter()
    stderr = run_stage(params, run_dir)
    seconds = time.perf_counter() - start
    out = Path(params["train"]["out"]) / ckpt.LAST
    logged = ckpt.load(out)["metrics"]
    precision = params["train"]["precision"]
    again = revalidate(dataclasses.replace(check, device=torch.device(device)), out, precision)
    diff = abs(logged["val/miou"] - again["miou"])
    tolerance = 0.0 if device == "cpu" else DDP_MIOU_TOL_CUDA
    ranks = f" x{nproc}: " in stderr  # "training <backbone> on <device> x<n>: ..."
    sync_line = next((line.split(" INFO ", 1)[-1] for line in stderr.splitlines()
                      if "SyncBatchNorm" in line), None)
    sync_ok = device == "cpu" or (sync_line is not None
                                  and f"over {nproc} processes" in sync_line)
    passed = ranks and sync_ok and diff <= tolerance
    figures = {"processes": nproc, "backend": "gloo" if device == "cpu" else "nccl",
               "logged_val_miou": logged["val/miou"], "revalidated_val_miou": again["miou"],
               "val_miou_diff": diff, "tolerance": tolerance, "sync_bn": sync_line,
               "seconds": seconds}
    problems = ([] if ranks else [f"the log does not show {nproc} processes"]) + (
        [] if sync_ok else [f"no SyncBatchNorm over {nproc} processes in the log"]) + (
        [] if diff <= tolerance else [f"val mIoU differs by {diff:.3g} > {tolerance}"])
    return Outcome(passed, figures, f"{figures['backend']} x{nproc}: logged val mIoU "
                   f"{logged['val/miou']:.4f}, re-validated diff {diff:.1e}", "; ".join(problems))


def step_loader(check: Check) -> Outcome:
    """fit() at the Cityscapes recipe (crop, scale, flip, jitter, batch, precision, workers)
    for two epochs, reading the decode stage's cache (the default) and the PNGs; the last
    epoch's loader wait (`time/data_fraction`) and samples/s of each."""
    root, generated, synth = check.data("large")
    recipe = read_recipe()
    raw = default_params_dict()
    raw["data"].update(root=str(root), generated=str(generated))
    raw["synthesize"] = dataclasses.asdict(synth)
    raw["model"].update(recipe.get("model", {}), weights="none")  # no ImageNet file needed
    raw["train"].update(recipe["train"], epochs=2, iterations=None, device=check.device.type,
                        monitor_system=False, nproc=1)
    if check.sizes.loader_crop is not None:  # tiny images: the recipe's proportions
        raw["train"].update(crop=list(check.sizes.loader_crop),
                            batch_size=check.sizes.loader_batch,
                            workers=check.sizes.loader_workers)
    figures: dict[str, Any] = {"image_size": [synth.height, synth.width],
                               "device": check.device.type, "cpu_count": os.cpu_count()}
    problems = []
    keys = ("time/data_s", "time/compute_s", "time/data_fraction")
    for source, decoded in (("decoded", decode_cache(check, "large")), ("png", None)):
        run_dir = check.work / f"loader-{source}"
        raw["train"].update(out=str(run_dir / "models"), resume_dir=str(run_dir / "resume"))
        params: Params = parse_params(raw, "the loader check's parameters")
        t = params.train
        with deterministic_reset():
            record = fit(params.model, t, root, generated, run_dir / "live",
                         identity=sections_dict(params, "data", "synthesize"), decoded=decoded)
        missing = [k for k in keys if k not in record]
        if missing:
            problems.append(f"fit()'s record has no {', '.join(missing)}")
            continue
        data_s, compute_s, fraction = (record[k] for k in keys)
        rate = record.get("time/samples_per_s", math.nan)
        figures[source] = {"data_s": data_s, "compute_s": compute_s, "data_fraction": fraction,
                           "samples_per_s": rate, "val_s": record.get("time/val_s"),
                           "train_loss": record["train/loss"]}
        if not (all(math.isfinite(v) for v in (data_s, compute_s, fraction, rate))
                and 0 <= fraction <= 1):
            problems.append(f"{source}: timings are not finite fractions")
    figures.update(crop=t.crop, scale=t.scale, flip=t.flip, jitter=t.jitter,
                   batch_size=t.batch_size, precision=t.precision, workers=t.workers, epochs=2)
    head = "; ".join(f"{source}: data wait {f['data_fraction']:.1%}, {f['samples_per_s']:.1f} "
                     "samples/s" for source, f in figures.items()
                     if source in ("decoded", "png"))
    head += f" (workers {t.workers}, batch {t.batch_size}, crop {t.crop[0]}x{t.crop[1]})"
    return Outcome(not problems, figures, head, "; ".join(problems))


def step_predict_fp32(check: Check) -> Outcome:
    """The reference for the precision steps: strict fp32 (no TF32), NCHW; evaluate's
    channels-last layout in fp32 must agree with it on >= 99.9% of pixels."""
    images = eval_images(check)
    with strict_fp32(check.device):
        reference, ms = predict_all(predictor(check, precision="fp32", channels_last=False),
                                    images)
        channels_last, ms_cl = predict_all(predictor(check, precision="fp32", channels_last=True),
                                           images)
    check.artifacts["reference"] = reference
    figures = {"images": len(images), "pixels": int(reference.size),
               "image_size": list(images[0].shape[:2]), "ms_per_image_nchw": ms,
               "ms_per_image_channels_last": ms_cl,
               "agreement_channels_last": agreement(channels_last, reference)}
    if check.cuda:  # what precision fp32 runs on CUDA with PyTorch's default flags
        default, _ = predict_all(predictor(check, precision="fp32", channels_last=True), images)
        figures["agreement_fp32_default_tf32_flags"] = agreement(default, reference)
        figures["default_tf32_flags"] = tf32_flags()
    passed = figures["agreement_channels_last"] >= MIN_AGREEMENT
    return Outcome(passed, figures, f"channels-last agrees on "
                   f"{figures['agreement_channels_last']:.4%} of {reference.size} pixels",
                   "" if passed else f"channels-last fp32 agreement below {MIN_AGREEMENT:.1%}")


def precision_agreement(check: Check, precision: str) -> Outcome:
    """evaluate/export at `precision` (autocast, channels-last: their defaults) against the
    strict fp32 reference, on the check's trained checkpoint."""
    images = eval_images(check)
    predicted, ms = predict_all(predictor(check, precision=precision, channels_last=True), images)
    share = agreement(predicted, check.artifacts["reference"])
    passed = share >= MIN_AGREEMENT
    figures = {"precision": precision, "channels_last": True, "images": len(images),
               "pixels": int(predicted.size), "agreement": share,
               "differing_pixels": int((predicted != check.artifacts["reference"]).sum()),
               "ms_per_image": ms}
    return Outcome(passed, figures, f"argmax agreement {share:.4%} with fp32",
                   "" if passed else f"agreement {share:.4%} < {MIN_AGREEMENT:.1%}")


def step_slide(check: Check) -> Outcome:
    """Slide mode (evaluate's defaults otherwise) against whole images on the full-size val
    images: full-size predictions from every window; on CUDA, less peak memory."""
    device = check.device
    images = eval_images(check, "large")
    window, stride = check.sizes.window, check.sizes.stride
    runs: dict[str, dict[str, Any]] = {}
    predictions = {}
    for mode in ("whole", "slide"):
        p = predictor(check, mode=mode, window=list(window), stride=list(stride))
        p(images[0][None])  # warm-up (cuDNN autotuning) before the peak is measured
        peak_start(device)
        predictions[mode], ms = predict_all(p, images)
        runs[mode] = {"ms_per_image": ms, "peak_allocated_mb": peak_mb(device)}
        del p
    height, width = images[0].shape[:2]
    windows = len(window_boxes(height, width, window, stride))
    full_size = predictions["slide"].shape == (len(images), height, width)
    less_memory = (device.type != "cuda"
                   or runs["slide"]["peak_allocated_mb"] < runs["whole"]["peak_allocated_mb"])
    figures = {"image_size": [height, width], "images": len(images), "window": list(window),
               "stride": list(stride), "windows_per_image": windows, "whole": runs["whole"],
               "slide": runs["slide"],
               "agreement_slide_vs_whole": agreement(predictions["slide"], predictions["whole"])}
    head = (f"{windows} windows/image, agreement with whole "
            f"{figures['agreement_slide_vs_whole']:.2%}")
    if device.type == "cuda":
        head += (f", peak {runs['slide']['peak_allocated_mb']:.0f} vs "
                 f"{runs['whole']['peak_allocated_mb']:.0f} MB")
    passed = full_size and less_memory
    return Outcome(passed, figures, head, "" if passed else (
        "slide predictions are not full size" if not full_size
        else "slide mode did not use less memory than whole images"))


class OutOfMemoryAbove(nn.Module):
    """Raises CUDA's out-of-memory error for inputs above `pixels` (batch x height x width):
    the dry mode's stand-in for a real out-of-memory error (as tests/test_predict_modes.py)."""

    def __init__(self, inner: nn.Module, pixels: int) -> None:
        super().__init__()
        self.inner, self.pixels = inner, pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[2] * x.shape[3] > self.pixels:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the dry mode)")
        return self.inner(x)


def step_oom(check: Check) -> Outcome:
    """Whole-image inference of a batch that does not fit: retried per image, then in slide
    mode. CUDA: a real out-of-memory error, the allocator capped between slide mode's and
    whole-image inference's peak; CPU: the error injected as the tests do."""
    device = check.device
    images = np.stack(eval_images(check, "large")[:2])
    window, stride = list(check.sizes.window), list(check.sizes.stride)
    figures: dict[str, Any] = {"images": len(images), "image_size": list(images.shape[1:3])}
    captured = Captured()
    if device.type == "cuda":
        figures["method"] = "real: torch.cuda.set_per_process_memory_fraction"
        expected = predictor(check, mode="slide", window=window, stride=stride)(images)
        peaks = {}
        for mode in ("slide", "whole"):
            p = predictor(check, mode=mode, window=window, stride=stride)
            p(images[:1])  # warm-up, then the peak of one image
            peak_start(device)
            p(images[:1])
            peaks[mode] = torch.cuda.max_memory_reserved(device)
            del p
        figures["peak_reserved_mb"] = {k: v / 2**20 for k, v in peaks.items()}
        if not peaks["slide"] < peaks["whole"]:
            return Outcome(False, figures, "no memory gap", "slide mode reserves no less memory "
                           "than whole-image inference: no limit separates them")
        limit = (peaks["slide"] + peaks["whole"]) / 2
        total = torch.cuda.get_device_properties(device).total_memory
        figures["limit_mb"] = limit / 2**20
        capped = predictor(check, mode="whole", window=window, stride=stride)
        free_memory(device)
        torch.cuda.set_per_process_memory_fraction(limit / total, device)
        try:
            with captured.on("fcn.predict.predictor"):
                got = capped(images)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            free_memory(device)
    else:
        figures["method"] = "injected: a model raising torch.OutOfMemoryError above one window"
        inner = predictor(check).model
        expected = Predictor(inner, device, mode="slide", window=window, stride=stride)(images)
        capped = Predictor(OutOfMemoryAbove(inner, window[0] * window[1]), device,
                           window=window, stride=stride)
        with captured.on("fcn.predict.predictor"):
            got = capped(images)
    warnings = [m for m in captured.messages if "out of memory" in m]
    share = agreement(got, expected)
    steps_ok = (len(warnings) == 2 and "one image at a time" in warnings[0]
                and "slide mode" in warnings[1])
    needed = 1.0 if device.type == "cpu" else MIN_AGREEMENT
    passed = steps_ok and share >= needed
    figures.update(warnings=warnings, agreement_with_slide_mode=share, needed=needed)
    return Outcome(passed, figures, f"per image, then slide mode; agreement with slide "
                   f"{share:.4%}", "" if passed else (
                       f"expected two fallback warnings (per image, then slide), got {warnings}"
                       if not steps_ok else f"agreement {share:.4%} < {needed:.2%}"))


def step_onnx(check: Check) -> Outcome:
    """fcn.deploy: export the trained checkpoint, run it in onnxruntime's CPU provider, and
    check the argmax against PyTorch fp32 as the deploy stage does (>= deploy.min_agreement)."""
    from fcn.deploy import check_agreement, export_onnx, session
    import onnxruntime

    deploy = DeployParams()
    model = ckpt.load_model(check.artifacts["checkpoint"])
    path = check.work / "onnx" / "fcn8s.onnx"
    start = time.perf_counter()
    export_onnx(model, path, deploy.opset)
    export_s = time.perf_counter() - start
    check.artifacts["onnx"] = path
    root, _, _ = check.data("small")
    sess = session(path)
    result = check_agreement(model, sess, list_images(root, "val"))
    passed = result.fraction >= deploy.min_agreement
    figures = {"onnxruntime": onnxruntime.__version__, "providers": sess.get_providers(),
               "opset": deploy.opset, "export_s": export_s,
               "file_mb": path.stat().st_size / 2**20, "images": result.images,
               "pixels": result.pixels, "agreement": result.fraction,
               "max_abs_logit_diff": result.max_abs_logit_diff,
               "min_agreement": deploy.min_agreement}
    return Outcome(passed, figures, f"export {export_s:.0f} s, agreement {result.fraction:.4%} "
                   f"(CPU provider)", "" if passed else
                   f"agreement below deploy.min_agreement {deploy.min_agreement}")


def step_onnx_cuda(check: Check) -> Outcome:
    """The exported model in onnxruntime's CUDA provider (onnxruntime-gpu): the provider
    really used, agreement with PyTorch fp32, latency at the full image size."""
    import onnxruntime
    from fcn.deploy import INPUT, OUTPUT, check_agreement, session, to_input

    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise Skip(f"onnxruntime-gpu is not installed (onnxruntime {onnxruntime.__version__}, "
                   f"providers {available})")
    model = ckpt.load_model(check.artifacts["checkpoint"])
    sess = session(check.artifacts["onnx"], cuda=True)
    used = sess.get_providers()
    root, _, _ = check.data("small")
    result = check_agreement(model, sess, list_images(root, "val"))
    x = to_input(eval_images(check, "large")[0][None])
    for _ in range(3):
        sess.run([OUTPUT], {INPUT: x})
    times = []
    for _ in range(10):
        start = time.perf_counter()
        sess.run([OUTPUT], {INPUT: x})
        times.append(time.perf_counter() - start)
    on_cuda = used[:1] == ["CUDAExecutionProvider"]
    passed = on_cuda and result.fraction >= MIN_AGREEMENT
    figures = {"onnxruntime": onnxruntime.__version__, "providers": used,
               "agreement": result.fraction, "max_abs_logit_diff": result.max_abs_logit_diff,
               "latency_ms_median": 1e3 * statistics.median(times),
               "latency_image_size": list(x.shape[2:]), "includes": "host<->device copies"}
    return Outcome(passed, figures, f"{used[0]}: agreement {result.fraction:.4%}, "
                   f"{figures['latency_ms_median']:.1f} ms at {x.shape[2]}x{x.shape[3]}",
                   "" if passed else ("the session did not run on the CUDA provider"
                                      if not on_cuda else f"agreement below {MIN_AGREEMENT:.1%}"))


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several run_benchmark results as one: the first's environment and model, every
    configuration, each run's protocol, and the fast paths over all of them."""
    merged = {**runs[0], "configs": {}, "protocols": [r["protocol"] for r in runs]}
    for result in runs:
        merged["configs"].update(result["configs"])
    keys = ("name", "latency_ms_median", "throughput_ips", "peak_memory_mb", "agreement")
    for name, allow in (("fast_path", True), ("fast_path_eager", False)):
        best = fastest_config(merged, allow_compile=allow)
        merged[name] = None if best is None else {k: best[k] for k in keys}
    return merged


def step_benchmark(check: Check) -> Outcome:
    """fcn.benchmark.run_benchmark (each configuration timed in a fresh process) on the check's
    trained checkpoint; passes when no configuration failed and a fast path agrees with fp32."""
    weights = str(check.artifacts.get("checkpoint", "trained_like"))
    runs = []
    start = time.perf_counter()
    for params in check.sizes.benchmark:
        free_memory(check.device)
        runs.append(run_benchmark(dataclasses.replace(params, weights=weights), ModelParams(),
                                  progress=False))
    results = _merge(runs)
    check.artifacts["benchmark"] = results
    configs = results["configs"].values()
    failed = {e["name"]: e["reason"] for e in configs
              if e["status"] != "ok" and str(e["reason"]).startswith("failed")}
    measured = sum(e["status"] == "ok" for e in configs)
    fast = results["fast_path"]
    passed = not failed and fast is not None
    figures = {"weights": weights, "seconds": time.perf_counter() - start, "measured": measured,
               "skipped": {e["name"]: e["reason"] for e in configs if e["status"] != "ok"},
               "failed": failed, "fast_path": fast, "fast_path_eager": results["fast_path_eager"],
               "results": results}
    head = (f"{measured} configurations at {runs[0]['protocol']['height']}x"
            f"{runs[0]['protocol']['width']}; fast path "
            + (f"{fast['name']} {fast['latency_ms_median']:.2f} ms" if fast else "none"))
    return Outcome(passed, figures, head, "" if passed else (
        f"configurations failed: {failed}" if failed else "no configuration agrees with fp32"))


def step_goals(check: Check) -> Outcome:
    """The goals for one 1024x2048 image on an H100-class GPU: the fastest batch-1 whole-image
    configuration that agrees with fp32 (>= 99.9%) within 3 ms (stretch 1.5 ms) and 0.6 GB peak
    allocated."""
    results = check.artifacts["benchmark"]
    protocol = results["protocols"][0]
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


AGREE = f">= {MIN_AGREEMENT:.1%} of pixels"
STEPS: tuple[Step, ...] = (
    Step("data", False, "synthetic Cityscapes roots (fcn.synthetic) and their labelTrainIds "
         "masks (fcn.masks.generate): every image paired with its mask", step_data),
    Step("train_fp32", False, "fixed-batch optimizer steps of train_one_epoch in fp32 "
         "(CUDA: 8 recipe crops of 512x1024): loss finite and its last-quarter mean < "
         f"{MIN_DECREASE} x the first quarter's", lambda c: train_steps(c, "fp32"), ("data",)),
    Step("amp_bf16", True, "the same steps under bf16 autocast: loss finite and decreasing",
         lambda c: train_steps(c, "bf16"), ("data",),
         why_cuda="needs CUDA: training autocast applies on CUDA only (a CPU trains in fp32)"),
    Step("amp_fp16", True, "the same steps under fp16 autocast with GradScaler: loss finite and "
         "decreasing (skipped steps and the final scale reported)",
         lambda c: train_steps(c, "fp16"), ("data",),
         why_cuda="needs CUDA: fp16 autocast and GradScaler apply on CUDA only"),
    Step("overfit", False, "two images (dry mode: one), no augmentation, train.precision's "
         f"default (bf16 on CUDA): val mIoU >= {OVERFIT_MIOU} within the step budget; saved as "
         "the check's trained checkpoint", step_overfit, ("data",)),
    Step("kill_resume", False, "stages/train.py SIGKILLed after epoch 1 of 3 (dry mode: 2) then "
         "rerun, against an uninterrupted run: resumed from the state folder in "
         "train.resume_dir, published to train.out; CPU bit-identical, CUDA |val mIoU diff| <= "
         f"{RESUME_MIOU_TOL} and |val loss diff| <= {RESUME_LOSS_TOL:.0%}",
         step_kill_resume, ("data",)),
    Step("ddp_gloo", False, "stages/train.py with train.nproc 2 on the CPU (torchrun, gloo): "
         "logged val mIoU equals one process re-validating the saved model",
         lambda c: ddp(c, 2, "cpu"), ("data",)),
    Step("ddp_nccl", True, "stages/train.py with one process per GPU (torchrun, nccl, "
         f"sync_bn): SyncBatchNorm over all processes; logged val mIoU within "
         f"{DDP_MIOU_TOL_CUDA} of one process re-validating the saved model",
         lambda c: ddp(c, min(c.gpus, 8), "cuda"), ("data",),
         why_cuda="needs CUDA: nccl runs on GPUs only", min_gpus=2),
    Step("loader", False, "fit() at the Cityscapes recipe (recipes/*.args: crop 512x1024, scale "
         "0.5-2.0, flip, jitter 0.5, batch 8, bf16, its workers) on 1024x2048 images for 2 "
         "epochs, from the decode stage's cache and from the PNGs: the last epoch's loader wait "
         "(time/data_fraction) and samples/s of each are measured", step_loader, ("data",)),
    Step("predict_fp32", False, "Predictor on the trained checkpoint, strict fp32 (no TF32) "
         f"NCHW as the reference; channels-last fp32 agrees on {AGREE}",
         step_predict_fp32, ("overfit",)),
    Step("precision_fp16", True, f"evaluate/export in fp16 (autocast, channels-last) against "
         f"the fp32 reference: argmax agreement {AGREE}",
         lambda c: precision_agreement(c, "fp16"), ("predict_fp32",),
         why_cuda="needs CUDA: evaluate/export run fp32 on a CPU whatever their precision"),
    Step("precision_bf16", True, f"evaluate/export in bf16 against the fp32 reference: "
         f"argmax agreement {AGREE}", lambda c: precision_agreement(c, "bf16"),
         ("predict_fp32",),
         why_cuda="needs CUDA: evaluate/export run fp32 on a CPU whatever their precision"),
    Step("slide", False, "Predictor slide mode (window 512x1024, stride 341x683 on CUDA) "
         "against whole images at full size: full-size predictions; on CUDA lower peak "
         "allocated memory", step_slide, ("overfit",)),
    Step("oom_fallback", False, "a batch that does not fit whole: retried one image at a time, "
         "then slide mode, each logged once; predictions equal slide mode's (CUDA: a real OOM "
         f"under a capped allocator, agreement {AGREE}; CPU: injected error, identical)",
         step_oom, ("overfit",)),
    Step("onnx", False, "fcn.deploy export of the trained checkpoint, onnxruntime CPU provider: "
         "argmax agreement with PyTorch fp32 >= deploy.min_agreement (99.99%)", step_onnx,
         ("overfit",)),
    Step("onnx_cuda", True, "the same ONNX file in onnxruntime's CUDA provider (if "
         "onnxruntime-gpu is installed): the session runs on it, agreement with PyTorch fp32 "
         f"{AGREE} (the provider may use TF32), latency at 1024x2048", step_onnx_cuda, ("onnx",),
         why_cuda="needs CUDA: onnxruntime's CUDA provider"),
    Step("benchmark", False, "fcn.benchmark at 1024x2048 on CUDA (fp32/TF32/bf16/fp16 x NCHW/"
         "channels-last x batch 1/2/4 eager, compiled channels-last batch 1, slide, "
         "onnxruntime; the quick profile at 64x128 in dry mode): no configuration fails, a fast "
         f"path agrees with fp32 on {AGREE}", step_benchmark),
    Step("benchmark_goals", True, f"one 1024x2048 image, batch 1, agreeing with fp32: <= "
         f"{GOAL_LATENCY_MS} ms (stretch {GOAL_STRETCH_MS} ms) and <= "
         f"{GOAL_MEMORY_BYTES / 1e9} GB peak allocated in one configuration (a goal: missed "
         "fails only with --strict-goals)", step_goals, ("benchmark",),
         why_cuda="needs CUDA: the goals are for an H100-class GPU", goal=True),
)
STEP_NAMES = tuple(s.name for s in STEPS)


# --- running and reporting -------------------------------------------------------------------

def selected(only: Sequence[str] | None, steps: Sequence[Step] = STEPS) -> set[str]:
    """The steps to run: `only` and every step they require (all steps without `only`)."""
    if not only:
        return {s.name for s in steps}
    by_name = {s.name: s for s in steps}
    chosen: set[str] = set()
    todo = list(only)
    while todo:
        name = todo.pop()
        if name not in chosen:
            chosen.add(name)
            todo.extend(by_name[name].requires)
    return chosen


def skip_reason(step: Step, check: Check, done: dict[str, StepResult],
                chosen: set[str]) -> str | None:
    """Why `step` does not run here, or None when it runs."""
    if step.name not in chosen:
        return "not selected (--only)"
    if step.needs_cuda and not check.cuda:
        return step.why_cuda
    if step.min_gpus > check.gpus:
        return f"needs {step.min_gpus} GPUs, {check.gpus} present"
    for name in step.requires:
        if done[name].status != PASSED:
            return f"needs step {name}, which {done[name].status}"
    return None


def run_step(step: Step, check: Check) -> StepResult:
    """Run one step, timing it; an exception is a failure with its message (and traceback in
    the report), Skip a skip with its reason."""
    result = StepResult(step.name, step.needs_cuda, step.goal, FAILED, "",
                        check.device.type, None, step.checks)
    log.info("step %s ...", step.name)
    start = time.perf_counter()
    try:
        outcome = step.run(check)
    except Skip as skip:
        result.status, result.reason, result.device = SKIPPED, str(skip), None
    except Exception as exc:  # noqa: BLE001 - a failing step is reported, the next ones run
        result.reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:500]}" \
            if str(exc).strip() else type(exc).__name__
        result.error = traceback.format_exc()
    else:
        result.status = PASSED if outcome.passed else (MISSED if step.goal else FAILED)
        result.figures, result.headline = outcome.figures, outcome.headline
        result.reason = outcome.problem
    finally:
        result.seconds = time.perf_counter() - start
        free_memory(check.device)
    log.info("step %s %s in %.1f s%s", step.name, result.status, result.seconds,
             f": {result.reason}" if result.reason else "")
    return result


def run_all(check: Check, only: Sequence[str] | None = None,
            steps: Sequence[Step] = STEPS) -> list[StepResult]:
    chosen = selected(only, steps)
    done: dict[str, StepResult] = {}
    for step in steps:
        reason = skip_reason(step, check, done, chosen)
        if reason is not None:
            done[step.name] = StepResult(step.name, step.needs_cuda, step.goal, SKIPPED, reason,
                                         None, None, step.checks)
            continue
        done[step.name] = run_step(step, check)
    return list(done.values())


def exit_code(results: Sequence[StepResult], strict_goals: bool = False) -> int:
    """1 when an executed step failed (or missed its goal under strict_goals), else 0."""
    bad = {FAILED, MISSED} if strict_goals else {FAILED}
    return int(any(r.status in bad for r in results))


def counts(results: Sequence[StepResult]) -> dict[str, int]:
    return {status: sum(r.status == status for r in results)
            for status in (PASSED, FAILED, SKIPPED, MISSED)}


ENVIRONMENT_SKIPS = ("needs 2 GPUs", "onnxruntime-gpu is not installed")
"""Skips of CUDA steps that say what this machine lacks, not that the check broke."""


def cuda_proven(results: Sequence[StepResult], mode: str) -> bool:
    """True for a CUDA run in which no step failed and every CUDA step passed (or measured its
    goal), except those this machine cannot run (one GPU: nccl; no onnxruntime-gpu)."""
    if mode != "cuda" or any(r.status == FAILED for r in results):
        return False
    return all(r.status in (PASSED, MISSED) or r.reason.startswith(ENVIRONMENT_SKIPS)
               for r in results if r.needs_cuda)


def summary_table(results: Sequence[StepResult], mode: str, width: int = 100) -> str:
    """The table printed at the end: one row per step, then what the run proved."""
    rows = [("step", "CUDA", "device", "status", "seconds", "figures / reason")]
    for r in results:
        text = r.headline if r.status == PASSED else (
            r.reason if not r.headline else f"{r.reason} [{r.headline}]")
        rows.append((r.name, "yes" if r.needs_cuda else "-", r.device or "-", r.status,
                     "-" if r.seconds is None else f"{r.seconds:.1f}", text))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for i, row in enumerate(rows):
        fixed = "  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths))
        lines.append(f"{fixed}  {row[5]}".rstrip())
        if i == 0:
            lines.append("-" * min(width, len(lines[0]) + 20))
    n = counts(results)
    cuda_steps = [r for r in results if r.needs_cuda]
    lines.append("")
    lines.append(f"{n[PASSED]} passed, {n[FAILED]} failed, {n[SKIPPED]} skipped, "
                 f"{n[MISSED]} missed goal(s)")
    if mode == "dry":
        lines.append(f"DRY MODE (no CUDA device): the steps above ran on the CPU at tiny sizes; "
                     f"{sum(r.status == SKIPPED for r in cuda_steps)} CUDA step(s) were skipped. "
                     "The CUDA paths are NOT proven by this run.")
    elif cuda_proven(results, mode):
        lines.append("CUDA run: every CUDA step that this machine can run passed.")
    else:
        lines.append("CUDA run: the CUDA paths are NOT all proven (failed or skipped steps "
                     "above).")
    return "\n".join(lines)


def environment(check: Check) -> dict[str, Any]:
    """What the check ran on and with."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda, "cudnn": None, "gpus": [],
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
    }
    if torch.cuda.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            env["gpus"].append({"name": props.name, "compute_capability":
                                f"{props.major}.{props.minor}",
                                "memory_gb": round(props.total_memory / 2**30, 1)})
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        env["onnxruntime"] = None
    return env


def report(check: Check, results: Sequence[StepResult], seconds: float, argv: Sequence[str],
           started: str) -> dict[str, Any]:
    """The JSON report: the run, its environment, and every step with every figure."""
    n = counts(results)
    cuda_steps = [r for r in results if r.needs_cuda]
    return {
        "format": REPORT_FORMAT, "mode": check.mode, "started": started,
        "seconds": seconds, "budget_s": BUDGET_S if check.cuda else None,
        "within_budget": seconds <= BUDGET_S if check.cuda else None,
        "command": list(argv), "environment": environment(check), "counts": n,
        "cuda_proven": cuda_proven(results, check.mode),
        "skipped_cuda_steps": [r.name for r in cuda_steps if r.status == SKIPPED],
        "steps": [dataclasses.asdict(r) for r in results],
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Prove the CUDA paths on a GPU (or run the dry mode without one).",
        epilog="Steps: " + ", ".join(STEP_NAMES) + ". See docs/gpu-check.md.")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"),
                        help="the JSON report (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the dry mode even where CUDA is available (automatic without it)")
    parser.add_argument("--only", nargs="+", choices=STEP_NAMES, metavar="STEP",
                        help="run these steps (and the steps they need) only")
    parser.add_argument("--benchmark", choices=("check", "full"), default="check",
                        help="CUDA: 'check' (default) times every precision x layout x batch "
                             "eager and channels-last batch 1 compiled, to fit 8 minutes; "
                             "'full' runs the benchmark stage's full profile exactly (longer)")
    parser.add_argument("--strict-goals", action="store_true",
                        help="a missed performance goal fails the run")
    parser.add_argument("--workdir", type=Path,
                        help="keep the data, checkpoints and logs here (default: a temporary "
                             "folder, removed at the end)")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="the library's own log lines and progress bars too")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for step in STEPS:
            print(f"{step.name:16} {'CUDA' if step.needs_cuda else '-':5} {step.checks}")
        return 0
    if not args.verbose:
        os.environ.setdefault("TQDM_DISABLE", "1")  # the library's bars, here and in stages
    logging.basicConfig(level=logging.INFO, datefmt="%H:%M:%S",
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("fcn").setLevel(logging.INFO if args.verbose else logging.WARNING)
    cuda = torch.cuda.is_available() and not args.dry_run
    mode = "cuda" if cuda else "dry"
    if not cuda:
        log.info("dry mode (%s): CPU steps at tiny sizes, CUDA steps listed as skipped",
                 "--dry-run" if torch.cuda.is_available() else "no CUDA device")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(mode=mode, device=torch.device("cuda" if cuda else "cpu"), work=work.resolve(),
                  sizes=cuda_sizes(args.benchmark) if cuda else dry_sizes(),
                  gpus=torch.cuda.device_count() if cuda else 0)
    try:
        results = run_all(check, args.only)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    write_json(args.out, report(check, results, seconds, sys.argv, started))
    print(summary_table(results, mode))
    if "benchmark" in check.artifacts:
        from fcn.benchmark.report import markdown_table

        print("\nBenchmark configurations:\n" + markdown_table(check.artifacts["benchmark"]))
    print(f"\n{mode} run in {seconds:.0f} s; report: {args.out}")
    return exit_code(results, args.strict_goals)


if __name__ == "__main__":
    sys.exit(main())
