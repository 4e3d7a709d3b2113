"""The check's two profiles, their sizes, and an estimate of their GPU time.

- `loan`: every CUDA path one GPU can run, at small sizes where size does not matter and at
  the Cityscapes recipe where it does (the loader's data-wait fraction, the sync-free window,
  compile against eager): ≤ 4 minutes on one H100 with 16 cores. The costliest and least
  essential step (compile) comes last, so a short budget cuts it first.
- `benchmark`: the inference configurations that decide the latency and memory goals
  (batch 1, channels-last, eager in every precision, compiled in bf16/fp16, slide mode),
  eager ones in one worker process, short warm-ups, the matmul rate probed once per
  precision: ≤ 4 minutes.
- `all`: both, loan first (the benchmark then times the loan's trained checkpoint).

The estimate (`estimate`) adds, per step of the GPU run: its GPU work (FLOPs of the FCN8s
passes it makes, from `fcn.benchmark.flops`, at an assumed sustained rate per precision),
fresh CUDA processes (interpreter, torch, CUDA context), torch.compile runs, cuDNN autotuning
of each new shape, and its host work (synthesis, masks, decoding) scaled from what the dry
run of the same step measured on this machine per megapixel. The rates and costs are
assumptions, stated in ASSUMED; the sizes are the code's own.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fcn.benchmark.flops import analytic_flops
from fcn.cityscapes.labels import NUM_CLASSES
from fcn.gpucheck import benchmark, data, deploy, predict, train
from fcn.gpucheck.runner import Step
from fcn.model import FCN8s
from fcn.params import BenchmarkParams, SynthesizeParams

PROFILES = ("loan", "benchmark", "all")
BUDGET_S = {"loan": 240.0, "benchmark": 240.0}
"""What each profile must take on one H100 with 16 cores (the estimate is held to it)."""


@dataclass(frozen=True)
class Sizes:
    """How big each step's work is: tiny in dry mode, real on a GPU."""

    small: SynthesizeParams
    """kill/resume and DDP data; the precision steps' val images"""
    large: SynthesizeParams
    """full-size images: recipe crops, the loader, slide mode and the OOM fallback"""
    overfit: SynthesizeParams
    """the overfit's train images (all of them, whole): the trained checkpoint"""
    steps_batch: int
    steps_crop: tuple[int, int]
    steps: int
    window_batch: int
    window_crop: tuple[int, int]
    window_steps: int
    compile_batch: int
    compile_crop: tuple[int, int]
    compile_steps: int
    overfit_max_steps: int
    resume_epochs: int
    resume_batch: int
    resume_crop: tuple[int, int]
    loader_epochs: int
    loader_crop: tuple[int, int] | None
    """None: the recipe's crop; else a crop in the same proportion to tiny images"""
    loader_batch: int | None
    loader_workers: int | None
    """None: the recipe's (train.workers auto)"""
    slide_window: tuple[int, int]
    slide_stride: tuple[int, int]
    benchmark: BenchmarkParams
    data_workers: int


def dry_sizes() -> Sizes:
    """Tiny sizes for a CPU: the dry run of both profiles in a few minutes on two cores."""
    small = SynthesizeParams(seed=7, height=64, width=128, train_cities=["aachen", "bochum"],
                             val_cities=["frankfurt"], test_cities=["berlin"],
                             train_per_city=3, val_per_city=2, test_per_city=1,
                             train_extra_cities=[])
    large = dataclasses.replace(small, seed=11, train_cities=["aachen"], train_per_city=4)
    overfit = dataclasses.replace(small, seed=3, train_cities=["aachen"], train_per_city=1,
                                  val_per_city=1)
    bench = BenchmarkParams(profile="quick", device="cpu", height=64, width=128,
                            channels_last=[True], window=[32, 64], stride=[21, 42],
                            onnxruntime=False, matmul_size=256, quick_batch_sizes=[1],
                            quick_warmup=1, quick_iters=2, quick_compile=[False])
    return Sizes(small=small, large=large, overfit=overfit, steps_batch=2, steps_crop=(32, 64),
                 steps=8, window_batch=2, window_crop=(32, 64), window_steps=3,
                 compile_batch=2, compile_crop=(64, 64), compile_steps=2,
                 overfit_max_steps=150, resume_epochs=2, resume_batch=2, resume_crop=(64, 64),
                 loader_epochs=2, loader_crop=(32, 64), loader_batch=2, loader_workers=2,
                 slide_window=(32, 64), slide_stride=(21, 42), benchmark=bench, data_workers=1)


