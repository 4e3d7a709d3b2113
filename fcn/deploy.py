"""The deploy stage: a trained checkpoint → ONNX with dynamic height and width (and, for CPUs,
an int8 copy of it), each checked against PyTorch with onnxruntime before it is accepted.

The model is exported with the exporter torch ships (`torch.onnx.export`, dynamo: through
`torch.export` and onnxscript), weights inside the one file, as `<deploy.out>/model.onnx`.
With `deploy.int8` it is also quantised (`fcn.quantize`: static, QDQ, per-channel int8
weights, uint8 activations calibrated on images the model was neither trained nor scored on)
into `model_int8.onnx`. onnxruntime then predicts every val image with each model and the
result is compared with the PyTorch model in fp32: the share of pixels whose argmax agrees, the
largest logit difference, and each runtime's val mIoU (official class IoU, the evaluate
stage's scorer). A model below its floor (`min_agreement`; `int8_min_agreement`,
`int8_max_miou_drop`) fails the stage with one line and nothing is written: the folder is
replaced whole or not at all. Latency of every runtime is measured in the same run, taking
turns, on a full-size (1024×2048 by default) synthetic street scene, on the CPU.

Normalisation and the pad-to-32 are inside the graph, as in `FCN8s.forward`: the ONNX model
takes float32 images in [0, 1], (N, 3, H, W) of any H and W, and returns (N, 19, H, W) logits.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fcn.atomic import atomic_dir, atomic_path, write_json
from fcn.checkpoint import load_model
from fcn.cityscapes.labels import TRAINID_TO_ID
from fcn.cityscapes.layout import list_images, stem_of
from fcn.cityscapes.scoring import CityscapesEvaluator, ground_truth_files
from fcn.device import to_model_input
from fcn.errors import DataError, FcnError
from fcn.images import MAX_PIXELS, read_labels, read_rgb, read_size
from fcn.model import FCN8s
from fcn.params import DeployParams, ModelParams
from fcn.predict.visualize import spread
from fcn.synthetic import make_scene, render_image

log = logging.getLogger(__name__)

INPUT, OUTPUT = "images", "logits"
FP32_FILE, INT8_FILE = "model.onnx", "model_int8.onnx"
"""The files of the deploy folder (`deploy.out`)."""
TORCH, ORT, ORT_INT8 = "torch", "onnxruntime", "onnxruntime_int8"
"""The runtimes' names in the reports (metrics/deploy.json, metrics/deploy_latency.json)."""
SPLIT = "val"


class DeployError(FcnError):
    """An exported model (fp32 or int8) misses its floor against the PyTorch model."""


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) → float32 (N, 3, H, W) in [0, 1]: what the ONNX model takes (the
    project's one conversion, `fcn.device.to_model_input`, on the CPU)."""
    return to_model_input(torch.from_numpy(np.require(images, requirements=["C", "W"]))).numpy()


STACK_TRACE = "pkg.torch.onnx.stack_trace"
"""Node metadata the exporter adds: the source lines (with their absolute paths) that made the
node. Dropped, so the file is the same wherever the project lives (and names no local path);
the node's module, class and FX-node metadata stay for debugging."""


def export_onnx(model: FCN8s, path: str | Path, opset: int) -> None:
    """Write `model` as ONNX (one file, weights included) with dynamic batch, height, width;
    the same model gives the same bytes, from any checkout."""
    model = model.eval()
    example = torch.rand(1, 3, 64, 96)
    dims = {0: torch.export.Dim("batch", min=1, max=64),
            2: torch.export.Dim("height", min=32, max=8192),
            3: torch.export.Dim("width", min=32, max=8192)}
    quiet = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # the exporter's pass-by-pass chatter is not for our users
        logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), input_names=[INPUT],
                                    output_names=[OUTPUT], opset_version=opset, dynamo=True,
                                    dynamic_shapes={"x": dims}, external_data=False,
                                    verbose=False)
    for logger, level in zip(quiet, levels):
        logger.setLevel(level)
    graphs = [program.model.graph, *program.model.functions.values()]
    for graph in graphs:
        for node in graph.all_nodes():
            node.metadata_props.pop(STACK_TRACE, None)
    with atomic_path(path) as tmp:
        program.save(str(tmp))


