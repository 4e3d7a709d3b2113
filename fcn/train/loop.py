"""One epoch of training, one pass of validation, and the pieces they run with
(optimizer, poly LR schedule, loss, mixed precision).

Scores come from confusion matrices summed over batches and ranks, never from averaged
per-batch scores; losses are summed with their weights and divided once at the end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from fcn.device import autocast
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
    """Loss and confusion matrix of one pass over a loader (already summed over ranks)."""

    loss: float
    confusion: torch.Tensor


def build_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; weight decay on weights only (not on biases, BN parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": params.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum)
    return torch.optim.AdamW(groups, lr=params.lr)


def poly_factor(iteration: int, total: int, power: float, warmup: int) -> float:
    """LR multiplier: linear warm-up over `warmup` iterations, then (1 - t/total)^power."""
    if warmup and iteration < warmup:
        return (iteration + 1) / warmup
    return max(0.0, 1 - iteration / max(1, total)) ** power


def build_scheduler(optimizer: torch.optim.Optimizer, params: TrainParams,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Poly LR stepped once per iteration (its state dict holds no function, only numbers)."""
    total = params.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda it: poly_factor(it, total, params.poly_power, params.warmup_iters))


def build_criterion(params: TrainParams, device: torch.device) -> nn.CrossEntropyLoss:
    weight = None
    if params.class_weights is not None:
        weight = torch.tensor(params.class_weights, dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)


def _progress(iterable: Iterable, context: Context, desc: str, total: int) -> Iterable:
    return tqdm(iterable, desc=desc, total=total, unit="batch", leave=False,
                disable=not context.is_main)


def train_one_epoch(model: nn.Module, loader: Iterable, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler,
                    scaler: torch.amp.GradScaler, context: Context, precision: str,
                    epoch: int, num_classes: int = NUM_CLASSES) -> PassResult:
    """Train over `loader` once; the loss is checked every step on every rank, so a NaN
    stops all ranks before it reaches the weights."""
    model.train()
    device = context.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, targets in _progress(loader, context, f"train {epoch}", len(loader)):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
            loss = criterion(logits.float(), targets)
        finite = bool(torch.isfinite(loss.detach()))
        if any_rank(not finite, context):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()} on rank {context.rank}) at epoch "
                f"{epoch + 1}, iteration {steps + 1} (lr {scheduler.get_last_lr()[0]:.3g}); stopped "
                "without saving: the last checkpoint is the last good one. Lower train.lr, "
                "add warm-up (train.warmup_iters) or use train.precision bf16/fp32")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach().double()
        steps += 1
        confusion += confusion_matrix(targets, logits.detach().argmax(1), num_classes)
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(steps), device=device,
                                                                dtype=torch.float64)]), context)
    all_reduce_sum(confusion, context)
    return PassResult(float(totals[0] / totals[1]) if totals[1] else math.nan, confusion.cpu())


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
    for images, targets in _progress(loader, context, desc, len(loader)):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
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
