"""The ONNX steps of the check: the deploy stage's export and agreement check in onnxruntime's
CPU provider (a CPU path: CI's dry run), and the same file in the CUDA provider where
onnxruntime-gpu is installed."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from fcn import checkpoint as ckpt
from fcn.benchmark.run import MIN_AGREEMENT
from fcn.cityscapes.layout import list_images
from fcn.gpucheck.data import data, images
from fcn.gpucheck.runner import Check, Outcome, Skip
from fcn.params import DeployParams


def exported(check: Check) -> tuple[Path, float]:
    """The trained checkpoint exported by `fcn.deploy.export_onnx` (made once), and the
    seconds the export took."""
    from fcn.deploy import FP32_FILE, export_onnx

    if "onnx" not in check.artifacts:
        model = ckpt.load_model(check.artifacts["checkpoint"])
        path = check.work / "onnx" / FP32_FILE
        start = time.perf_counter()
        export_onnx(model, path, DeployParams().opset)
        check.artifacts["onnx"] = (path, time.perf_counter() - start)
    return check.artifacts["onnx"]


def step_onnx(check: Check) -> Outcome:
    """The deploy stage's export of the trained checkpoint and its check in onnxruntime's CPU
    provider: argmax agreement with PyTorch fp32 >= deploy.min_agreement."""
    import onnxruntime

    from fcn.deploy import ORT, check_runtimes, session

    deploy = DeployParams()
    path, export_s = exported(check)
    root, _, _ = data(check, "small")
    sess = session(path)
    result = check_runtimes(ckpt.load_model(check.artifacts["checkpoint"]), {ORT: sess},
                            list_images(root, "val")).agreement[ORT]
    passed = result.fraction >= deploy.min_agreement
    figures = {"onnxruntime": onnxruntime.__version__, "providers": sess.get_providers(),
               "opset": deploy.opset, "export_s": export_s,
               "file_mb": path.stat().st_size / 2**20, "images": result.images,
               "pixels": result.pixels, "agreement": result.fraction,
               "max_abs_logit_diff": result.max_abs_logit_diff,
               "min_agreement": deploy.min_agreement}
    return Outcome(passed, figures, f"export {export_s:.0f} s, agreement {result.fraction:.4%} "
                   "(CPU provider)", "" if passed else
                   f"agreement below deploy.min_agreement {deploy.min_agreement}")


def step_onnx_cuda(check: Check) -> Outcome:
    """The exported model in onnxruntime's CUDA provider: the provider really used, agreement
    with PyTorch fp32, latency at the full image size with input and output on the GPU."""
    import numpy as np
    import onnxruntime
    import torch

    from fcn.deploy import INPUT, ORT, OUTPUT, check_runtimes, session, to_input

    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise Skip(f"onnxruntime-gpu is not installed (onnxruntime {onnxruntime.__version__}, "
                   f"providers {available})")
    path, _ = exported(check)
    model = ckpt.load_model(check.artifacts["checkpoint"])
    sess = session(path, cuda=True)
    used = sess.get_providers()
    root, _, _ = data(check, "small")
    result = check_runtimes(model, {ORT: sess}, list_images(root, "val")).agreement[ORT]
    x = torch.from_numpy(to_input(images(check, "large")[0][None])).to(check.device)
    binding = sess.io_binding()
    binding.bind_input(name=INPUT, device_type="cuda", device_id=check.device.index or 0,
                       element_type=np.float32, shape=tuple(x.shape), buffer_ptr=x.data_ptr())
    binding.bind_output(OUTPUT, "cuda", check.device.index or 0)
    for _ in range(3):
        sess.run_with_iobinding(binding)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        sess.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
    on_cuda = used[:1] == ["CUDAExecutionProvider"]
    passed = on_cuda and result.fraction >= MIN_AGREEMENT
    figures = {"onnxruntime": onnxruntime.__version__, "providers": used,
               "agreement": result.fraction, "max_abs_logit_diff": result.max_abs_logit_diff,
               "latency_ms_median": 1e3 * statistics.median(times),
               "latency_image_size": list(x.shape[2:]),
               "includes": "no host copies (io_binding on the GPU)"}
    return Outcome(passed, figures, f"{used[0]}: agreement {result.fraction:.4%}, "
                   f"{figures['latency_ms_median']:.1f} ms at {x.shape[2]}x{x.shape[3]}",
                   "" if passed else ("the session did not run on the CUDA provider"
                                      if not on_cuda else f"agreement below {MIN_AGREEMENT:.1%}"))
