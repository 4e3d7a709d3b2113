"""params.yaml → typed, validated objects, and the JSON Schema editors check params.yaml with.

Every section is a frozen dataclass; each field carries its default, numeric range and help in
`metadata`. `load_params` checks the whole file before any stage does work and reports every
problem in one message (unknown keys, missing sections, wrong types, out-of-range values,
constraints between fields). `json_schema()` states the same single-field rules as JSON Schema
(params.schema.json, generated from these classes and tested to be current); the constraints
between fields are the loader's alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fcn.cityscapes.labels import NUM_CLASSES
from fcn.cityscapes.layout import (ANNOTATION_SPLITS, COARSE, ENCODINGS, IMAGE_SPLITS, SEQUENCE,
                                   SOURCES, SPLITS, parse_source)
from fcn.errors import ParamsError
from fcn.fields import check_section, param, section_schema, type_name  # noqa: F401 (re-export)

_p = param  # every field below is declared with it

PARAMS_FILE = "params.yaml"
SCHEMA_FILE = "params.schema.json"


# The names a parameter may take, declared once: the Literals below are derived from them, and
# the code that acts on them (fcn.model, fcn.device, fcn.cityscapes.layout) uses the same tuples.
BACKBONES = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
ARCHS = ("fcn32s", "fcn16s", "fcn8s")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
BENCHMARK_PRECISIONS = PRECISIONS
DEVICES = ("auto", "cpu", "cuda")

Backbone = Literal[BACKBONES]  # type: ignore[valid-type]
Arch = Literal[ARCHS]  # type: ignore[valid-type]
Precision = Literal[PRECISIONS]  # type: ignore[valid-type]
BenchmarkPrecision = Literal[BENCHMARK_PRECISIONS]  # type: ignore[valid-type]
Device = Literal[DEVICES]  # type: ignore[valid-type]
Encoding = Literal[ENCODINGS]  # type: ignore[valid-type]
ClassWeightScheme = Literal["enet", "median_frequency"]
Split = Literal[SPLITS]  # type: ignore[valid-type]
CoarseSplit = Literal[ANNOTATION_SPLITS[COARSE]]  # type: ignore[valid-type]
Source = Literal[SOURCES]  # type: ignore[valid-type]
INT8_METHODS = ("minmax", "entropy", "percentile")
"""Calibration methods of the int8 model (fcn.quantize maps them to onnxruntime's)."""
CALIBRATION_SPLITS = tuple(split for split in IMAGE_SPLITS if split != "val")
"""Splits the int8 model may calibrate on: any but val, which its check scores."""
Int8Method = Literal[INT8_METHODS]  # type: ignore[valid-type]
CalibrationSplit = Literal[CALIBRATION_SPLITS]  # type: ignore[valid-type]


@dataclass(frozen=True)
class DataParams:
    root: str = _p("data/synthetic", help="dataset root in the official Cityscapes layout")
    generated: str = _p("data/generated", help="where generated masks are written")
    max_pixels: int = _p(2**26, ge=1, help="largest width x height accepted from any file "
                         "(annotation, image or mask header, prediction), checked before "
                         "anything that size is allocated (2**26: 32 Cityscapes frames)")


@dataclass(frozen=True)
class SynthesizeParams:
    seed: int = _p(0, ge=0, help="seed of every image and annotation (same seed: byte-identical data)")
    height: int = _p(128, ge=32, le=1024, help="image height in pixels (Cityscapes: 1024)")
    width: int = _p(256, ge=32, le=2048, help="image width in pixels (Cityscapes: 2048)")
    train_cities: list[str] = _p(["aachen", "bochum", "bremen", "cologne"],
                                 help="cities of the train split (lowercase letters, digits)")
    val_cities: list[str] = _p(["frankfurt", "lindau", "munster"], help="cities of the val split")
    test_cities: list[str] = _p(["berlin", "bielefeld"], help="cities of the test split")
    train_per_city: int = _p(24, ge=1, help="train images per city")
    val_per_city: int = _p(6, ge=1, help="val images per city")
    test_per_city: int = _p(4, ge=1, help="test images per city (annotations withheld)")
    train_extra_cities: list[str] = _p(["augsburg", "dortmund"], help="cities of the "
                                       "train_extra split (coarse annotations only; [] for none)")
    train_extra_per_city: int = _p(8, ge=1, help="train_extra images per city")
    coarse: bool = _p(True, help="also write gtCoarse annotations (coarser polygons, fewer "
                      "objects) for train, train_extra and val, as Cityscapes ships them")
    sequence_frames: int = _p(0, ge=0, le=300, help="frames of a synthetic video sequence "
                              "(a camera pan across a scene twice the image width), written as "
                              "leftImg8bit_sequence/val/<first val city>/ like Cityscapes' "
                              "snippets, for export.sequence; 0 = none (every other file is "
                              "the same either way)")


@dataclass(frozen=True)
class MasksParams:
    encodings: list[Encoding] = _p(list(ENCODINGS), help="mask encodings to write")
    workers: int = _p(2, ge=1, help="worker processes")
    splits: list[Split] = _p(list(SPLITS), help="splits whose annotations are rendered")
    worst: int = _p(10, ge=0, help="images listed in plots/masks/worst.json")
    figure_images: int = _p(3, ge=0, help="images shown as provided | generated | difference")


@dataclass(frozen=True)
class DecodeParams:
    """The decoded cache of the train and val splits (stage `decode`, read by train)."""

    enabled: bool = _p(True, help="decode the train and val images and masks once into raw "
                       "arrays the train loader memory-maps (real Cityscapes: ~28 GB); false: "
                       "the loader decodes PNGs")
    workers: int = _p(2, ge=1, help="threads decoding (PNG decoding releases the GIL)")
    out: str = _p("data/decoded", help="the cache folder")


@dataclass(frozen=True)
class ModelParams:
    arch: Arch = _p("fcn8s", help="the FCN head (Long et al.): fcn32s (no skip, x32 "
                    "upsampling), fcn16s (+ pool4 skip), fcn8s (+ pool3 skip)")
    backbone: Backbone = _p("vgg11_bn", help="torchvision VGG whose features the FCN builds on")
    weights: str = _p("none", help="'none', 'imagenet' or a path to a backbone state dict")
    fc67: bool = _p(False, help="fc6/fc7 as convolutions (adds ~245 GMACs at 1024x2048)")
    fc_channels: int = _p(4096, ge=1, le=16384, help="width of fc6/fc7 (when fc67 is true; "
                          "VGG's is 4096)")


@dataclass(frozen=True)
class TrainParams:
    seed: int = _p(0, ge=0, help="initial weights, shuffling and augmentation")
    epochs: int | None = _p(12, ge=1, help="passes over the training splits (or null, with "
                            "iterations set)")
    iterations: int | None = _p(None, ge=1, help="optimizer steps in all, instead of epochs "
                                "(mmseg schedules: 40000, 80000); the last epoch stops there")
    batch_size: int = _p(8, ge=1, help="training crops per forward pass and per process")
    accumulate: int = _p(1, ge=1, help="forward passes per optimizer step: the effective "
                         "batch is batch_size x accumulate x processes")
    splits: list[Source] = _p(["train"], help="(split, annotation set) pairs trained on: "
                              "`train`, `val` (gtFine) or `gtCoarse/train`, "
                              "`gtCoarse/train_extra`, `gtCoarse/val`; with val among them, "
                              "best.pt is the last epoch (val no longer measures "
                              "generalisation)")
    optimizer: Literal["sgd", "adamw"] = _p("adamw", help="SGD with momentum, or AdamW")
    lr: float = _p(2e-3, gt=0, help="peak learning rate (poly decay per iteration)")
    momentum: float = _p(0.9, ge=0, lt=1, help="SGD momentum (sgd only)")
    weight_decay: float = _p(1e-4, ge=0, help="on weights only, not on biases and BN")
    poly_power: float = _p(0.9, ge=0, help="exponent of the poly LR decay (0 = constant)")
    warmup_iters: int = _p(0, ge=0, help="linear LR warm-up iterations (optimizer steps)")
    head_lr_mult: float = _p(1.0, gt=0, help="LR of the new layers (score, upsampling, fc6/7) "
                             "as a multiple of the backbone's (torchvision's references: 10)")
    crop: list[int] = _p([128, 128], help="[height, width] of training crops")
    scale: list[float] = _p([0.75, 1.5], help="[min, max] random rescale factor")
    flip: bool = _p(True, help="random horizontal flips")
    jitter: float = _p(0.2, ge=0, le=1, help="photometric jitter strength (0 = off)")
    class_uniform: float = _p(0.0, ge=0, le=1, help="share of crops centred on a pixel of a "
                              "class drawn uniformly among the split's (NVIDIA's class-uniform "
                              "sampling: 0.5; 0 = off)")
    cat_max_ratio: float = _p(1.0, gt=0, le=1, help="draw a crop window again when one class "
                              "covers at least this share of its labelled pixels "
                              "(mmsegmentation's Cityscapes: 0.75; 1 = off)")
    cat_max_tries: int = _p(10, ge=1, le=100, help="windows tried per crop for cat_max_ratio "
                            "(mmsegmentation: 10); the last is kept when none passes")
    class_weights: list[float] | ClassWeightScheme | None = _p(
        None, help=f"{NUM_CLASSES} weights, null, or a scheme computed from the train split's "
        "pixel histogram by the class_weights stage: enet (1/ln(1.02 + p)) or median_frequency")
    patience: int | None = _p(None, ge=1, help="early stopping: stop after this many epochs "
                              "without a val mIoU gain (null = off)")
    val_every: int = _p(1, ge=1, help="validate after every N-th epoch and after the last "
                        "(best.pt and patience consider validated epochs only)")
    sync_bn: bool = _p(False, help="SyncBatchNorm across processes under DDP on CUDA (batch "
                       "statistics of the global batch); plain BN otherwise, with a log line")
    monitor_system: bool = _p(True, help="DVCLive system metrics (CPU, RAM, GPU) while training")
    precision: Precision = _p("bf16", help="on CUDA: fp32 strict, tf32 (TF32 tensor-core "
                              "math), bf16/fp16 mixed precision; a CPU always trains fp32")
    compile: bool = _p(False, help="torch.compile the training model (the first steps take "
                       "longer; validation stays eager)")
    log_every: int = _p(50, ge=1, help="forward passes between the host's reads of the "
                        "training figures (running loss, NaN check): the steps between never "
                        "wait for the GPU")
    workers: int | Literal["auto"] = _p(
        "auto", ge=0, help="DataLoader worker processes; auto: 0 on CPU (the model uses every "
        "core), on CUDA the cores per training process minus one, at most 16")
    nproc: int = _p(1, ge=1, help="processes for torchrun/DDP (the stage launches them)")
    max_restarts: int = _p(0, ge=0, help="torchrun restarts of the whole process group after a "
                           "worker fails (> 0 runs under torchrun, with nproc 1 too); each "
                           "restart resumes from the last completed epoch")
    device: Device = _p("auto", help="auto: CUDA when present, else CPU")
    out: str = _p("models", help="final checkpoints (best.pt, last.pt), written when training "
                  "ends: a DVC-cached output, restored from the run-cache")
    init: str | None = _p(None, help="a checkpoint of this project (any class count, same "
                          "backbone) that initialises the whole model: every tensor whose name "
                          "and shape match is loaded, the rest start as model.weights says "
                          "(fine-tuning; coarse -> fine)")
    resume_dir: str | None = _p(None, help="where a run's checkpoints live until it ends, one "
                                "folder per training-parameter hash, so a killed run resumes; "
                                "null: $XDG_CACHE_HOME/fcn-cityscapes/resume (~/.cache/...)")


@dataclass(frozen=True)
class CoarseParams:
    """The coarse → fine pipeline (`make coarse`: recipes/coarse_to_fine.yaml): gtCoarse's
    masks, pre-training on them, then fine-tuning on gtFine from the pre-trained model. Each
    phase trains with `train`'s parameters but for the fields here."""

    generated: str = _p("data/generated_coarse", help="where the coarse_masks stage writes "
                        "gtCoarse's masks (apart from data.generated: each stage replaces its "
                        "folder whole)")
    splits: list[CoarseSplit] = _p(list(ANNOTATION_SPLITS[COARSE]), help="gtCoarse splits "
                                   "whose annotations are rendered")
    pretrain_splits: list[Source] = _p(["gtCoarse/train", "gtCoarse/train_extra"], help=""
                                       "what pre-training reads (train.splits' notation)")
    pretrain_epochs: int | None = _p(12, ge=1, help="pre-training epochs (or null, with "
                                     "pretrain_iterations set)")
    pretrain_iterations: int | None = _p(None, ge=1, help="pre-training optimizer steps "
                                         "instead of epochs")
    pretrain_lr: float | None = _p(None, gt=0, help="pre-training's peak learning rate "
                                   "(null: train.lr)")
    pretrain_out: str = _p("models_coarse", help="pre-training's best.pt and last.pt")
    finetune_splits: list[Source] = _p(["train"], help="what fine-tuning reads")
    finetune_epochs: int | None = _p(12, ge=1, help="fine-tuning epochs (or null, with "
                                     "finetune_iterations set)")
    finetune_iterations: int | None = _p(None, ge=1, help="fine-tuning optimizer steps "
                                         "instead of epochs")
    finetune_lr: float | None = _p(None, gt=0, help="fine-tuning's peak learning rate (null: "
                                   "train.lr)")
    finetune_out: str = _p("models_finetune", help="fine-tuning's best.pt and last.pt; it "
                           "starts from pretrain_out's last.pt (train.init)")


PHASES = ("pretrain", "finetune")
"""The coarse pipeline's training phases, in order."""


def phase_train(train: TrainParams, coarse: CoarseParams, phase: str) -> TrainParams:
    """`train` with a coarse → fine phase's fields: its sources, schedule, learning rate and
    output folder; fine-tuning starts from pre-training's last.pt (the end of the coarse
    schedule, as NVIDIA's and mmsegmentation's Cityscapes recipes fine-tune, not a
    checkpoint chosen on val)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    get = lambda key: getattr(coarse, f"{phase}_{key}")  # noqa: E731
    changes: dict[str, Any] = {"splits": get("splits"), "epochs": get("epochs"),
                               "iterations": get("iterations"), "out": get("out"),
                               "lr": get("lr") if get("lr") is not None else train.lr}
    if phase == "finetune":
        changes["init"] = f"{coarse.pretrain_out}/last.pt"
    return dataclasses.replace(train, **changes)


@dataclass(frozen=True)
class StagedParams:
    """The paper's staged training (`make staged`: recipes/staged.yaml): FCN-32s, then FCN-16s
    initialised from it, then FCN-8s from that. Each step trains with `train`'s and `model`'s
    parameters but for the arch and the fields here."""

    epochs: int | None = _p(12, ge=1, help="epochs of each step (or null, with iterations set)")
    iterations: int | None = _p(None, ge=1, help="optimizer steps of each step instead of "
                                "epochs")
    lr_decay: float = _p(1.0, gt=0, le=1, help="each step's peak learning rate is the previous "
                         "step's times this (FCN-32s: train.lr). The paper lowers it 100x for "
                         "fixed-LR SGD on a summed loss; here every step has its own poly "
                         "schedule and AdamW, so 1 (each step at train.lr)")
    out: str = _p("models_staged", help="each step's best.pt and last.pt, in <out>/<arch>; "
                  "FCN-16s starts from <out>/fcn32s/last.pt, FCN-8s from <out>/fcn16s/last.pt")


STAGES = ARCHS
"""The staged recipe's steps, in order: each arch of the family from the one before."""


def staged_params(model: ModelParams, train: TrainParams, staged: StagedParams,
                  arch: str) -> tuple[ModelParams, TrainParams]:
    """`model` and `train` for one step of staged training: the step's arch, schedule, peak
    learning rate (train.lr x lr_decay per earlier step) and output folder; a step after the
    first starts from the previous step's last.pt (the end of its schedule, as the paper
    initialises FCN-16s with the trained FCN-32s, not a checkpoint chosen on val). The first
    keeps train.init."""
    if arch not in STAGES:
        raise ValueError(f"arch must be one of {STAGES}, got {arch!r}")
    index = STAGES.index(arch)
    changes: dict[str, Any] = {"epochs": staged.epochs, "iterations": staged.iterations,
                               "lr": train.lr * staged.lr_decay ** index,
                               "out": f"{staged.out}/{arch}"}
    if index:
        changes["init"] = f"{staged.out}/{STAGES[index - 1]}/last.pt"
    return dataclasses.replace(model, arch=arch), dataclasses.replace(train, **changes)


@dataclass(frozen=True)
class InferenceParams:
    """How a trained model predicts: the fields evaluate and export share (and their
    defaults), read by `fcn.predict.predictor.Predictor.from_params`."""

    batch_size: int = _p(2, ge=1, help="whole images per forward pass")
    flip_tta: bool = _p(False, help="average with the horizontally flipped image's prediction")
    precision: Precision = _p("fp16", help="on CUDA: fp32 strict, tf32, or autocast to "
                              "bf16/fp16; a CPU always runs fp32")
    channels_last: bool = _p(True, help="channels-last memory format for model and inputs")
    device: Device = _p("auto", help="auto: CUDA when present, else CPU")
    workers: int = _p(2, ge=1, help="threads reading images ahead of the model and writing "
                      "its outputs")
    mode: Literal["whole", "slide"] = _p(
        "whole", help="whole images, or sliding windows (less memory; see window, stride)")
    window: list[int] = _p([512, 1024], help="[height, width] of a sliding window (slide mode, "
                           "and the fallback when whole images run out of CUDA memory)")
    stride: list[int] = _p([341, 683], help="[height, width] step between sliding windows")
    scales: list[float] = _p([1.0], help="test-time scales; several average their probabilities "
                             "at full resolution (e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])")


@dataclass(frozen=True)
class EvaluateParams(InferenceParams):
    ground_truth: Literal["generated", "dataset"] = _p(
        "generated", help="score against data.generated masks, or the ones shipped in data.root")
    samples: int = _p(4, ge=0, help="sample images (image | truth | prediction) in plots")
    sample_width: int = _p(512, ge=32, help="width of each panel of a sample image")
    boundary_ratio: float = _p(0.02, gt=0, le=0.5, help="Boundary IoU's band: pixels within "
                               "this fraction of the image diagonal of a contour (Cheng et al. "
                               "2021: 0.02, i.e. 46 px at 1024x2048)")
    trimap_widths: list[int] = _p([1, 2, 4, 8, 16, 32], ge=1, le=4096, help="band widths in "
                                  "pixels around ground-truth edges where trimap IoU is scored "
                                  "(the accuracy-vs-distance-from-an-edge curve)")
    ece_bins: int = _p(15, ge=2, le=1000, help="equal-width confidence bins of the expected "
                       "calibration error and the reliability diagram")
    temperature: bool = _p(True, help="fit one softmax temperature on val (NLL, LBFGS) and "
                           "report the ECE before and after")
    temperature_pixels: int = _p(200_000, ge=1000, le=10_000_000, help="val pixels sampled "
                                 "(seeded, spread over every image) for the temperature fit "
                                 "(its fixed cost: about 0.5 s per 200,000 on 2 CPU cores)")
    worst: int = _p(4, ge=0, le=100, help="images with the lowest mIoU shown in the gallery "
                    "(plots/evaluate/worst)")


@dataclass(frozen=True)
class ExportParams(InferenceParams):
    overlays: int = _p(4, ge=0, help="test images saved as color overlays")
    overlay_alpha: float = _p(0.5, ge=0, le=1, help="weight of the prediction colors")
    gif_frames: int = _p(8, ge=0, help="val images in the animated GIF (0 = no GIF)")
    gif_width: int = _p(512, ge=32, help="GIF frame width in pixels")
    gif_ms_per_frame: int = _p(500, ge=10, help="GIF frame duration")
    sequence: str | None = _p(None, help="a folder of frames (or a video file) under data.root "
                              "rendered as <out>/video/sequence.mp4, each frame's prediction "
                              "blended over it (H.264): e.g. leftImg8bit_sequence/val/frankfurt "
                              "or leftImg8bit/demoVideo/stuttgart_00; null = no video")
    video_fps: float = _p(17.0, gt=0, le=1000, help="frame rate of the MP4 of a folder of frames "
                          "(Cityscapes was recorded at 17 Hz); a video file keeps its own")
    video_side_by_side: bool = _p(False, help="each MP4 frame shows the input beside its overlay")
    video_crf: int = _p(23, ge=0, le=51, help="x264 quality: 0 = best ... 51 = smallest file (23, "
                        "x264's default; each +6 about halves the size)")
    confidence_maps: bool = _p(False, help="also write each test image's max-probability and "
                               "entropy maps (PNG, see confidence_bits) and their overlays")
    confidence_bits: int = _p(16, ge=8, le=16, help="8 or 16-bit confidence/entropy PNGs "
                              "(value = round(x * (2^bits - 1)))")
    temperature: float = _p(1.0, gt=0, le=100, help="softmax temperature of the confidence "
                            "maps (evaluate's fitted calibration.temperature calibrates them)")
    out: str = _p("predictions", help="export folder (test predictions, zip, overlays, GIF)")


@dataclass(frozen=True)
class DeployParams:
    """The ONNX export of best.pt and its check against PyTorch with onnxruntime."""

    opset: int = _p(18, ge=17, le=23, help="ONNX opset of the export")
    min_agreement: float = _p(0.9999, ge=0, le=1, help="share of val pixels whose argmax must "
                              "equal PyTorch's, or the stage fails")
    height: int = _p(1024, ge=32, help="image height of the latency measurement")
    width: int = _p(2048, ge=32, help="image width of the latency measurement")
    warmup: int = _p(1, ge=0, help="untimed calls of each runtime first")
    iters: int = _p(2, ge=1, help="timed calls of each runtime (the median counts)")
    threads: int = _p(0, ge=0, help="CPU threads for every runtime (0 = PyTorch's default)")
    int8: bool = _p(True, help="also write model_int8.onnx for CPUs: onnxruntime static "
                    "quantisation (QDQ, per-channel int8 weights, uint8 activations), checked on "
                    "val against PyTorch fp32 (agreement, mIoU) and timed beside fp32")
    int8_calibration: CalibrationSplit = _p(
        "test", help="split whose images calibrate the int8 activation ranges: test (images the "
        "model was neither trained nor scored on), train or train_extra; never val, which the "
        "check scores")
    int8_calibration_images: int = _p(8, ge=1, help="calibration images, spread evenly over the "
                                      "split's sorted list (all of them when it has fewer)")
    int8_method: Int8Method = _p(
        "minmax", help="calibration: minmax (observed range), entropy (onnxruntime's KL-divergence "
        "threshold), percentile (99.999th percentile of |x|); entropy and percentile keep a "
        "histogram per tensor and take longer")
    int8_min_agreement: float = _p(0.98, ge=0, le=1, help="share of val pixels whose int8 argmax "
                                   "must equal PyTorch fp32's, or the stage fails")
    int8_max_miou_drop: float = _p(0.01, ge=0, le=1, help="largest val mIoU (official class IoU) "
                                   "drop from PyTorch fp32 to int8 (0.01 = one point), or the "
                                   "stage fails")
    out: str = _p("deploy", help="the folder the stage replaces whole: model.onnx (fp32) and, "
                  "with int8, model_int8.onnx (apart from models/, the train stage's output)")


@dataclass(frozen=True)
class BenchmarkParams:
    profile: Literal["quick", "full"] = _p(
        "quick", help="quick: the CPU-budget run (quick_*); full: the thorough GPU run (full_*)")
    device: Device = _p("auto", help="auto: CUDA when present, else CPU")
    height: int = _p(1024, ge=32, help="image height (Cityscapes: 1024)")
    width: int = _p(2048, ge=32, help="image width (Cityscapes: 2048)")
    precisions: list[BenchmarkPrecision] = _p(
        list(BENCHMARK_PRECISIONS),
        help="fp32 strict (the reference), tf32 (CUDA tensor cores), bf16/fp16 autocast; "
             "ones the device lacks are reported as skipped")
    channels_last: list[bool] = _p([False, True], help="memory layouts to measure")
    slide: bool = _p(True, help="also measure slide mode (fp32, batch 1, the last layout in "
                     "channels_last): its latency and memory against whole images")
    window: list[int] = _p([512, 1024], help="[height, width] of slide mode's windows")
    stride: list[int] = _p([341, 683], help="[height, width] step of slide mode's windows")
    onnxruntime: bool = _p(True, help="also measure the ONNX export of the same weights in "
                           "onnxruntime (fp32, batch 1)")
    int8: bool = _p(True, help="also measure that export quantised to int8 (fcn.quantize, as "
                    "the deploy stage's model_int8.onnx; calibrated on 4 synthetic scenes) in "
                    "onnxruntime, batch 1; CPU only (skipped on CUDA, with the reason)")
    weights: str = _p("trained_like", help="'trained_like' (seeded random backbone, BN "
                      "calibrated, random score layers) or a training checkpoint path")
    seed: int = _p(0, ge=0, help="weights and benchmark images")
    cudnn_benchmark: bool = _p(True, help="let cuDNN pick the fastest algorithms (CUDA)")
    threads: int = _p(0, ge=0, help="CPU threads for PyTorch (0 = its default: one per core)")
    matmul_size: int = _p(0, ge=0, help="n of the n×n matmul giving the device's dense rate "
                          "(0 = 2048 on CPU, 8192 on CUDA)")
    quick_batch_sizes: list[int] = _p([1], help="profile quick: images per forward pass")
    quick_warmup: int = _p(1, ge=1, help="profile quick: untimed calls first")
    quick_iters: int = _p(2, ge=1, help="profile quick: timed calls")
    quick_compile: list[bool] = _p([False], help="profile quick: eager and/or torch.compile")
    full_batch_sizes: list[int] = _p([1, 2, 4], help="profile full: images per forward pass")
    full_warmup: int = _p(10, ge=1, help="profile full: untimed calls first")
    full_iters: int = _p(50, ge=1, help="profile full: timed calls")
    full_compile: list[bool] = _p([False, True], help="profile full: eager and/or torch.compile")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    synthesize: SynthesizeParams = field(default_factory=SynthesizeParams)
    masks: MasksParams = field(default_factory=MasksParams)
    decode: DecodeParams = field(default_factory=DecodeParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)
    deploy: DeployParams = field(default_factory=DeployParams)
    benchmark: BenchmarkParams = field(default_factory=BenchmarkParams)
    coarse: CoarseParams = field(default_factory=CoarseParams)
    staged: StagedParams = field(default_factory=StagedParams)


def _check_sources(key: str, sources: list[str], problems: list[str]) -> None:
    """A non-empty list of training sources, none twice (`train` is `gtFine/train`)."""
    pairs = [parse_source(source) for source in sources]
    if not pairs or len(set(pairs)) != len(pairs):
        problems.append(f"{key}: expected train and/or val, or gtCoarse/<split>, without "
                        f"repeats (test has no annotations), got {sources}")


def _check_schedule(key: str, epochs: int | None, iterations: int | None,
                    problems: list[str]) -> None:
    if (epochs is None) == (iterations is None):
        problems.append(f"{key}epochs, {key}iterations: set exactly one of them (the other "
                        f"null), got epochs={epochs}, iterations={iterations}")


def _check_relations(params: Params, problems: list[str]) -> None:
    """Constraints between fields, which single-field checks cannot express."""
    t = params.train
    if len(t.crop) != 2 or min(t.crop, default=0) < 32:
        problems.append(f"train.crop: expected [height, width], each >= 32, got {t.crop}")
    if len(t.scale) != 2 or not 0 < t.scale[0] <= t.scale[1]:
        problems.append(f"train.scale: expected [min, max] with 0 < min <= max, got {t.scale}")
    _check_schedule("train.", t.epochs, t.iterations, problems)
    _check_sources("train.splits", t.splits, problems)
    c = params.coarse
    for phase in PHASES:
        _check_schedule(f"coarse.{phase}_", getattr(c, f"{phase}_epochs"),
                        getattr(c, f"{phase}_iterations"), problems)
        _check_sources(f"coarse.{phase}_splits", getattr(c, f"{phase}_splits"), problems)
    _check_schedule("staged.", params.staged.epochs, params.staged.iterations, problems)
    if not c.splits or len(set(c.splits)) != len(c.splits):
        problems.append(f"coarse.splits: expected gtCoarse splits without repeats, got {c.splits}")
    if isinstance(t.class_weights, list) and (
        len(t.class_weights) != NUM_CLASSES or min(t.class_weights) < 0
        or max(t.class_weights) > 1e6 or not any(w > 0 for w in t.class_weights)
    ):
        problems.append(f"train.class_weights: expected {NUM_CLASSES} numbers from 0 to 1e6, "
                        f"not all 0 (or null), got {t.class_weights}")
    s = params.synthesize
    for split in ("train", "val", "test", "train_extra"):
        cities = getattr(s, f"{split}_cities")
        if not cities and split != "train_extra":
            problems.append(f"synthesize.{split}_cities: needs at least one city")
        if len(set(cities)) != len(cities):
            problems.append(f"synthesize.{split}_cities: cities repeat: {cities}")
        for city in cities:
            if not re.fullmatch(r"[a-z0-9]+", city):
                problems.append(f"synthesize.{split}_cities: city names are lowercase letters "
                                f"and digits (they are part of Cityscapes file names), got {city!r}")
    for name in ("evaluate", "export"):
        s = getattr(params, name)
        if len(s.window) != 2 or min(s.window, default=0) < 32:
            problems.append(f"{name}.window: expected [height, width], each >= 32, got {s.window}")
        elif len(s.stride) != 2 or not all(0 < st <= w for st, w in zip(s.stride, s.window)):
            problems.append(f"{name}.stride: expected [height, width] with 0 < stride <= window "
                            f"{s.window} (larger strides leave pixels unpredicted), got {s.stride}")
        if not s.scales or min(s.scales) <= 0 or max(s.scales) > 4:
            problems.append(f"{name}.scales: expected a non-empty list of factors in (0, 4], "
                            f"got {s.scales}")
    widths = params.evaluate.trimap_widths
    if not widths or widths != sorted(set(widths)):
        problems.append(f"evaluate.trimap_widths: expected a non-empty increasing list, got "
                        f"{widths}")
    sequence = params.export.sequence
    if sequence is not None and (not sequence or Path(sequence).is_absolute()
                                 or ".." in Path(sequence).parts):
        problems.append(f"export.sequence: expected a path relative to data.root, without "
                        f"'..' (or null), got {sequence!r}")
    if params.export.confidence_bits not in (8, 16):
        problems.append(f"export.confidence_bits: expected 8 or 16, got "
                        f"{params.export.confidence_bits}")
    if not params.masks.encodings:
        problems.append("masks.encodings: choose at least one encoding")
    b = params.benchmark
    for key in ("precisions", "channels_last", "quick_batch_sizes", "quick_compile",
                "full_batch_sizes", "full_compile"):
        values = getattr(b, key)
        if not values or len(set(values)) != len(values):
            problems.append(f"benchmark.{key}: expected a non-empty list without repeats, "
                            f"got {values}")
    if len(b.window) != 2 or min(b.window, default=0) < 32 or len(b.stride) != 2 or not all(
            0 < st <= w for st, w in zip(b.stride, b.window)):
        problems.append(f"benchmark.window/stride: expected [height, width] each, window >= 32 "
                        f"and 0 < stride <= window, got {b.window} / {b.stride}")
    for key in ("quick_batch_sizes", "full_batch_sizes"):
        if min(getattr(b, key), default=1) < 1:
            problems.append(f"benchmark.{key}: expected positive integers, got {getattr(b, key)}")
    _check_output_folders(params, problems)


SHIPPED = ("gtFine", "gtCoarse", "leftImg8bit", SEQUENCE)
"""The dataset's own folders under data.root: no output may be written into them."""


def _check_output_folders(params: Params, problems: list[str]) -> None:
    """The folders stages replace whole (data.generated, decode.out, train.out, export.out,
    deploy.out, the recipes' outputs) must not be data.root, lie in its shipped folders or hold
    it, nor overlap each other: a careless path would otherwise replace the dataset, or one
    stage's outputs another's."""
    root = Path(params.data.root).resolve()
    outputs = {"data.generated": params.data.generated, "decode.out": params.decode.out,
               "train.out": params.train.out, "export.out": params.export.out,
               "coarse.generated": params.coarse.generated,
               "coarse.pretrain_out": params.coarse.pretrain_out,
               "coarse.finetune_out": params.coarse.finetune_out,
               "staged.out": params.staged.out, "deploy.out": params.deploy.out}
    resolved = {key: Path(value).resolve() for key, value in outputs.items()}
    for key, folder in resolved.items():
        if folder == root or root.is_relative_to(folder) or any(
                folder.is_relative_to(root / shipped) for shipped in SHIPPED):
            problems.append(f"{key}: {outputs[key]!r} would replace or write into the dataset "
                            f"(data.root {params.data.root!r}), which the stage replaces whole; "
                            "choose a folder outside it")
    keys = list(resolved)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if resolved[a].is_relative_to(resolved[b]) or resolved[b].is_relative_to(resolved[a]):
                problems.append(f"{a}, {b}: {outputs[a]!r} and {outputs[b]!r} overlap; each "
                                "stage replaces its folder whole, so they must be apart")


def parse_params(raw: Any, source: str = PARAMS_FILE) -> Params:
    """Validate a params mapping; raise ParamsError listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Params)}
    for key in raw:
        if key not in sections:
            problems.append(f"{key}: unknown section (known: {', '.join(sections)})")
    hints = typing.get_type_hints(Params)
    values = {}
    for name in sections:
        if name not in raw:
            problems.append(f"{name}: section missing")
            continue
        values[name] = check_section(name, hints[name], raw[name], problems)
    params = Params(**values)
    if not problems:
        _check_relations(params, problems)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ParamsError(f"{source}: {len(problems)} invalid parameter(s):\n{listing}")
    return params


MAX_PARAMS_BYTES = 2**20
"""params.yaml is a few KB; a file above 1 MiB is refused before it is parsed."""


class _NoAliases(yaml.SafeLoader):
    """yaml.SafeLoader without aliases: `*anchor` lets a 10-line file expand to billions of
    items (a "billion laughs"), and params.yaml has no use for them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"aliases (*name) are not allowed in params, line {mark.line + 1}")
        return super().compose_node(parent, index)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml: safe loading (never executes YAML tags), at most
    MAX_PARAMS_BYTES, no aliases."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_PARAMS_BYTES + 1)
        if len(data) > MAX_PARAMS_BYTES:
            raise ParamsError(f"{path}: larger than {MAX_PARAMS_BYTES} bytes; a params file is a "
                              "few KB")
        raw = yaml.load(data.decode("utf-8"), Loader=_NoAliases)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text ({exc})") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except (ValueError, OverflowError) as exc:  # a scalar YAML recognises but cannot build
        raise ParamsError(f"{path}: a value YAML cannot read "
                          f"({' '.join(str(exc).split())[:200]})") from None
    return parse_params(raw, str(path))


