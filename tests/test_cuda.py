"""The CUDA paths, as ordinary tests marked `cuda`: each skips with its reason where no GPU is
present (CI, this project's CPU machines). `make gpu-check` (docs/gpu-check.md) runs the same
paths at full size and records the figures; these are the quick, assertable versions.

Run them alone on a GPU machine with `pytest -m cuda`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import socket
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from fcn.benchmark.run import MIN_AGREEMENT
from fcn.cityscapes.layout import list_images
from fcn.images import read_rgb
from fcn.metrics import summary
from fcn.model import FCN8s
from fcn.predict.predictor import Predictor
from fcn.train.data import SegmentationDataset
from fcn.train.distributed import Context
from fcn.train.fit import make_loaders
from fcn.train.loop import (build_criterion, build_optimizer, build_scheduler, train_one_epoch,
                            validate)
from fcn.params import TrainParams

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (none here); `make gpu-check` lists these "
                              "paths in its dry mode"),
]

REPO = Path(__file__).resolve().parents[1]


def _gpu_check():
    """benchmarks/gpu_check.py as a module (its strict-fp32 switch is shared with the check)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check",
                                                      REPO / "benchmarks" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


@pytest.fixture
def cuda() -> Context:
    return Context(0, 1, torch.device("cuda"))


def _train_loader(tiny_dataset: Path, masks: Path, context: Context, batch_size: int):
    """fit's training loader over the tiny train split: whole 64x128 images, no augmentation."""
    params = TrainParams(crop=[64, 128], scale=[1.0, 1.0], flip=False, jitter=0.0,
                         batch_size=batch_size, workers=0)
    return make_loaders(tiny_dataset, masks, params, context)[0]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_training_steps_have_a_finite_decreasing_loss(tiny_dataset, masks, cuda, precision):
    torch.manual_seed(0)
    batch = [next(iter(_train_loader(tiny_dataset, masks, cuda, 4)))]  # the same every step
    model = FCN8s("vgg11_bn").to(cuda.device)
    params = TrainParams(precision=precision, poly_power=0.0)
    optimizer = build_optimizer(model, params)
    scheduler = build_scheduler(optimizer, params, 16)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")  # as fit() makes it
    criterion = build_criterion(None, cuda.device)
    losses = [train_one_epoch(model, batch, criterion, optimizer, scheduler, scaler, cuda,
                              precision, step).loss for step in range(16)]
    assert all(math.isfinite(v) for v in losses), losses
    assert statistics.fmean(losses[-4:]) < 0.9 * statistics.fmean(losses[:4]), losses
    if precision == "fp16":
        assert scaler.is_enabled() and 0 < scaler.get_scale() < math.inf
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _overfit(tiny_dataset: Path, masks: Path, cuda: Context) -> FCN8s:
    """FCN8s trained on the tiny train images in bf16 until their mIoU reaches 0.9 (a trained
    model's logit margins, for the agreement check)."""
    torch.manual_seed(0)
    loader = _train_loader(tiny_dataset, masks, cuda, 6)
    plain = DataLoader(SegmentationDataset(tiny_dataset, masks, "train"))
    model = FCN8s("vgg11_bn").to(cuda.device)
    params = TrainParams(lr=2e-3, epochs=500, weight_decay=0.0)
    optimizer = build_optimizer(model, params)
    scheduler = build_scheduler(optimizer, params, 500)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    criterion = build_criterion(None, cuda.device)
    for step in range(500):
        train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, cuda, "bf16",
                        step)
        if step % 10 == 9:
            result = validate(model, plain, criterion, cuda, "bf16")
            if summary(result.confusion)["miou"] >= 0.9:
                return model.eval()
    pytest.fail("six images did not overfit to mIoU 0.9 in 500 bf16 steps on CUDA")


def test_predictor_fp16_and_bf16_agree_with_fp32(tiny_dataset, masks, cuda):
    model = _overfit(tiny_dataset, masks, cuda)
    images = np.stack([np.array(read_rgb(p)) for p in list_images(tiny_dataset, "val")])
    with _gpu_check().strict_fp32(cuda.device):  # the reference: no TF32 anywhere
        reference = Predictor(model, "cuda", "fp32")(images)
    for precision in ("fp16", "bf16"):  # evaluate/export's defaults: autocast, channels-last
        predicted = Predictor(model, "cuda", precision, channels_last=True)(images)
        share = float((predicted == reference).mean())
        assert share >= MIN_AGREEMENT, f"{precision}: {share:.5%} of pixels agree with fp32"


def test_real_out_of_memory_falls_back_to_one_image_then_slide_mode(caplog):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = FCN8s("vgg11_bn").eval()
    for layer in (model.score_pool5, model.score_pool4, model.score_pool3):
        nn.init.normal_(layer.weight, std=0.5)
    images = np.random.default_rng(0).integers(0, 256, (2, 512, 1024, 3), dtype=np.uint8)
    window, stride = (128, 256), (96, 192)
    expected = Predictor(model, device, mode="slide", window=window, stride=stride)(images)
    peaks = {}
    for mode in ("slide", "whole"):
        predictor = Predictor(model, device, mode=mode, window=window, stride=stride)
        predictor(images[:1])
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        predictor(images[:1])
        peaks[mode] = torch.cuda.max_memory_reserved(device)
    assert peaks["slide"] < peaks["whole"], peaks
    capped = Predictor(model, device, window=window, stride=stride)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction((peaks["slide"] + peaks["whole"]) / 2 / total)
    try:
        with caplog.at_level("WARNING", "fcn"):
            got = capped(images)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    warnings = [r.message for r in caplog.records if "out of memory" in r.message]
    assert len(warnings) == 2 and "slide mode" in warnings[1], warnings
    assert (got == expected).mean() >= MIN_AGREEMENT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_bn_rank(rank: int, port: int, out: str) -> None:
    """One rank: fcn's process group (nccl) and SyncBatchNorm decision, one forward pass of
    this rank's batch; writes the running mean it ends with and its input's statistics."""
    import os

    from fcn.train.distributed import setup, teardown
    from fcn.train.fit import _sync_batchnorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    context = setup("cuda")
    try:
        norm = nn.BatchNorm2d(3, momentum=1.0)  # running mean = the last batch's mean
        model = _sync_batchnorm(nn.Sequential(norm), True, context).to(context.device)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[context.device])
        generator = torch.Generator().manual_seed(rank)
        x = torch.randn(2, 3, 8, 8, generator=generator) + 3 * rank  # ranks differ
        net.train()
        net(x.to(context.device))
        result = {"type": type(model[0]).__name__,
                  "running_mean": model[0].running_mean.cpu().tolist(),
                  "sum": x.sum(dim=(0, 2, 3)).tolist(), "count": x.numel() // 3}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        teardown(context)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for nccl")
def test_sync_batchnorm_uses_the_global_batch_under_two_process_nccl(tmp_path):
    torch.multiprocessing.spawn(_sync_bn_rank, args=(_free_port(), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert {r["type"] for r in ranks} == {"SyncBatchNorm"}
    total = torch.tensor(ranks[0]["sum"]) + torch.tensor(ranks[1]["sum"])
    global_mean = total / (ranks[0]["count"] + ranks[1]["count"])
    for rank in ranks:  # both ranks hold the global batch's mean, not their own
        assert torch.allclose(torch.tensor(rank["running_mean"]), global_mean, atol=1e-4)
    own = torch.tensor(ranks[0]["sum"]) / ranks[0]["count"]
    assert not torch.allclose(own, global_mean, atol=0.5)