def session(path: str | Path, threads: int = 0, cuda: bool = False) -> Any:
    """An onnxruntime session for the ONNX file: CPU (threads 0 = PyTorch's thread count), or
    CUDA first where onnxruntime-gpu provides it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if cuda:
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


@dataclass
class Agreement:
    """How the exported model's logits compare with PyTorch's over some images."""

    images: int = 0
    pixels: int = 0
    agreeing: int = 0
    max_abs_logit_diff: float = 0.0

    @property
    def fraction(self) -> float:
        return self.agreeing / self.pixels if self.pixels else float("nan")

    def add(self, reference: np.ndarray, exported: np.ndarray) -> None:
        """Logits (N, C, H, W) of both runtimes for the same images."""
        self.images += reference.shape[0]
        self.pixels += reference.shape[0] * reference.shape[2] * reference.shape[3]
        self.agreeing += int((reference.argmax(1) == exported.argmax(1)).sum())
        self.max_abs_logit_diff = max(self.max_abs_logit_diff,
                                      float(np.abs(reference - exported).max()))


@dataclass
class Check:
    """The val check of every exported model: each one's agreement with PyTorch fp32 and every
    runtime's val mIoU (official class IoU), PyTorch's included, keyed by runtime name."""

    agreement: dict[str, Agreement]
    miou: dict[str, float]


@torch.inference_mode()
def check_runtimes(model: FCN8s, sessions: Mapping[str, Any], images: Sequence[Path],
                   truths: Sequence[Path] | None = None, max_pixels: int = MAX_PIXELS) -> Check:
    """PyTorch fp32 and each session on every val image (one at a time, any size up to
    `max_pixels`): argmax agreement of each session with PyTorch, and, given the labelIds
    masks `truths` (one per image), each runtime's val mIoU, scored by the evaluate stage's
    scorer (`fcn.cityscapes.scoring`), so the figures compare with metrics/evaluate.json
    (without `truths`: agreement only, `miou` empty)."""
    agreement = {name: Agreement() for name in sessions}
    scorers = {} if truths is None else {
        name: CityscapesEvaluator(instance_scores=False) for name in (TORCH, *sessions)}
    pairs = list(zip(images, truths if truths is not None else [None] * len(images)))
    for path, truth in tqdm(pairs, desc="deploy check", unit="img"):
        x = to_input(read_rgb(path, max_pixels=max_pixels)[None])
        logits = {TORCH: model(torch.from_numpy(x)).numpy()}
        for name, sess in sessions.items():
            logits[name] = sess.run([OUTPUT], {INPUT: x})[0]
            agreement[name].add(logits[TORCH], logits[name])
        if truth is not None:
            labels = read_labels(truth, "ground-truth labelIds", max_pixels)
            for name, out in logits.items():
                scorers[name].add(TRAINID_TO_ID[out[0].argmax(0)], labels,
                                  names=(f"{name} prediction for {path}", str(truth)))
    return Check(agreement, {name: scorer.scores().class_iou_mean
                             for name, scorer in scorers.items()})


@torch.inference_mode()
def latency(model: FCN8s, sessions: Mapping[str, Any], height: int, width: int, warmup: int,
            iters: int, seed: int = 0) -> dict[str, float]:
    """Median seconds of one forward pass of PyTorch (`torch`: CPU fp32 channels-last, its fast
    CPU layout) and of each session, on one height×width scene. The runtimes take turns in
    every round, so load from other work on the machine falls on all of them alike."""
    rng = np.random.default_rng([seed, 0])
    x = to_input(render_image(make_scene(width, height, rng, 0), rng)[None])
    fast = model.to(memory_format=torch.channels_last)
    tx = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    calls = {TORCH: lambda: fast(tx)}
    for name, sess in sessions.items():
        calls[name] = functools.partial(sess.run, [OUTPUT], {INPUT: x})
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iters):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    model.to(memory_format=torch.contiguous_format)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


class ModelInputs(Sequence[np.ndarray]):
    """Image files as model inputs (float32 (1, 3, H, W)), each read when indexed: what
    `fcn.quantize.quantize_int8` calibrates on, one image in memory at a time."""

    def __init__(self, paths: Sequence[Path], max_pixels: int = MAX_PIXELS) -> None:
        self.paths = list(paths)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return to_input(read_rgb(self.paths[index], max_pixels=self.max_pixels)[None])


def calibration_images(root: str | Path, split: str, count: int) -> list[Path]:
    """Up to `count` images of `split`, spread evenly over its sorted list (first and last
    included): the same ones every run, from every city when the split has several."""
    images = list_images(root, split)
    return [images[i] for i in spread(len(images), count)]


def _val_files(root: str | Path, generated: str | Path, max_pixels: int
               ) -> tuple[list[Path], list[Path]]:
    """The val images and their labelIds masks under `generated`, every header checked
    (readable, at most `max_pixels`, the same size) before any work."""
    images = list_images(root, SPLIT)
    truths = [labels for labels, _ in ground_truth_files(
        generated, SPLIT, [stem_of(p) for p in images], instance_scores=False)]
    for image, truth in zip(images, truths):
        image_size = read_size(image, "image", max_pixels)
        truth_size = read_size(truth, "ground-truth labelIds", max_pixels)
        if image_size != truth_size:
            raise DataError(f"{image}: image is {image_size[0]}x{image_size[1]} but its ground "
                            f"truth {truth} is {truth_size[0]}x{truth_size[1]}")
    return images, truths


def _refuse(checkpoint: str | Path, check: Check, params: DeployParams, out: Path) -> None:
    """Raise DeployError, in one line, when an exported model misses its floor: the fp32
    export's agreement, then int8's agreement, then int8's mIoU drop."""
    kept = f"nothing was written ({out} is as it was)"
    fp32 = check.agreement[ORT]
    if not fp32.fraction >= params.min_agreement:
        raise DeployError(
            f"{checkpoint}: the ONNX export agrees with PyTorch on {fp32.fraction:.6%} "
            f"of {fp32.pixels} val pixels (largest logit difference "
            f"{fp32.max_abs_logit_diff:.3g}), below deploy.min_agreement "
            f"{params.min_agreement:.4%}; {kept}")
    if ORT_INT8 not in check.agreement:
        return
    int8 = check.agreement[ORT_INT8]
    torch_miou, int8_miou = check.miou[TORCH], check.miou[ORT_INT8]
    drop = torch_miou - int8_miou
    if not int8.fraction >= params.int8_min_agreement:
        raise DeployError(
            f"{checkpoint}: the int8 model agrees with PyTorch fp32 on {int8.fraction:.4%} of "
            f"{int8.pixels} val pixels, {params.int8_min_agreement - int8.fraction:.4%} short "
            f"of deploy.int8_min_agreement {params.int8_min_agreement:.4%} (val mIoU "
            f"{int8_miou:.4f}, fp32 {torch_miou:.4f}; calibration "
            f"{params.int8_method}); {kept}")
    if not drop <= params.int8_max_miou_drop:
        raise DeployError(
            f"{checkpoint}: the int8 model's val mIoU {int8_miou:.4f} is {drop:.4f} below "
            f"PyTorch fp32's {torch_miou:.4f}, {drop - params.int8_max_miou_drop:.4f} more than "
            f"deploy.int8_max_miou_drop {params.int8_max_miou_drop:.4f} (agreement "
            f"{int8.fraction:.4%}; calibration {params.int8_method}); {kept}")