def cuda_sizes() -> Sizes:
    """The GPU run's sizes: 1024x2048 where the size is the point, small elsewhere."""
    small = SynthesizeParams(seed=7, height=256, width=512, train_cities=["aachen", "bochum"],
                             val_cities=["frankfurt"], test_cities=["berlin"],
                             train_per_city=4, val_per_city=4, test_per_city=1,
                             train_extra_cities=[])
    large = SynthesizeParams(seed=11, height=1024, width=2048, train_cities=["aachen"],
                             val_cities=["frankfurt"], test_cities=["berlin"],
                             train_per_city=48, val_per_city=2, test_per_city=1,
                             train_extra_cities=[])
    overfit = dataclasses.replace(small, seed=3, train_cities=["aachen"], train_per_city=2,
                                  val_per_city=1)
    bench = BenchmarkParams(profile="full", device="cuda", channels_last=[True],
                            full_batch_sizes=[1], full_warmup=5, full_iters=20,
                            full_compile=[False], slide=True, onnxruntime=True)
    return Sizes(small=small, large=large, overfit=overfit, steps_batch=4,
                 steps_crop=(256, 512), steps=12, window_batch=8, window_crop=(512, 1024),
                 window_steps=10, compile_batch=8, compile_crop=(512, 1024), compile_steps=10,
                 overfit_max_steps=300, resume_epochs=3, resume_batch=4, resume_crop=(128, 256),
                 loader_epochs=3, loader_crop=None, loader_batch=None, loader_workers=None,
                 slide_window=(512, 1024), slide_stride=(341, 683), benchmark=bench,
                 data_workers=16)


