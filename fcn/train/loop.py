"""One epoch of training, one pass of validation, and the pieces they run with
(optimizer, poly LR schedule, loss, mixed precision).

Scores come from confusion matrices summed over batches and ranks, never from averaged
per-batch scores; losses are summed with their weights and divided once at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from fcn.device import autocast
from fcn.train import photometric
from fcn.train.distributed import Context, all_reduce_sum, any_rank
from fcn.errors import FcnError
from fcn.cityscapes.labels import IGNORE_INDEX, NUM_CLASSES
from fcn.metrics import confusion_matrix
from fcn.params import TrainParams

log = logging.getLogger(__name__)


class NonFiniteLossError(FcnError):
    """The loss became NaN or infinite; training stops, the last checkpoint stays as it was."""


@dataclass
class PassResult:
    """Loss and confusion matrix of one pass over a loader (already summed over ranks), and
    where this rank's time went: waiting for the loader, and everything else."""

    loss: float
    confusion: torch.Tensor
    data_s: float = 0.0
    compute_s: float = 0.0
    samples: int = 0


def build_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; weight decay on weights only (not on biases, BN parameters).

    With `head_lr_mult` != 1 the layers ImageNet weights do not initialise (everything but
    `model.backbone_modules()`: score, upsampling, fc6/fc7) get that multiple of the LR; the
    poly schedule scales every group alike.
    """
    def split(parameters: list[nn.Parameter], lr: float) -> list[dict]:
        trainable = [p for p in parameters if p.requires_grad]
        return [{"params": [p for p in trainable if p.ndim > 1], "lr": lr,
                 "weight_decay": params.weight_decay},
                {"params": [p for p in trainable if p.ndim <= 1], "lr": lr, "weight_decay": 0.0}]

    if params.head_lr_mult == 1.0:
        groups = split(list(model.parameters()), params.lr)
    else:
        backbone = {id(p) for m in model.backbone_modules() for p in m.parameters()}
        groups = (split([p for p in model.parameters() if id(p) in backbone], params.lr)
                  + split([p for p in model.parameters() if id(p) not in backbone],
                          params.lr * params.head_lr_mult))
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum)
    return torch.optim.AdamW(groups, lr=params.lr)


def poly_factor(iteration: int, total: int, power: float, warmup: int) -> float:
    """LR multiplier: linear warm-up over `warmup` iterations, then (1 - t/total)^power."""
    if warmup and iteration < warmup:
        return (iteration + 1) / warmup
    return max(0.0, 1 - iteration / max(1, total)) ** power


def build_scheduler(optimizer: torch.optim.Optimizer, params: TrainParams,
                    total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Poly LR over `total` optimizer steps, stepped once per optimizer step (its state dict
    holds no function, only numbers)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda it: poly_factor(it, total, params.poly_power, params.warmup_iters))


def build_criterion(class_weights: Sequence[float] | None,
                    device: torch.device) -> nn.CrossEntropyLoss:
    """Cross-entropy over trainIds, ignoring 255, with per-class weights if given."""
    weight = None
    if class_weights is not None:
        weight = torch.tensor(list(class_weights), dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)


def to_device(batch: Sequence[torch.Tensor],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch → (float images in [0, 1], int64 targets) on `device`: uint8 crops are
    converted there, and jittered there when the batch carries photometric parameters
    (`fcn.train.photometric`), so the loader's cores never do float work."""
    images, targets, *jitter = batch
    images = photometric.to_float(images.to(device, non_blocking=True))
    if jitter:
        images = photometric.jitter(images, jitter[0])
    return images, targets.to(device, non_blocking=True).long()


def _progress(iterable: Iterable, context: Context, desc: str, total: int) -> Iterable:
    """A batch bar on rank 0 only. `disable` is passed only to silence the other ranks: an
    explicit value would override the user's TQDM_DISABLE (tqdm reads TQDM_* into defaults)."""
    hidden = {} if context.is_main else {"disable": True}
    return tqdm(iterable, desc=desc, total=total, unit="batch", leave=False, **hidden)


