"""The training run: set-up, resume, the epoch loop, checkpoints and DVCLive logging.

Order of writes at the end of each epoch (rank 0 only): best.pt (if improved), then
last.pt, then the DVCLive files. last.pt is the commit point: a run killed anywhere
resumes from it and redoes at most one epoch, bit for bit as the first time (on CPU).

The DVCLive folder is rebuilt from the history stored in the checkpoint when a run starts
or resumes, rather than with DVCLive's own `resume=True`: that reads the step from
metrics.json, which after a SIGKILL can be one epoch ahead of (or behind) the checkpoint.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from fcn import checkpoint as ckpt
from fcn.train.data import SeededSampler, SegmentationDataset, ShardSampler, train_transform
from fcn.train.distributed import Context, broadcast_buffers, setup, teardown
from fcn.train.loop import (NonFiniteLossError, PassResult, build_criterion, build_optimizer,
                        build_scheduler, train_one_epoch, validate)
from fcn.cityscapes.labels import NUM_CLASSES
from fcn.metrics import summary
from fcn.model import build_model
from fcn.params import ModelParams, TrainParams

log = logging.getLogger(__name__)

METRICS = ("loss", "miou", "mean_dice", "mean_pixel_accuracy", "pixel_accuracy")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(device: torch.device) -> None:
    """Deterministic kernels on CPU (bit-exact resume); cuDNN autotuning on GPU (speed)."""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
        torch.backends.mkldnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def make_loaders(root: str | Path, generated: str | Path, t: TrainParams,
                 context: Context) -> tuple[DataLoader, DataLoader]:
    train_set = SegmentationDataset(root, generated, "train",
                                    train_transform(t.crop, t.scale, t.flip, t.jitter))
    val_set = SegmentationDataset(root, generated, "val")
    pin = context.device.type == "cuda"
    train_loader = DataLoader(
        train_set, batch_size=t.batch_size,
        sampler=SeededSampler(train_set, t.seed, context.rank, context.world_size),
        num_workers=t.workers, persistent_workers=t.workers > 0, pin_memory=pin,
        drop_last=len(train_set) // context.world_size >= t.batch_size,
        generator=torch.Generator().manual_seed(t.seed))
    val_loader = DataLoader(  # one whole image per forward: exact whatever the sharding
        val_set, batch_size=1,
        sampler=ShardSampler(len(val_set), context.rank, context.world_size),
        num_workers=t.workers, persistent_workers=t.workers > 0, pin_memory=pin)
    return train_loader, val_loader


def scores(result: PassResult) -> dict[str, float]:
    return {"loss": result.loss, **summary(result.confusion)}


class LiveLog:
    """The per-epoch DVCLive log of rank 0, rebuilt from the checkpoint's history."""

    def __init__(self, directory: str | Path, history: list[dict[str, Any]]) -> None:
        from dvclive import Live  # imported here: only rank 0 of a training run needs it

        self.live = Live(dir=str(directory), dvcyaml=False, save_dvc_exp=False, resume=False)
        for record in history:
            self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        self.live.step = record["epoch"]
        for split in ("train", "val"):
            for name in METRICS:
                self.live.log_metric(f"{split}/{name}", record[f"{split}/{name}"])
        self.live.log_metric("lr", record["lr"])
        self.live.log_metric("best/val_miou", record["best/val_miou"], plot=False)
        self.live.log_metric("best/epoch", record["best/epoch"], plot=False)
        self.live.next_step()

    def close(self) -> None:
        self.live.end()


def _better(miou: float, best: float) -> bool:
    return not math.isnan(miou) and (math.isnan(best) or miou > best)


def _log_epoch(record: dict[str, Any], epochs: int, seconds: float) -> None:
    log.info("epoch %d/%d (%.0f s): train loss %.4f mIoU %.4f | val loss %.4f mIoU %.4f "
             "mDice %.4f mAcc %.4f", record["epoch"] + 1, epochs, seconds,
             record["train/loss"], record["train/miou"], record["val/loss"],
             record["val/miou"], record["val/mean_dice"], record["val/mean_pixel_accuracy"])