def params_hash(*sections: Any) -> str:
    """A stable hash of parameter sections (dataclasses or plain mappings), e.g. to refuse
    resuming under other params."""
    blob = json.dumps([dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s
                       for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sections_dict(params: Params, *names: str) -> dict[str, dict[str, Any]]:
    """Some sections as plain data: what a stage hands the library when it must record (or
    hash) them, without passing the whole Params down."""
    return {name: dataclasses.asdict(getattr(params, name)) for name in names}


def data_identity(params: Params) -> dict[str, dict[str, Any]]:
    """What names the data a run of the train stage reads, for its resume hash: the data and
    synthesize sections, less synthesize.sequence_frames (video frames nothing trains on), so
    that setting it neither restarts a killed run nor retrains a finished one."""
    identity = sections_dict(params, "data", "synthesize")
    del identity["synthesize"]["sequence_frames"]
    return identity


def default_params_dict() -> dict[str, Any]:
    """The defaults as plain data (what a fresh params.yaml holds)."""
    return dataclasses.asdict(Params())


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of params.yaml: every section required, no unknown keys."""
    defaults = default_params_dict()
    hints = typing.get_type_hints(Params)
    sections = {s.name: section_schema(hints[s.name], defaults[s.name])
                for s in dataclasses.fields(Params)}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "params.yaml of the FCN8s Cityscapes pipeline",
            "description": "Generated from fcn/params.py by docs/generate.py;"
                           " constraints between fields are checked by fcn.params.load_params.",
            "type": "object", "additionalProperties": False,
            "required": list(sections), "properties": sections}


def main(argv: list[str] | None = None) -> int:
    """`python -m fcn.params [FILE ...]`: check params files as every stage does (size, no
    YAML aliases, every field) before DVC parses them: DVC reads params.yaml with a YAML loader
    that expands aliases, so a "billion laughs" file takes `dvc status` down before any of
    this project's code runs. `make repro` and the git pre-commit hook (`make hooks`) run it."""
    import sys

    problems = 0
    for name in (argv if argv is not None else sys.argv[1:]) or [PARAMS_FILE]:
        try:
            load_params(name)
        except ParamsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            problems += 1
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