AGREE = f">= {benchmark.MIN_AGREEMENT:.1%} of pixels"
LOAN: tuple[Step, ...] = (
    Step("data", "synthetic Cityscapes roots (fcn.synthetic), their labelTrainIds masks "
         "(fcn.masks.generate) and decoded caches (fcn.decode): every image paired with "
         "its mask", data.step_data, (60, 120)),
    *(Step(f"train_{p}", f"optimizer steps of train_one_epoch on one fixed recipe batch in "
           f"{p}: loss finite and its last-quarter mean < {train.MIN_DECREASE} x the first "
           "quarter's", functools.partial(train.step_precision, precision=p), (25, 60),
           proves=proves, requires=("data",), dry="fakes")
      for p, proves in (("fp32", "fp32 training, strict (TF32 off)"),
                        ("tf32", "tf32 training (TF32 tensor-core math)"),
                        ("bf16", "bf16 autocast training"),
                        ("fp16", "fp16 autocast training with GradScaler (fused optimizer)"))),
    Step("sync_free", "a window of TrainStep calls at the recipe's crop: bf16 under "
         "torch.cuda.set_sync_debug_mode('error') (any synchronising call raises), fp16 under "
         "'warn' (counted); dry: the same steps on the meta device, where any host read "
         "raises", train.step_sync_free, (30, 60),
         proves="training steps that never wait for the GPU", requires=("data",), dry="meta"),
    Step("overfit", "two images (dry: one), whole, no augmentation, bf16 on CUDA: val mIoU >= "
         f"{train.OVERFIT_MIOU} within the step budget; saved as the check's trained checkpoint",
         train.step_overfit, (45, 180), proves="bf16 training to convergence",
         requires=("data",)),
    Step("kill_resume", "stages/train.py (fp16 on CUDA) SIGKILLed after epoch 1 then rerun, "
         "against an uninterrupted run: resumed from the state folder, published to train.out; "
         "CPU bit-identical; CUDA |val mIoU diff| <= "
         f"{train.RESUME_MIOU_TOL}, |val loss diff| <= {train.RESUME_LOSS_TOL:.0%}, GPU RNG "
         "and scaler state saved", train.step_kill_resume, (75, 180),
         proves="kill/resume of the train stage on CUDA (fp16 scaler, GPU RNG state)",
         requires=("data",)),
    Step("ddp_gloo", "stages/train.py with train.nproc 2 on the CPU (torchrun, gloo): logged "
         "val mIoU equals one process re-validating the saved model",
         functools.partial(train.step_ddp, nproc=2), (120, 180), requires=("data",),
         cuda=False),
    Step("ddp_nccl", "stages/train.py with one process per GPU (torchrun, nccl, sync_bn): "
         f"SyncBatchNorm over all processes; logged val mIoU within {train.DDP_MIOU_TOL_CUDA} "
         "of one process re-validating the saved model",
         lambda c: train.step_ddp(c, min(c.gpus, 8)), (90, 60),
         proves="nccl DDP with SyncBatchNorm", requires=("data",), min_gpus=2, dry="skip",
         dry_reason="needs 2 GPUs: nccl and SyncBatchNorm cannot run without them"),
    Step("loader", "fit() at the named recipe (crop 512x1024, scale 0.5-2.0, flip, jitter 0.5, "
         "batch 8, bf16, its workers) on 1024x2048 images, from the decoded cache and from the "
         "PNGs: the last epoch's loader wait and samples/s of each (a measurement)",
         train.step_loader, (90, 240),
         proves="fit() on CUDA: pinned loader, data-wait fraction at the recipe",
         requires=("data",), dry="fakes"),
    Step("predict_fp32", f"Predictor on the trained checkpoint, strict fp32 NCHW as the "
         f"reference (val and trained-on images); channels-last fp32 agrees on {AGREE}",
         predict.step_reference, (20, 60), proves="strict fp32 inference",
         requires=("overfit",), dry="fakes"),
    *(Step(f"predict_{p}", f"evaluate/export in {p} (channels-last) against the fp32 "
           f"reference: agreement {gate}", functools.partial(predict.step_precision,
                                                             precision=p), (15, 60),
           proves=f"{p} inference", requires=("predict_fp32",), dry="fakes")
      for p, gate in (("tf32", AGREE + " on val"), ("fp16", AGREE + " on val"),
                      ("bf16", f">= {predict.BF16_MIN_AGREEMENT:.1%} on the images the model "
                               "was trained on"))),
    Step("slide", "Predictor slide mode against whole images at full size: full-size "
         "predictions; on a GPU lower peak allocated memory", predict.step_slide, (20, 60),
         proves="slide mode's memory", requires=("overfit",), dry="fakes"),
    Step("oom_fallback", "a batch that does not fit whole: retried one image at a time, then "
         "slide mode, each logged once; predictions equal slide mode's (GPU: a real OOM under "
         f"fcn.device.memory_cap, {AGREE}; dry: the cap under the fakes, the error injected)",
         predict.step_oom, (20, 60), proves="a real CUDA out-of-memory error, handled",
         requires=("overfit",), dry="fakes"),
    Step("compile", "train.compile: the same bf16 steps under torch.compile and eager at the "
         "recipe's crop: compile time, step time of each, losses finite",
         train.step_compile, (150, 300), proves="train.compile (inductor) training",
         requires=("data",)),
    Step("onnx", "fcn.deploy export of the trained checkpoint, onnxruntime CPU provider: "
         "argmax agreement with PyTorch fp32 >= deploy.min_agreement", deploy.step_onnx,
         (60, 180), requires=("overfit",), cuda=False),
    Step("onnx_cuda", "the ONNX file in onnxruntime's CUDA provider (onnxruntime-gpu): the "
         f"session runs on it, agreement with PyTorch fp32 {AGREE}, latency with io_binding",
         deploy.step_onnx_cuda, (60, 60), proves="onnxruntime's CUDA provider",
         requires=("overfit",), dry="skip",
         dry_reason="needs a GPU and onnxruntime-gpu"),
)

