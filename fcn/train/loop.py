"""One epoch of training, one pass of validation, and the pieces they run with
(optimizer, poly LR schedule, loss, mixed precision).

Scores come from confusion matrices summed over batches and ranks, never from averaged
per-batch scores; losses are summed with their weights and divided once at the end.

The training step never waits for the GPU: the loss sum, the confusion matrix and the
finiteness of the loss stay on the device (`TrainStep`), and the host reads them only every
`check_every` forward passes and at the end of the epoch. So the CPU queues the next steps
while the GPU runs this one. A NaN or infinite loss is therefore noticed at the next check,
not at once: training stops there, naming the first bad iteration, before any checkpoint
holding its weights is written (checkpoints are written at the end of an epoch, after the
last check).
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

from fcn.cityscapes.labels import IGNORE_INDEX, NUM_CLASSES
from fcn.device import autocast, to_model_input
from fcn.errors import FcnError
from fcn.metrics import ConfusionMatrix
from fcn.params import TrainParams
from fcn.train import photometric
from fcn.train.distributed import Context, all_reduce_sum, any_rank

log = logging.getLogger(__name__)

CHECK_EVERY = 50
"""Forward passes between the host's reads of the training figures (`train.log_every`)."""


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
    poly schedule scales every group alike. On CUDA the optimizer is fused (one kernel per
    step, and fp16's gradient scaler then checks for inf/NaN without a host round trip); on a
    CPU it is PyTorch's default implementation, so CPU results stay bit-identical.
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
    fused = {"fused": True} if next(model.parameters()).device.type == "cuda" else {}
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum, **fused)
    return torch.optim.AdamW(groups, lr=params.lr, **fused)


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