def fit(model: ModelParams, train: TrainParams, root: str | Path, generated: str | Path,
        live_dir: str | Path = "metrics/train",
        identity: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Train as `model`/`train` say on the images under `root` and the masks under
    `generated`, resuming from `<train.out>/last.pt` when its parameter hash matches; returns
    the last epoch's record. `identity`: further sections (plain data) that name the data, so
    a checkpoint of other data is not resumed. Every rank calls this under torchrun."""
    context = setup(train.device)
    if not context.is_main:
        logging.getLogger("fcn").setLevel(logging.WARNING)
    hashed = ckpt.hashed_params(model, train, identity or {})
    try:
        return _fit(model, train, Path(root), Path(generated), hashed, context, Path(train.out),
                    Path(live_dir))
    finally:
        teardown(context)


def _fit(model_params: ModelParams, t: TrainParams, root: Path, generated: Path,
         hashed: Mapping[str, Any], context: Context, out: Path,
         live_dir: Path) -> dict[str, Any]:
    device = context.device
    configure_determinism(device)
    if device.type == "cpu" and t.precision != "fp32":
        log.info("train.precision %s applies on CUDA only: training on CPU in fp32",
                 t.precision)
    train_loader, val_loader = make_loaders(root, generated, t, context)

    seed_everything(t.seed)  # the same initial weights on every rank
    model = build_model(model_params, NUM_CLASSES).to(device)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, len(train_loader))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and t.precision == "fp16")
    criterion = build_criterion(t, device)

    resume = ckpt.resumable(out, hashed, t.epochs)
    history: list[dict[str, Any]] = []
    start_epoch, best_miou, best_epoch = 0, math.nan, -1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        start_epoch, best_miou, best_epoch = (resume["epoch"], resume["best_miou"],
                                              resume["best_epoch"])
        history = list(resume["history"])
        ckpt.set_rng_state(resume["rng"][min(context.rank, len(resume["rng"]) - 1)])
    else:
        seed_everything(t.seed + context.rank)  # per-rank streams (dropout, if any)

    net: torch.nn.Module = model
    if context.distributed:
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                      else None)
    live = LiveLog(live_dir, history) if context.is_main else None
    if start_epoch >= t.epochs:
        log.info("all %d epochs already trained: nothing to do", t.epochs)
    else:
        log.info("training %s on %s x%d: %d train / %d val images, %d iterations per epoch, "
                 "epochs %d..%d", model_params.backbone, device, context.world_size,
                 len(train_loader.dataset), len(val_loader.dataset), len(train_loader),
                 start_epoch + 1, t.epochs)

    record: dict[str, Any] = history[-1] if history else {}
    for epoch in range(start_epoch, t.epochs):
        started = time.perf_counter()
        train_loader.sampler.set_epoch(epoch)
        trained = train_one_epoch(net, train_loader, criterion, optimizer, scheduler, scaler,
                                  context, t.precision, epoch)
        broadcast_buffers(model, context)
        validated = validate(model, val_loader, criterion, context, t.precision)
        if not math.isfinite(validated.loss):
            raise NonFiniteLossError(
                f"non-finite validation loss after epoch {epoch + 1}: the weights diverged; "
                "stopped without saving, the last checkpoint is the last good one")
        record = {"epoch": epoch,
                  **{f"train/{k}": v for k, v in scores(trained).items()},
                  **{f"val/{k}": v for k, v in scores(validated).items()},
                  "lr": scheduler.get_last_lr()[0]}
        improved = _better(record["val/miou"], best_miou)
        if improved:
            best_miou, best_epoch = record["val/miou"], epoch
        record.update({"best/val_miou": best_miou, "best/epoch": best_epoch})
        history.append(record)
        if context.is_main:
            state = ckpt.training_state(
                model=model, model_params=model_params, epoch=epoch + 1,
                step=scheduler.last_epoch, optimizer=optimizer, scheduler=scheduler,
                scaler=scaler, best_miou=best_miou, best_epoch=best_epoch, history=history,
                hashed=hashed, rng=gather_rng_states(context))
            if improved:
                ckpt.save(out / ckpt.BEST, ckpt.best_subset(state))
            ckpt.save(out / ckpt.LAST, state)
            live.log(record)
        else:
            gather_rng_states(context)
        _log_epoch(record, t.epochs, time.perf_counter() - started)
    if live is not None:
        live.close()
        log.info("best val mIoU %.4f after epoch %d; checkpoints in %s", best_miou,
                 best_epoch + 1, out)
    return record


def gather_rng_states(context: Context) -> list[dict[str, Any]]:
    """Every rank's RNG states (rank order) on rank 0; an empty list on the others."""
    state = ckpt.rng_state()
    if not context.distributed:
        return [state]
    gathered: list[Any] = [None] * context.world_size if context.is_main else []
    dist.gather_object(state, gathered if context.is_main else None, dst=0)
    return gathered