BENCHMARK: tuple[Step, ...] = (
    Step("benchmark", "fcn.benchmark.run.run_benchmark at 1024x2048, batch 1, channels-last: "
         "fp32/tf32/bf16/fp16 eager, slide mode, onnxruntime, compiled bf16/fp16 (dry: the "
         "quick profile on the CPU, then the CUDA protocol in-process under the fakes): no "
         f"configuration fails, a fast path agrees with fp32 on {AGREE}",
         benchmark.step_benchmark, (210, 240),
         proves="the inference benchmark on CUDA (events, allocator peaks, compile)",
         dry="fakes"),
    Step("benchmark_goals", f"one 1024x2048 image, batch 1, agreeing with fp32: <= "
         f"{benchmark.GOAL_LATENCY_MS} ms (stretch {benchmark.GOAL_STRETCH_MS} ms) and <= "
         f"{benchmark.GOAL_MEMORY_BYTES / 1e9} GB peak allocated in one configuration (a goal: "
         "missed fails only with --strict-goals)", benchmark.step_goals, (5, 5),
         requires=("benchmark",), dry="skip", dry_reason="judges GPU figures", goal=True),
)


def steps(profile: str) -> tuple[Step, ...]:
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    return {"loan": LOAN, "benchmark": BENCHMARK, "all": LOAN + BENCHMARK}[profile]


# --- the estimate ----------------------------------------------------------------------------

ASSUMED: dict[str, Any] = {
    "tflops": {"fp32": 40.0, "tf32": 200.0, "bf16": 300.0, "fp16": 300.0},
    "process_start_s": 8.0,
    "compile_train_s": 60.0,
    "compile_infer_s": 35.0,
    "autotune_s": 1.0,
    "cuda_cores": 16,
    "png_decode_ms": 40.0,
}
"""The estimate's assumptions for one H100 (SXM, 16 cores): sustained TFLOP/s per precision
(the dense peaks are 67/495/990/990; small batches and crops reach a fraction), the start of
a fresh CUDA process (interpreter, torch import, CUDA context), one torch.compile of FCN8s
(training: forward and backward; inference with freezing), cuDNN autotuning of one new shape,
the cores the host work spreads over, and one 1024x2048 PNG decode."""


@functools.lru_cache(maxsize=None)
def forward_flops(height: int, width: int) -> int:
    """FLOPs of one FCN8s/VGG11-BN forward pass of one image (analytic, no tensors)."""
    with torch.device("meta"):
        model = FCN8s("vgg11_bn", NUM_CLASSES)
    return analytic_flops(model, height, width).flops


def _gpu_s(flops: float, precision: str) -> float:
    return flops / (ASSUMED["tflops"][precision] * 1e12)


def _train_s(samples: int, crop: tuple[int, int], precision: str) -> float:
    return _gpu_s(3 * samples * forward_flops(*crop), precision)


def _infer_s(images: int, size: tuple[int, int], precision: str) -> float:
    return _gpu_s(images * forward_flops(*size), precision)


def _images(p: SynthesizeParams, split: str) -> int:
    return len(getattr(p, f"{split}_cities")) * getattr(p, f"{split}_per_city")


def _total_images(p: SynthesizeParams) -> int:
    return sum(_images(p, s) for s in ("train", "val", "test"))


