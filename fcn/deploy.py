"""The deploy stage: a trained checkpoint → ONNX with dynamic height and width, checked against
PyTorch with onnxruntime before it is accepted.

The model is exported with the exporter torch ships (`torch.onnx.export`, dynamo: through
`torch.export` and onnxscript), weights inside the one file. onnxruntime then predicts every
val image and the result is compared with the PyTorch model in fp32: the share of pixels
whose argmax agrees and the largest logit difference. Below `min_agreement` the stage fails
with one line and the previous ONNX file (if any) stays. Latency of both runtimes is measured
in the same run on a full-size (1024×2048 by default) synthetic street scene, on the CPU.

Normalisation and the pad-to-32 are inside the graph, as in `FCN8s.forward`: the ONNX model
takes float32 images in [0, 1], (N, 3, H, W) of any H and W, and returns (N, 19, H, W) logits.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fcn.atomic import atomic_path, write_json
from fcn.checkpoint import load_model
from fcn.device import to_model_input
from fcn.cityscapes.layout import list_images
from fcn.errors import FcnError
from fcn.images import MAX_PIXELS, read_rgb, read_size
from fcn.model import FCN8s
from fcn.params import DeployParams, ModelParams
from fcn.synthetic import make_scene, render_image

log = logging.getLogger(__name__)

INPUT, OUTPUT = "images", "logits"


class DeployError(FcnError):
    """The exported model disagrees with the PyTorch model beyond the accepted bar."""


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


@torch.inference_mode()
def check_agreement(model: FCN8s, sess: Any, images: Sequence[Path],
                    max_pixels: int = MAX_PIXELS) -> Agreement:
    """PyTorch fp32 vs onnxruntime on each image (one at a time: any size up to
    `max_pixels`)."""
    result = Agreement()
    for path in tqdm(images, desc="deploy check", unit="img"):
        x = to_input(read_rgb(path, max_pixels=max_pixels)[None])
        reference = model(torch.from_numpy(x)).numpy()
        result.add(reference, sess.run([OUTPUT], {INPUT: x})[0])
    return result


def _median_seconds(call: Any, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def latency(model: FCN8s, sess: Any, height: int, width: int, warmup: int, iters: int,
            seed: int = 0) -> dict[str, float]:
    """Median seconds of one forward pass of each runtime on one height×width scene, CPU fp32
    (PyTorch channels-last, its fast CPU layout; onnxruntime as exported)."""
    rng = np.random.default_rng([seed, 0])
    x = to_input(render_image(make_scene(width, height, rng, 0), rng)[None])
    fast = model.to(memory_format=torch.channels_last)
    tx = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    torch_s = _median_seconds(lambda: fast(tx), warmup, iters)
    ort_s = _median_seconds(lambda: sess.run([OUTPUT], {INPUT: x}), warmup, iters)
    model.to(memory_format=torch.contiguous_format)
    return {"torch": torch_s, "onnxruntime": ort_s}


def deploy_stage(checkpoint: str | Path, root: str | Path, model: ModelParams,
                 params: DeployParams, metrics: str | Path, max_pixels: int = MAX_PIXELS,
                 latency_file: str | Path | None = None) -> dict[str, Any]:
    """The deploy stage: export, check on the val images of `root`, time, then write
    `params.out`, `metrics` (the check: the same bytes for the same model) and `latency_file`
    (this machine's timings, kept apart); raises DeployError (writing nothing) below the bar.
    Every val image's header is checked (readable, at most `max_pixels`) before the slow
    export. Returns the check's figures and the timings together."""
    import onnxruntime

    net = load_model(checkpoint, model)
    images = list_images(root, "val")
    for path in images:
        read_size(path, "image", max_pixels)
    out = Path(params.out)
    if params.threads:
        torch.set_num_threads(params.threads)
    with atomic_path(out) as candidate:
        export_onnx(net, candidate, params.opset)
        sess = session(candidate, params.threads)
        agreement = check_agreement(net, sess, images, max_pixels)
        if not agreement.fraction >= params.min_agreement:
            raise DeployError(
                f"{checkpoint}: the ONNX export agrees with PyTorch on {agreement.fraction:.6%} "
                f"of {agreement.pixels} val pixels (largest logit difference "
                f"{agreement.max_abs_logit_diff:.3g}), below deploy.min_agreement "
                f"{params.min_agreement:.4%}; {out} was not written")
        seconds = latency(net, sess, params.height, params.width, params.warmup, params.iters)
    report = {
        "agreement": agreement.fraction,
        "max_abs_logit_diff": agreement.max_abs_logit_diff,
        "images": agreement.images,
        "pixels": agreement.pixels,
        "opset": params.opset,
        "file_mb": out.stat().st_size / 2**20,
    }
    timings = {
        "latency_ms": {name: s * 1e3 for name, s in seconds.items()},
        "onnxruntime_speedup": seconds["torch"] / seconds["onnxruntime"],
        "latency_height": params.height,
        "latency_width": params.width,
    }
    if latency_file is not None:
        write_json(latency_file, timings)
    write_json(metrics, report)
    log.info("%s: argmax agreement %.6f on %d val images (max |logit diff| %.2e); %dx%d: "
             "torch %.0f ms, onnxruntime %s %.0f ms", out, agreement.fraction, agreement.images,
             agreement.max_abs_logit_diff, params.height, params.width,
             timings["latency_ms"]["torch"], onnxruntime.__version__,
             timings["latency_ms"]["onnxruntime"])
    return {**report, **timings}
