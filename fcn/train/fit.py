"""The training run: set-up, resume, the epoch loop, checkpoints and DVCLive logging.

Checkpoints live in the run's state folder (`fcn.train.resume`) until the run ends; then
best.pt and last.pt move to `train.out`. Order of writes at the end of each epoch (rank 0
only): best.pt (if improved), then last.pt, then the DVCLive files. last.pt is the commit
point: a run killed anywhere resumes from it and redoes at most one epoch, bit for bit as the
first time (on CPU).

The DVCLive folder is rebuilt from the history stored in the checkpoint when a run starts
or resumes, rather than with DVCLive's own `resume=True`: that reads the step from
metrics.json, which after a SIGKILL can be one epoch ahead of (or behind) the checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
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
from fcn.backends import flags, training_mode
from fcn.device import grad_scaler, restore_scaler
from fcn.images import MAX_PIXELS
from fcn.train.augment import Recipe
from fcn.train.data import SeededSampler, SegmentationDataset, ShardSampler, worker_count
from fcn.train import resume
from fcn.train.distributed import Context, broadcast_buffers, setup, teardown
from fcn.decode import file_digest
from fcn.errors import DataError, FcnError
from fcn.class_weights import read_class_weights
from fcn.train.loop import (NonFiniteLossError, PassResult, build_criterion, build_optimizer,
                        build_scheduler, train_one_epoch, validate)
from fcn.cityscapes import layout
from fcn.cityscapes.labels import CLASS_NAMES, NUM_CLASSES
from fcn.metrics import class_scores, summary
from fcn.model import build_model, describe
from fcn.params import ModelParams, TrainParams

log = logging.getLogger(__name__)

METRICS = ("loss", "miou", "mean_dice", "mean_pixel_accuracy", "pixel_accuracy")
TIMES = ("data_s", "compute_s", "data_fraction", "samples_per_s", "val_s")
"""Per-epoch timings (`time/<name>`): the training loop's wait for the loader against the rest
(rank 0's view), training throughput over all processes, and validation's duration."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_loaders(root: str | Path, generated: str | Path, t: TrainParams, context: Context,
                 decoded: str | Path | None = None, max_pixels: int = MAX_PIXELS,
                 generated_coarse: str | Path | None = None) -> tuple[DataLoader, DataLoader]:
    """The train loader (seeded crops, uint8, `train.workers` processes, pinned and prefetched
    for CUDA) and the val loader (whole uint8 images of gtFine val, sharded over ranks).
    The decoded cache holds gtFine alone: a training that reads a gtCoarse source reads its
    training images from PNGs (the same samples), and val from the cache."""
    recipe = Recipe.of(t.crop, t.scale, t.flip, t.jitter, t.class_uniform, t.cat_max_ratio,
                       t.cat_max_tries)
    coarse = [s for s in t.splits if layout.parse_source(s)[1] != layout.FINE]
    train_decoded = None if coarse else decoded
    if coarse and decoded is not None:
        log.info("%s: not in the decoded cache (gtFine only); training reads PNG files",
                 ", ".join(coarse))
    train_set = SegmentationDataset(root, generated, t.splits, recipe, train_decoded,
                                    max_pixels, generated_coarse)
    val_set = SegmentationDataset(root, generated, "val", None, decoded, max_pixels)
    workers = worker_count(t.workers, context.device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    log.info("data: %s, %d loader worker(s)%s", f"decoded cache {decoded}" if decoded
             else "PNG files", workers, " (train.workers auto)" if t.workers == "auto" else "")
    pin = context.device.type == "cuda"
    extra = {"persistent_workers": True, "prefetch_factor": 4} if workers else {}
    train_loader = DataLoader(
        train_set, batch_size=t.batch_size,
        sampler=SeededSampler(train_set, t.seed, context.rank, context.world_size),
        num_workers=workers, pin_memory=pin,
        drop_last=len(train_set) // context.world_size >= t.batch_size,
        generator=torch.Generator().manual_seed(t.seed), **extra)
    val_loader = DataLoader(  # one whole image per forward: exact whatever the sharding
        val_set, batch_size=1,
        sampler=ShardSampler(len(val_set), context.rank, context.world_size),
        num_workers=workers, pin_memory=pin, **extra)
    return train_loader, val_loader


def scores(result: PassResult, per_class: bool = False) -> dict[str, float]:
    """Loss and summary scores; with per_class also `iou/<class>` for the 19 classes."""
    out = {"loss": result.loss, **summary(result.confusion)}
    if per_class:
        ious = class_scores(result.confusion)["iou"]
        out.update({f"iou/{name}": float(v) for name, v in zip(CLASS_NAMES, ious)})
    return out


def timing_dir_of(live_dir: str | Path) -> Path:
    """Where the wall-clock figures of a run logged to `live_dir` go: beside it, apart from
    the scores (`<live_dir>_timing`), so that two runs of the same parameters give identical
    score files."""
    return Path(f"{Path(live_dir)}_timing")


class LiveLog:
    """The per-epoch DVCLive logs of rank 0, rebuilt from the checkpoint's history: the
    scores in `directory` (identical files for identical runs), and the wall-clock figures
    (`time/*`, and with `monitor_system` DVCLive's CPU/RAM/GPU samples from then on) in
    `timing_directory`. `compute`: the math the run trains with, written into the scores'
    summary (metrics.json) as `compute.*`; `init`: what train.init loaded, as `init.*`."""

    def __init__(self, directory: str | Path, history: list[dict[str, Any]],
                 monitor_system: bool = False, compute: dict[str, Any] | None = None,
                 timing_directory: str | Path | None = None,
                 timing_history: list[dict[str, Any]] = (),
                 init: dict[str, Any] | None = None) -> None:
        from dvclive import Live  # imported here: only rank 0 of a training run needs it

        self.live = Live(dir=str(directory), dvcyaml=False, save_dvc_exp=False, resume=False)
        timing = Path(timing_directory) if timing_directory else timing_dir_of(directory)
        timing.mkdir(parents=True, exist_ok=True)
        self.timing = Live(dir=str(timing), dvcyaml=False, save_dvc_exp=False, resume=False)
        if compute is not None:  # how the numbers were computed (fcn.backends.flags)
            self.live.summary["compute"] = dict(compute)
        if init is not None:  # what train.init loaded (ckpt.InitReport.summary)
            self.live.summary["init"] = dict(init)
        for record in history:
            self.log(record)
        for record in timing_history:
            self.log_times(record)
        if monitor_system:  # after the replay, so old epochs get no samples of this run
            if not torch.cuda.is_available():
                # pynvml comes with dvclive even where no NVIDIA driver is: without this its
                # monitor prints a traceback about the missing library instead of skipping
                import dvclive.monitor_system

                dvclive.monitor_system.GPU_AVAILABLE = False
            self.timing.monitor_system()

    def log_times(self, record: dict[str, Any]) -> None:
        """An epoch's `time/*` figures, to the timing log."""
        self.timing.step = record["epoch"]
        for name in TIMES:
            key = f"time/{name}"
            if key in record:
                self.timing.log_metric(key, record[key])
        self.timing.next_step()

    def log(self, record: dict[str, Any]) -> None:
        """An epoch's scores, to the scores' log (its `time/*`, if any, go nowhere here)."""
        self.live.step = record["epoch"]
        for split in ("train", "val"):  # val is absent from epochs train.val_every skips
            for name in METRICS:
                if f"{split}/{name}" in record:
                    self.live.log_metric(f"{split}/{name}", record[f"{split}/{name}"])
        for name in CLASS_NAMES:
            key = f"val/iou/{name}"
            if key in record:
                self.live.log_metric(key, record[key])
        self.live.log_metric("lr", record["lr"])
        self.live.log_metric("best/val_miou", record["best/val_miou"], plot=False)
        self.live.log_metric("best/epoch", record["best/epoch"], plot=False)
        self.live.log_metric("stopped_early", record.get("stopped_early", 0), plot=False)
        self.live.next_step()

    def close(self) -> None:
        """Write the final summaries and stop the system monitor."""
        self.live.end()
        self.timing.end()

    def abort(self) -> None:
        """Stop the system monitor only (a failed run: its thread must not keep the process
        alive); the files stay as the last good epoch left them."""
        monitor = getattr(self.timing, "_system_monitor", None)
        if monitor is not None:
            monitor.end()


def _better(miou: float, best: float) -> bool:
    return not math.isnan(miou) and (math.isnan(best) or miou > best)


def _log_epoch(record: dict[str, Any], epochs: int, seconds: float) -> None:
    val = ("not validated (train.val_every)" if "val/miou" not in record else
           "val loss {:.4f} mIoU {:.4f} mDice {:.4f} mAcc {:.4f}".format(
               record["val/loss"], record["val/miou"], record["val/mean_dice"],
               record["val/mean_pixel_accuracy"]))
    log.info("epoch %d/%d (%.0f s, data wait %.0f%%): train loss %.4f mIoU %.4f | %s",
             record["epoch"] + 1, epochs, seconds, 100 * record["time/data_fraction"],
             record["train/loss"], record["train/miou"], val)


def validates(epoch: int, epochs: int, every: int) -> bool:
    """Whether epoch `epoch` (from 0) of `epochs` is validated: every `every`-th, and the last."""
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


def fit(model: ModelParams, train: TrainParams, root: str | Path, generated: str | Path,
        live_dir: str | Path | None = "metrics/train",
        identity: Mapping[str, Mapping[str, Any]] | None = None,
        class_weights_file: str | Path | None = None, decoded: str | Path | None = None,
        max_pixels: int = MAX_PIXELS,
        generated_coarse: str | Path | None = None) -> dict[str, Any]:
    """Train as `model`/`train` say on the images under `root` and the masks under
    `generated`; returns the last epoch's record. Checkpoints go to the run's state folder
    (`<train.resume_dir>/<hash>/`), which a killed run resumes from; when the run ends, best.pt
    and last.pt move to `train.out`. A finished run's `<train.out>/last.pt` with the same hash
    is not trained again. `identity`: further sections (plain data) that name the data, so a
    checkpoint of other data is not resumed; `class_weights_file`: the class_weights stage's
    output, read when train.class_weights names a scheme; `decoded`: the decode stage's cache,
    read instead of the PNGs (the same samples either way); `max_pixels`: data.max_pixels;
    `generated_coarse`: the coarse_masks stage's folder, for gtCoarse sources in train.splits;
    `live_dir`: the scores' DVCLive folder (its wall-clock figures go to `<live_dir>_timing`);
    None: no DVCLive log (checkpoints only).

    The run computes inside `fcn.backends.training_mode` (deterministic on a CPU, cuDNN
    autotuning on CUDA, TF32 only for precision tf32), and leaves the switches as it found
    them. Every rank calls this under torchrun."""
    context = setup(train.device)
    if not context.is_main:
        logging.getLogger("fcn").setLevel(logging.WARNING)
    identity = dict(identity or {})
    init_weights = None
    if train.init is not None:  # the file's content, not only its path, names the run
        if not Path(train.init).is_file():
            raise DataError(f"{train.init}: train.init: checkpoint not found (keep it outside "
                            f"train.out, {train.out}: DVC deletes the stage's outputs first)")
        init_weights = ckpt.check_init(train.init, model)  # a foreign file: before any work
        identity["init"] = {"sha256": file_digest(Path(train.init))}
    hashed = ckpt.hashed_params(model, train, identity)
    weights = train.class_weights
    if isinstance(weights, str):
        if class_weights_file is None:
            raise FcnError(f"train.class_weights is {weights!r}: the class_weights stage's file "
                           "is needed (stages/train.py --class-weights)")
        weights = read_class_weights(class_weights_file, weights)
    directory = resume.state_dir(train.resume_dir, hashed)
    live = None if live_dir is None else Path(live_dir)
    try:
        with training_mode(context.device, train.precision):
            if not context.is_main:
                return _fit(model, train, Path(root), Path(generated), hashed, context,
                            directory, Path(train.out), live, weights, decoded, max_pixels,
                            init_weights, generated_coarse)
            with resume.locked(directory, hashed):
                log.info("training state: %s", directory)
                return _fit(model, train, Path(root), Path(generated), hashed, context,
                            directory, Path(train.out), live, weights, decoded, max_pixels,
                            init_weights, generated_coarse)
    finally:
        teardown(context)


def schedule(t: TrainParams, batches_per_epoch: int) -> tuple[int, int, int]:
    """(optimizer steps per epoch, total optimizer steps, epochs to run) for `t`: epochs as
    given, or as many as `t.iterations` steps need (the last one stops at that step)."""
    per_epoch = -(-batches_per_epoch // t.accumulate)
    if t.iterations is not None:
        return per_epoch, t.iterations, -(-t.iterations // per_epoch)
    return per_epoch, t.epochs * per_epoch, t.epochs


def _sync_batchnorm(model: torch.nn.Module, enabled: bool, context: Context) -> torch.nn.Module:
    """SyncBatchNorm under DDP on CUDA; plain BN otherwise, saying why (never a crash)."""
    if not enabled:
        return model
    if not context.distributed:
        log.info("train.sync_bn: one process, nothing to synchronise: plain BatchNorm")
        return model
    if context.device.type != "cuda":
        log.info("train.sync_bn: PyTorch's SyncBatchNorm runs on CUDA only: plain BatchNorm "
                 "per process on %s (statistics of each process's batch)", context.device)
        return model
    log.info("train.sync_bn: SyncBatchNorm over %d processes (statistics of the global batch "
             "of %d crops)", context.world_size, context.world_size)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _fit(model_params: ModelParams, t: TrainParams, root: Path, generated: Path,
         hashed: Mapping[str, Any], context: Context, directory: Path | None, out: Path,
         live_dir: Path | None, class_weights: list[float] | None,
         decoded: str | Path | None, max_pixels: int,
         init_weights: Mapping[str, Any] | None = None,
         generated_coarse: str | Path | None = None) -> dict[str, Any]:
    device = context.device
    compute = flags(device, t.precision)
    if device.type == "cpu" and t.precision != "fp32":
        log.info("train.precision %s applies on CUDA only: training on CPU in fp32",
                 t.precision)
    log.info("compute: %s", ", ".join(f"{k} {v}" for k, v in compute.items()))
    train_loader, val_loader = make_loaders(root, generated, t, context, decoded, max_pixels,
                                            generated_coarse)
    trains_on_val = any(layout.parse_source(s)[0] == "val" for s in t.splits)  # any set's
    if trains_on_val:
        log.warning("train.splits includes val: validation then scores images the model "
                    "trains on (a fit measure, not generalisation), so best.pt is simply the "
                    "last epoch")

    seed_everything(t.seed)  # the same initial weights on every rank
    model = build_model(model_params, NUM_CLASSES)
    init = None
    if t.init is not None:
        init = ckpt.initialise_from(model, t.init, model_params, init_weights)
        log.info("train.init: %d tensors loaded from %s; %d left as built%s; %d of the "
                 "checkpoint's unused%s", len(init.loaded), t.init, len(init.fresh),
                 f" ({', '.join(init.fresh[:8])}{' …' if len(init.fresh) > 8 else ''})"
                 if init.fresh else "", len(init.unused),
                 f" ({', '.join(init.unused[:8])}{' …' if len(init.unused) > 8 else ''})"
                 if init.unused else "")
    model = _sync_batchnorm(model, t.sync_bn, context)
    model = model.to(device)
    per_epoch, total_steps, epochs = schedule(t, len(train_loader))
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    scaler = grad_scaler(device, t.precision)
    criterion = build_criterion(class_weights, device)

    state, finished_in_out = resume.resume_point(directory, out, hashed, epochs)
    history: list[dict[str, Any]] = []  # scores only: checkpoints hold no wall-clock figure
    timing_history: list[dict[str, Any]] = []
    start_epoch, best_miou, best_epoch, stopped = 0, math.nan, -1, ""
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_scaler(scaler, state["scaler"])
        start_epoch, best_miou, best_epoch = (state["epoch"], state["best_miou"],
                                              state["best_epoch"])
        stopped = state.get("stop_reason", "")
        history = list(state["history"])
        if not finished_in_out:  # the epochs this run's state folder timed, up to last.pt's
            timing_history = [r for r in resume.read_timings(directory)
                              if r.get("epoch", start_epoch) < start_epoch]
        ckpt.set_rng_state(state["rng"][min(context.rank, len(state["rng"]) - 1)], device)
    else:
        seed_everything(t.seed + context.rank)  # per-rank streams (dropout, if any)

    net: torch.nn.Module = model
    if context.distributed:
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                      else None)
    if t.compile:  # the training model only: validation runs the eager `model`
        log.info("train.compile: compiling the training model (the first step takes longer)")
        net = torch.compile(net)
    live = (LiveLog(live_dir, history, t.monitor_system, compute,
                    timing_history=timing_history,
                    init=None if init is None else init.summary())
            if context.is_main and live_dir is not None else None)
    if stopped or start_epoch >= epochs:
        log.info("%s: nothing to do", stopped or f"all {epochs} epochs already trained")
        start_epoch = epochs
        if finished_in_out:
            directory = None  # `out` already holds this run's checkpoints
    else:
        log.info("training %s on %s x%d: %d images (%s) / %d val images, batch %d x %d "
                 "accumulated x %d processes, %d optimizer steps per epoch, %d in all; epochs "
                 "%d..%d", describe(model_params), device, context.world_size,
                 len(train_loader.dataset), "+".join(t.splits), len(val_loader.dataset),
                 t.batch_size, t.accumulate, context.world_size, per_epoch, total_steps,
                 start_epoch + 1, epochs)

    record: dict[str, Any] = history[-1] if history else {}
    try:
        for epoch in range(start_epoch, epochs):
            started = time.perf_counter()
            train_loader.sampler.set_epoch(epoch)
            trained = train_one_epoch(net, train_loader, criterion, optimizer, scheduler, scaler,
                                      context, t.precision, epoch, accumulate=t.accumulate,
                                      max_steps=total_steps - scheduler.last_epoch,
                                      check_every=t.log_every)
            broadcast_buffers(model, context)
            validating = time.perf_counter()
            val_scores: dict[str, float] = {}
            checked = validates(epoch, epochs, t.val_every)
            if checked:
                validated = validate(model, val_loader, criterion, context, t.precision)
                if not math.isfinite(validated.loss):
                    raise NonFiniteLossError(
                        f"non-finite validation loss after epoch {epoch + 1}: the weights "
                        "diverged; stopped without saving, the last checkpoint is the last good "
                        "one")
                val_scores = {f"val/{k}": v for k, v in scores(validated, per_class=True).items()}
            record = {"epoch": epoch,
                      **{f"train/{k}": v for k, v in scores(trained).items()},
                      **val_scores,
                      **timings(trained, time.perf_counter() - validating, context),
                      "lr": scheduler.get_last_lr()[0]}
            if trains_on_val:  # best.pt is the last epoch, validated or not
                improved, best_miou, best_epoch = True, record.get("val/miou", math.nan), epoch
            else:
                improved = checked and _better(record["val/miou"], best_miou)
                if improved:
                    best_miou, best_epoch = record["val/miou"], epoch
            if (checked and t.patience is not None and epoch - best_epoch >= t.patience
                    and epoch + 1 < epochs):
                stopped = (f"stopped early after epoch {epoch + 1}: no val mIoU gain for "
                           f"{t.patience} epochs (best {best_miou:.4f} after epoch {best_epoch + 1})")
            record.update({"best/val_miou": best_miou, "best/epoch": best_epoch + 1,  # as logged
                           "stopped_early": int(bool(stopped))})
            history.append({k: v for k, v in record.items() if not k.startswith("time/")})
            timing_history.append({k: v for k, v in record.items()
                                   if k == "epoch" or k.startswith("time/")})
            if context.is_main:
                state = ckpt.training_state(
                    model=model, model_params=model_params, epoch=epoch + 1,
                    step=scheduler.last_epoch, optimizer=optimizer, scheduler=scheduler,
                    scaler=scaler, best_miou=best_miou, best_epoch=best_epoch, history=history,
                    hashed=hashed, rng=gather_rng_states(context), stop_reason=stopped)
                if improved:
                    ckpt.save(directory / ckpt.BEST, ckpt.best_subset(state))
                resume.write_timings(directory, timing_history)  # before last.pt, the commit
                ckpt.save(directory / ckpt.LAST, state)
                if live is not None:
                    live.log(record)
                    live.log_times(timing_history[-1])
            else:
                gather_rng_states(context)
            _log_epoch(record, epochs, time.perf_counter() - started)
            if stopped:
                log.info("%s; best.pt is epoch %d", stopped, best_epoch + 1)
                break
    except BaseException:
        if live is not None:
            live.abort()  # its monitor thread must not keep a failed run's process alive
        raise
    if context.is_main:
        if live is not None:
            live.close()
        if directory is not None:  # last: killed before this, a rerun resumes and publishes
            resume.publish(directory, out)
        log.info("best val mIoU %.4f after epoch %d; checkpoints in %s", best_miou,
                 best_epoch + 1, out)
    return record


def timings(trained: PassResult, val_s: float, context: Context) -> dict[str, float]:
    """The epoch's `time/<name>` figures (TIMES): rank 0's loader wait against the rest of
    its training loop, the samples/s of all processes together, validation's seconds."""
    busy = trained.data_s + trained.compute_s
    return {"time/data_s": trained.data_s, "time/compute_s": trained.compute_s,
            "time/data_fraction": trained.data_s / busy if busy else math.nan,
            "time/samples_per_s": trained.samples * context.world_size / busy if busy else math.nan,
            "time/val_s": val_s}


def gather_rng_states(context: Context) -> list[dict[str, Any]]:
    """Every rank's RNG states (rank order, each with its own GPU's) on rank 0; an empty
    list on the others."""
    state = ckpt.rng_state(context.device)
    if not context.distributed:
        return [state]
    gathered: list[Any] = [None] * context.world_size if context.is_main else []
    dist.gather_object(state, gathered if context.is_main else None, dst=0)
    return gathered