def estimate(profile: str, sizes: Sizes, host_s_per_megapixel: float,
             dry_workers: int) -> dict[str, float]:
    """Estimated seconds of each step of `profile` on one H100 (ASSUMED) at `sizes`, given the
    host work per megapixel the dry run measured on `dry_workers` processes."""
    a = ASSUMED
    cores = a["cuda_cores"]
    s = sizes
    big = (s.large.height, s.large.width)
    small = (s.small.height, s.small.width)
    megapixels = sum(_total_images(p) * p.height * p.width
                     for p in (s.small, s.large, s.overfit)) / 1e6
    recipe_batches = 8
    per_epoch = -(-_images(s.large, "train") // recipe_batches)
    costs: dict[str, Callable[[], float]] = {
        "data": lambda: megapixels * host_s_per_megapixel * dry_workers / cores,
        **{f"train_{p}": (lambda p=p: _train_s(s.steps * s.steps_batch, s.steps_crop, p)
                          + a["autotune_s"]) for p in ("fp32", "tf32", "bf16", "fp16")},
        "sync_free": lambda: sum(_train_s((s.window_steps + 2) * s.window_batch, s.window_crop,
                                          p) for p in ("bf16", "fp16")) + 2 * a["autotune_s"],
        "compile": lambda: (a["compile_train_s"] + 2 * _train_s(
            (s.compile_steps + 1) * s.compile_batch, s.compile_crop, "bf16")),
        "overfit": lambda: (_train_s(s.overfit_max_steps * _images(s.overfit, "train"),
                                     (s.overfit.height, s.overfit.width), "bf16")
                            + s.overfit_max_steps / 10 * 0.05 + a["autotune_s"]),
        "kill_resume": lambda: (2 * a["process_start_s"] + 2 * _train_s(
            s.resume_epochs * _images(s.small, "train"), s.resume_crop, "fp16")
            + 2 * s.resume_epochs * _infer_s(_images(s.small, "val"), small, "fp16")),
        "ddp_gloo": lambda: 0.0,
        "ddp_nccl": lambda: 0.0,
        "loader": lambda: 2 * (2.0 + _train_s(s.loader_epochs * per_epoch * recipe_batches,
                                              (512, 1024), "bf16")
                               + s.loader_epochs * _infer_s(_images(s.large, "val"), big,
                                                            "bf16"))
        + s.loader_epochs * _images(s.large, "train") * a["png_decode_ms"] / 1e3 / cores,
        "predict_fp32": lambda: 2 * _infer_s(_images(s.small, "val") + _images(s.overfit,
                                                                                "train") + 2,
                                             small, "fp32") + 2 * a["autotune_s"],
        **{f"predict_{p}": (lambda p=p: _infer_s(_images(s.small, "val")
                                                 + _images(s.overfit, "train") + 2, small, p)
                            + a["autotune_s"]) for p in ("tf32", "fp16", "bf16")},
        "slide": lambda: 2 * _infer_s(_images(s.large, "val") + 1, big, "fp16") * 2
        + 2 * a["autotune_s"],
        "oom_fallback": lambda: 6 * _infer_s(2, big, "fp16") + 2 * a["autotune_s"],
        "onnx": lambda: 0.0,
        "onnx_cuda": lambda: 0.0,
        "benchmark": lambda: _benchmark_s(s.benchmark),
        "benchmark_goals": lambda: 0.0,
    }
    return {step.name: float(costs[step.name]()) for step in steps(profile)}


def _benchmark_s(params: BenchmarkParams) -> float:
    """Worker starts, compiles, timed calls and matmul probes of the benchmark step."""
    a = ASSUMED
    size = (params.height, params.width)
    total = 0.0
    for run in benchmark.benchmark_runs(params):
        compiled = True in run.full_compile
        precisions = run.precisions
        processes = len(precisions) if compiled else 1
        calls = 1 + run.full_warmup + run.full_iters
        total += processes * a["process_start_s"] + (processes * a["compile_infer_s"]
                                                     if compiled else 0.0)
        total += sum(calls * _infer_s(1, size, p) + a["autotune_s"] for p in precisions)
        total += sum(2 * 21 * 2 * 8192**3 / (a["tflops"][p] * 1e12) for p in precisions)
        if run.slide:
            total += calls * _infer_s(1, size, "fp32") * 2.5 + a["autotune_s"]
    return total


def run_budget(profile: str) -> float:
    """The total budget of a profile (the loan and benchmark budgets together for `all`)."""
    return sum(BUDGET_S[p] for p in (("loan", "benchmark") if profile == "all" else (profile,)))