def deploy_stage(checkpoint: str | Path, root: str | Path, generated: str | Path,
                 model: ModelParams, params: DeployParams, metrics: str | Path,
                 max_pixels: int = MAX_PIXELS,
                 latency_file: str | Path | None = None) -> dict[str, Any]:
    """The deploy stage: export (and, with `params.int8`, quantise), check on the val images of
    `root` against the labelIds masks under `generated`, time, then write the folder
    `params.out` (model.onnx, model_int8.onnx) whole, `metrics` (the check: the same bytes for
    the same model) and `latency_file` (this machine's timings, kept apart). A model below its
    floor raises DeployError and nothing is written; a `params.out` holding files of its own is
    refused before any work (the folder is replaced whole). Every input file's header (val images,
    their masks, the calibration images) is checked before the slow export. Returns the
    check's figures and the timings together."""
    import onnxruntime

    from fcn.quantize import quantize_int8  # onnxruntime.quantization: only when deploying

    net = load_model(checkpoint, model)
    images, truths = _val_files(root, generated, max_pixels)
    calibration: list[Path] = []
    if params.int8:
        calibration = calibration_images(root, params.int8_calibration,
                                         params.int8_calibration_images)
        for path in calibration:
            read_size(path, "image", max_pixels)
    out = Path(params.out)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in (FP32_FILE, INT8_FILE)) \
        if out.is_dir() else []
    if foreign:  # the folder is replaced whole: never one this stage did not fill
        raise DataError(f"{out}: deploy.out holds {len(foreign)} file(s) the deploy stage did not "
                        f"write (e.g. {foreign[0]}), and the stage replaces the folder whole; "
                        "choose a new or empty folder")
    if params.threads:
        torch.set_num_threads(params.threads)
    with atomic_dir(out) as folder:
        export_onnx(net, folder / FP32_FILE, params.opset)
        sessions = {ORT: session(folder / FP32_FILE, params.threads)}
        if params.int8:
            start = time.perf_counter()
            quantize_int8(folder / FP32_FILE, folder / INT8_FILE,
                          ModelInputs(calibration, max_pixels), params.int8_method)
            log.info("quantised to int8 (%s, %d %s images) in %.1f s", params.int8_method,
                     len(calibration), params.int8_calibration, time.perf_counter() - start)
            sessions[ORT_INT8] = session(folder / INT8_FILE, params.threads)
        check = check_runtimes(net, sessions, images, truths, max_pixels)
        _refuse(checkpoint, check, params, out)
        seconds = latency(net, sessions, params.height, params.width, params.warmup,
                          params.iters)
        sizes = {name: (folder / file).stat().st_size / 2**20
                 for name, file in ((ORT, FP32_FILE), (ORT_INT8, INT8_FILE)) if name in sessions}
    fp32 = check.agreement[ORT]
    report: dict[str, Any] = {
        "agreement": fp32.fraction,
        "max_abs_logit_diff": fp32.max_abs_logit_diff,
        "images": fp32.images,
        "pixels": fp32.pixels,
        "opset": params.opset,
        "file_mb": sizes[ORT],
        "miou": check.miou,
    }
    timings: dict[str, Any] = {
        "latency_ms": {name: s * 1e3 for name, s in seconds.items()},
        "onnxruntime_speedup": seconds[TORCH] / seconds[ORT],
    }
    if params.int8:
        int8 = check.agreement[ORT_INT8]
        report["int8"] = {"agreement": int8.fraction,
                          "max_abs_logit_diff": int8.max_abs_logit_diff,
                          "miou_drop": check.miou[TORCH] - check.miou[ORT_INT8],
                          "file_mb": sizes[ORT_INT8],
                          "calibration_images": len(calibration)}
        timings["int8_speedup"] = seconds[ORT] / seconds[ORT_INT8]
    timings.update(latency_height=params.height, latency_width=params.width)
    if latency_file is not None:
        write_json(latency_file, timings)
    write_json(metrics, report)
    ms = timings["latency_ms"]
    log.info("%s: onnxruntime %s, argmax agreement with PyTorch %.6f on %d val images (max "
             "|logit diff| %.2e), val mIoU %s; %dx%d: %s", out, onnxruntime.__version__,
             fp32.fraction, fp32.images, fp32.max_abs_logit_diff,
             ", ".join(f"{name} {value:.4f}" for name, value in check.miou.items()),
             params.height, params.width,
             ", ".join(f"{name} {value:.0f} ms" for name, value in ms.items()))
    if params.int8:
        log.info("%s: int8 agreement %.4f, val mIoU drop %.4f, %.1f MB (fp32 %.1f MB), "
                 "%.2fx onnxruntime fp32's speed", out / INT8_FILE,
                 report["int8"]["agreement"], report["int8"]["miou_drop"],
                 sizes[ORT_INT8], sizes[ORT], timings["int8_speedup"])
    return {**report, **timings}