class _Timed:
    """Iterate over `iterable`, adding the time spent waiting for each item to `waited`."""

    def __init__(self, iterable: Iterable) -> None:
        self.iterator = iter(iterable)
        self.waited = 0.0

    def __iter__(self) -> _Timed:
        return self

    def __next__(self):
        started = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.waited += time.perf_counter() - started


def train_one_epoch(model: nn.Module, loader: Iterable, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler,
                    scaler: torch.amp.GradScaler, context: Context, precision: str,
                    epoch: int, num_classes: int = NUM_CLASSES, accumulate: int = 1,
                    max_steps: int | None = None) -> PassResult:
    """Train over `loader` once (or until `max_steps` optimizer steps); the loss is checked
    every forward pass on every rank, so a NaN stops all ranks before it reaches the weights.

    Gradients of `accumulate` consecutive batches add up before each optimizer step (each
    batch's loss divided by the group's size; the last group of an epoch may be smaller), and
    under DDP they are all-reduced only on a group's last batch (`no_sync`). Batch norm sees
    each batch alone: its statistics are those of `batch_size`, not of the effective batch.
    """
    model.train()
    device = context.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    passes = optimizer_steps = 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    total = len(loader)
    no_sync = getattr(model, "no_sync", None)
    optimizer.zero_grad(set_to_none=True)
    started, samples = time.perf_counter(), 0
    batches = _Timed(_progress(loader, context, f"train {epoch}", total))
    for batch in batches:
        position = passes % accumulate
        group = min(accumulate, total - (passes - position))  # batches in this step
        last = position == group - 1
        images, targets = to_device(batch, device)
        syncing = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with syncing:
            with autocast(device, precision):
                logits = model(images)
                loss = criterion(logits.float(), targets)
            finite = bool(torch.isfinite(loss.detach()))
            if any_rank(not finite, context):
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss.item()} on rank {context.rank}) at epoch "
                    f"{epoch + 1}, iteration {passes + 1} (optimizer step {optimizer_steps + 1}, "
                    f"lr {scheduler.get_last_lr()[0]:.3g}); stopped without saving: the last "
                    "checkpoint is the last good one. Lower train.lr, add warm-up "
                    "(train.warmup_iters) or use train.precision bf16/fp32")
            scaler.scale(loss if group == 1 else loss / group).backward()
        if last:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            optimizer_steps += 1
        loss_sum += loss.detach().double()
        passes += 1
        samples += len(targets)
        confusion += confusion_matrix(targets, logits.detach().argmax(1), num_classes)
        if last and max_steps is not None and optimizer_steps >= max_steps:
            break
    elapsed = time.perf_counter() - started
    steps = passes
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(steps), device=device,
                                                                dtype=torch.float64)]), context)
    all_reduce_sum(confusion, context)
    return PassResult(float(totals[0] / totals[1]) if totals[1] else math.nan, confusion.cpu(),
                      data_s=batches.waited, compute_s=elapsed - batches.waited,
                      samples=samples)


@torch.inference_mode()
def validate(model: nn.Module, loader: Iterable, criterion: nn.CrossEntropyLoss,
             context: Context, precision: str, num_classes: int = NUM_CLASSES,
             desc: str = "val") -> PassResult:
    """Whole-image validation: the loss is the (class-weighted) mean over every labelled
    pixel of every rank's share, the confusion matrix their exact sum."""
    model.eval()
    device = context.device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # weighted loss, weight
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    weight = criterion.weight
    for batch in _progress(loader, context, desc, len(loader)):
        images, targets = to_device(batch, device)
        with autocast(device, precision):
            logits = model(images).float()
        pixel_loss = nn.functional.cross_entropy(logits, targets, weight=weight,
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        valid = targets != IGNORE_INDEX
        pixel_weight = (weight[targets[valid]].sum() if weight is not None
                        else valid.sum())
        sums += torch.stack([pixel_loss.double(), pixel_weight.double()])
        confusion += confusion_matrix(targets, logits.argmax(1), num_classes)
    all_reduce_sum(sums, context)
    all_reduce_sum(confusion, context)
    return PassResult(float(sums[0] / sums[1]) if sums[1] else math.nan, confusion.cpu())