class SegmentationLoss(nn.Module):
    """Cross-entropy over trainIds, ignoring 255, with per-class weights if given: the
    weighted mean over labelled pixels, as `nn.CrossEntropyLoss` computes it (bit for bit
    without weights), except that a batch with no labelled pixel (a crop of ego vehicle and
    out-of-ROI, all 255) has loss 0 and no gradient instead of NaN, which would stop training
    as "diverged". Computed without reading anything back."""

    def __init__(self, weight: torch.Tensor | None = None,
                 ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = nn.functional.cross_entropy(logits, target, weight=self.weight,
                                            ignore_index=self.ignore_index, reduction="sum")
        valid = target != self.ignore_index
        if self.weight is None:
            labelled = valid.sum().to(total.dtype)
        else:
            labelled = torch.where(valid, self.weight[target.clamp(0, len(self.weight) - 1)],
                                   0.0).sum().to(total.dtype)
        return total / torch.where(labelled > 0, labelled, torch.ones_like(labelled))


def build_criterion(class_weights: Sequence[float] | None,
                    device: torch.device) -> SegmentationLoss:
    """The training loss (`SegmentationLoss`), with per-class weights if given."""
    weight = None
    if class_weights is not None:
        weight = torch.tensor(list(class_weights), dtype=torch.float32, device=device)
    return SegmentationLoss(weight)


def to_device(batch: Sequence[torch.Tensor],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch → (float images in [0, 1], int64 targets) on `device`: uint8 crops are
    converted there, and jittered there when the batch carries photometric parameters
    (`fcn.train.photometric`), so the loader's cores never do float work. Copies are
    asynchronous (the loader pins its batches for CUDA)."""
    images, targets, *jitter = batch
    images = to_model_input(images.to(device, non_blocking=True))
    if jitter:
        images = photometric.jitter(images, jitter[0])
    return images, targets.to(device, non_blocking=True).long()


def _progress(iterable: Iterable, context: Context, desc: str, total: int) -> tqdm:
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


class TrainStep:
    """Forward, loss, backward and (on a group's last batch) the optimizer update, with the
    epoch's figures accumulated on the device: no call waits for the GPU.

    `check(epoch)` is where the host reads them (a synchronisation): it raises
    NonFiniteLossError, on every rank, when any rank has seen a non-finite loss since the epoch
    began, naming the first such iteration.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                 context: Context, precision: str, num_classes: int = NUM_CLASSES) -> None:
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.scheduler, self.scaler, self.context, self.precision = (scheduler, scaler, context,
                                                                     precision)
        device = context.device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.confusion = ConfusionMatrix(num_classes, device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        """the first pass with a non-finite loss (-1: none), and that loss"""
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.passes = self.optimizer_steps = self.samples = 0
        self.where: list[tuple[int, float]] = []
        """(optimizer step, lr) at each pass: for the message naming a bad iteration"""
        self._no_sync = getattr(model, "no_sync", None)

    def __call__(self, batch: Sequence[torch.Tensor], group: int = 1, last: bool = True) -> None:
        """One forward pass; `group`: batches in this optimizer step (their losses are
        averaged); `last`: this batch ends the group (gradients are all-reduced under DDP and
        the optimizer steps)."""
        images, targets = to_device(batch, self.context.device)
        self.where.append((self.optimizer_steps, self.scheduler.get_last_lr()[0]))
        syncing = (contextlib.nullcontext() if last or self._no_sync is None
                   else self._no_sync())
        with syncing:
            with autocast(self.context.device, self.precision):
                logits = self.model(images)
                loss = self.criterion(logits.float(), targets)
            self._watch(loss.detach())
            self.scaler.scale(loss if group == 1 else loss / group).backward()
        if last:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.optimizer_steps += 1
        self.loss_sum += loss.detach().double()
        self.confusion.update(targets, logits.detach().argmax(1))
        self.passes += 1
        self.samples += len(targets)

    def _watch(self, loss: torch.Tensor) -> None:
        new = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(new, self.passes, self.first_bad)
        self.bad_loss = torch.where(new, loss.float(), self.bad_loss)

    def check(self, epoch: int) -> None:
        """Read the finiteness flag (all ranks together): NonFiniteLossError if any rank saw
        a non-finite loss."""
        first = int(self.first_bad)
        if not any_rank(first >= 0, self.context):
            return
        if first < 0:
            what = f"on another rank than {self.context.rank}"
            first = len(self.where) - 1
        else:
            what = f"{float(self.bad_loss)} on rank {self.context.rank}"
        step, lr = self.where[first]
        raise NonFiniteLossError(
            f"non-finite training loss ({what}) at epoch {epoch + 1}, iteration {first + 1} "
            f"(optimizer step {step + 1}, lr {lr:.3g}); stopped without saving: the last "
            "checkpoint is the last good one. Lower train.lr, add warm-up "
            "(train.warmup_iters) or use train.precision bf16/fp32")


def _summed(matrix: ConfusionMatrix, context: Context) -> torch.Tensor:
    """The matrix summed over ranks (exact: int64 counts), on the CPU."""
    all_reduce_sum(matrix.counts, context)
    return matrix.compute().cpu()


def train_one_epoch(model: nn.Module, loader: Iterable, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler,
                    scaler: torch.amp.GradScaler, context: Context, precision: str,
                    epoch: int, num_classes: int = NUM_CLASSES, accumulate: int = 1,
                    max_steps: int | None = None, check_every: int = CHECK_EVERY) -> PassResult:
    """Train over `loader` once (or until `max_steps` optimizer steps).

    The host reads the figures every `check_every` forward passes (the running loss on the
    progress bar, the finiteness check on every rank) and at the end: a NaN stops all ranks
    there, before the epoch's checkpoint is written.

    Gradients of `accumulate` consecutive batches add up before each optimizer step (each
    batch's loss divided by the group's size; the last group of an epoch may be smaller), and
    under DDP they are all-reduced only on a group's last batch (`no_sync`). Batch norm sees
    each batch alone: its statistics are those of `batch_size`, not of the effective batch.
    """
    model.train()
    step = TrainStep(model, criterion, optimizer, scheduler, scaler, context, precision,
                     num_classes)
    total = len(loader)
    optimizer.zero_grad(set_to_none=True)
    started = time.perf_counter()
    bar = _progress(loader, context, f"train {epoch}", total)
    batches = _Timed(bar)
    for batch in batches:
        position = step.passes % accumulate
        group = min(accumulate, total - (step.passes - position))  # batches in this step
        last = position == group - 1
        step(batch, group, last)
        if step.passes % check_every == 0:
            step.check(epoch)
            if context.is_main:
                bar.set_postfix(loss=f"{float(step.loss_sum) / step.passes:.4f}", refresh=False)
        if last and max_steps is not None and step.optimizer_steps >= max_steps:
            break
    step.check(epoch)
    elapsed = time.perf_counter() - started
    totals = all_reduce_sum(torch.stack([step.loss_sum, torch.tensor(
        float(step.passes), dtype=torch.float64).to(context.device)]), context)
    confusion = _summed(step.confusion, context)
    return PassResult(float(totals[0] / totals[1]) if totals[1] else math.nan, confusion,
                      data_s=batches.waited, compute_s=elapsed - batches.waited,
                      samples=step.samples)


@torch.inference_mode()
def validate(model: nn.Module, loader: Iterable, criterion: SegmentationLoss,
             context: Context, precision: str, num_classes: int = NUM_CLASSES,
             desc: str = "val") -> PassResult:
    """Whole-image validation: the loss is the (class-weighted) mean over every labelled
    pixel of every rank's share, the confusion matrix their exact sum; nothing is read back
    before the pass ends."""
    model.eval()
    device = context.device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # weighted loss, weight
    confusion = ConfusionMatrix(num_classes, device)
    weight = criterion.weight
    for batch in _progress(loader, context, desc, len(loader)):
        images, targets = to_device(batch, device)
        with autocast(device, precision):
            logits = model(images).float()
        pixel_loss = nn.functional.cross_entropy(logits, targets, weight=weight,
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        valid = targets != IGNORE_INDEX
        if weight is None:
            pixel_weight = valid.sum()
        else:  # the weights of labelled pixels, without a data-dependent (syncing) index
            pixel_weight = torch.where(valid, weight[targets.clamp(0, num_classes - 1)],
                                       0.0).sum()
        sums += torch.stack([pixel_loss.double(), pixel_weight.double()])
        confusion.update(targets, logits.argmax(1))
    all_reduce_sum(sums, context)
    return PassResult(float(sums[0] / sums[1]) if sums[1] else math.nan,
                      _summed(confusion, context))
