"""Training-step throughput of FCN8s: the library's step against the step before its host
synchronisations were removed, eager against torch.compile, and against what this machine's
matmul can do, all in one run.

    .venv/bin/python benchmarks/train_throughput.py [--crop 128 128] [--batch 8]
        [--backbone vgg11_bn] [--iters 5] [--rounds 3] [--device auto] [--precision fp32]
        [--no-compile] [--smoke] [--out docs/measured/train_throughput.json]

Each variant times the training step on the same random uint8 crops with jitter parameters
(the loader's batches: conversion, photometric jitter, forward, cross-entropy, backward,
AdamW update, the loss sum and the confusion matrix), data loading left out:

- `before`: the step as it was, with its host reads per step (a finiteness check read back,
  a boolean-masked confusion matrix with a range check, one index tensor per jitter group);
- `after`: `fcn.train.loop.TrainStep`, which reads nothing back (the figures are read at
  `train.log_every`, outside this timing);
- `compiled`: `TrainStep` over `torch.compile(model)` (train.compile), after its compile.

On a CPU the host reads cost little (nothing runs ahead of the host); on a GPU they stall the
queue every step (the GPU check's sync_free step measures that). FLOPs of one step are counted
by `FlopCounterMode` over forward + backward; an fp32 matmul measured in the same run, between
the rounds, gives the utilisation. Each figure is the best of `--rounds` (the least disturbed
by other load); ratios compare the variants' best rounds. `--smoke` is a seconds-long run at a
tiny size that CI runs so the script cannot rot.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fcn.atomic import write_json
from fcn.backends import training_mode
from fcn.benchmark.capability import matmul_rate
from fcn.benchmark.plan import MATMUL_N
from fcn.cityscapes.labels import IGNORE_INDEX, NUM_CLASSES
from fcn.device import autocast, grad_scaler, resolve_device, synchronize, to_model_input
from fcn.model import FCN8s
from fcn.params import BACKBONES, DEVICES, PRECISIONS, TrainParams
from fcn.train import photometric
from fcn.train.distributed import Context
from fcn.train.loop import TrainStep, build_criterion, build_optimizer, build_scheduler


def batches(count: int, batch: int, height: int, width: int, seed: int = 0
            ) -> list[list[torch.Tensor]]:
    """Loader-like batches: uint8 crops (B, 3, H, W), uint8 trainIds with some ignore pixels,
    and photometric parameters (B, 8: a random order of the 4 operations, then factors)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8,
                               generator=gen)
        targets = torch.randint(0, NUM_CLASSES, (batch, height, width), dtype=torch.uint8,
                                generator=gen)
        targets[:, :2] = IGNORE_INDEX
        order = torch.stack([torch.randperm(4, generator=gen) for _ in range(batch)]).float()
        factors = torch.rand(batch, 4, generator=gen) * 0.4 + torch.tensor([0.8, 0.8, 0.8, -0.2])
        factors[:, 3] = factors[:, 3] * 0.25
        out.append([images, targets, torch.cat([order, factors], dim=1)])
    return out


def _old_jitter(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The jitter as it was: each group's rows made into a device tensor on its own."""
    order = params[:, :4].long().tolist()
    factors = params[:, 4:].to(images.device, images.dtype)
    out = images.clone()
    for position in range(4):
        for op_id, operation in enumerate(photometric.OPERATIONS):
            rows = [i for i, o in enumerate(order) if o[position] == op_id]
            if not rows:
                continue
            if len(rows) == len(order):
                out = operation(out, factors[:, op_id])
                continue
            index = torch.tensor(rows, device=images.device)
            out[index] = operation(out[index], factors[index, op_id])
    return out


def _old_confusion(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """The confusion matrix as it was: masked (a data-dependent shape) and range-checked."""
    target, prediction = target.reshape(-1).long(), prediction.reshape(-1).long()
    keep = target != IGNORE_INDEX
    target, prediction = target[keep], prediction[keep]
    if target.numel() and (int(target.max()) >= NUM_CLASSES or int(target.min()) < 0):
        raise ValueError("target out of range")
    return torch.bincount(NUM_CLASSES * target + prediction,
                          minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


class OldStep:
    """The training step before issue 19: the same work, read back every step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                 device: torch.device, precision: str) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler = (model, optimizer, scheduler,
                                                                   scaler)
        self.device, self.precision = device, precision
        self.criterion = build_criterion(None, device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=device)

    def __call__(self, batch: Sequence[torch.Tensor]) -> None:
        images, targets, jitter = batch
        images = to_model_input(images.to(self.device, non_blocking=True))
        images = _old_jitter(images, jitter)
        targets = targets.to(self.device, non_blocking=True).long()
        with autocast(self.device, self.precision):
            logits = self.model(images)
            loss = self.criterion(logits.float(), targets)
        if not bool(torch.isfinite(loss.detach())):  # read back every step
            raise RuntimeError("non-finite loss")
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.loss_sum += loss.detach().double()
        self.confusion += _old_confusion(targets, logits.detach().argmax(1))


def _variant(name: str, backbone: str, device: torch.device, precision: str
             ) -> tuple[Callable[[Sequence[torch.Tensor]], None], nn.Module]:
    """A fresh seeded model and the step of variant `name` over it."""
    torch.manual_seed(0)
    model = FCN8s(backbone).to(device).train()
    with torch.no_grad():  # score layers start at zero; give the backward its full work
        for layer in (model.score_pool3, model.score_pool4, model.score_pool5):
            layer.weight.normal_(0, 0.01)
    params = TrainParams(precision=precision)
    optimizer = build_optimizer(model, params)
    scheduler = build_scheduler(optimizer, params, 10**6)
    scaler = grad_scaler(device, precision)
    if name == "before":
        return OldStep(model, optimizer, scheduler, scaler, device, precision), model
    net = torch.compile(model) if name == "compiled" else model
    step = TrainStep(net, build_criterion(None, device), optimizer, scheduler, scaler,
                     Context(0, 1, device), precision)
    return step, model


def matmul_gflops(device: torch.device, size: int, reps: int = 5) -> float:
    """Best fp32 GFLOP/s of an n×n matmul (TF32 off inside fit's math mode: the reference)."""
    return matmul_rate(device, torch.float32, size, reps) / 1e9


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crop", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backbone", default="vgg11_bn", choices=BACKBONES)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the compiled variant (its compile takes ~30 s here)")
    parser.add_argument("--out", type=Path,
                        help="also write the figures as JSON (docs/measured/, which the docs' "
                             "generated tables read)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run that checks the script works (CI): 64x64, batch 2, "
                             "1 iteration, 1 round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.crop, args.batch, args.iters, args.rounds, args.warmup = [64, 64], 2, 1, 1, 1

    device = resolve_device(args.device)
    height, width = args.crop
    data = batches(args.warmup + args.iters, args.batch, height, width)
    names = ["before", "after"] + ([] if args.no_compile else ["compiled"])
    with training_mode(device, args.precision):
        steps = {name: _variant(name, args.backbone, device, args.precision) for name in names}
        _, model = steps["after"]
        with FlopCounterMode(display=False) as counter:
            logits = model(to_model_input(data[0][0].to(device)))
            F.cross_entropy(logits.float(), data[0][1].to(device).long(),
                            ignore_index=IGNORE_INDEX).backward()
        model.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
        first: dict[str, float] = {}
        for name, (step, _) in steps.items():
            start = time.perf_counter()
            for batch in data[: args.warmup]:
                step(batch)
            synchronize(device)
            first[name] = time.perf_counter() - start
        matmul_size = MATMUL_N[device.type]
        seconds: dict[str, list[float]] = {name: [] for name in names}
        matmul = []
        for _ in range(args.rounds):  # variants interleaved: each round sees the same load
            matmul.append(matmul_gflops(device, matmul_size))
            for name, (step, _) in steps.items():
                synchronize(device)
                start = time.perf_counter()
                for batch in data[args.warmup:]:
                    step(batch)
                synchronize(device)
                seconds[name].append((time.perf_counter() - start) / args.iters)
        matmul.append(matmul_gflops(device, matmul_size))

    peak = max(matmul)
    best = {name: min(values) for name, values in seconds.items()}
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} threads")
    print(f"device            {label}")
    print(f"model             FCN8s {args.backbone}, {args.precision}, batch {args.batch}, "
          f"crop {height}x{width}, jitter on")
    print(f"FLOPs per step    {flops / 1e9:.1f} GFLOP (forward + backward, "
          f"{flops / 1e9 / args.batch:.2f} per image)")
    print(f"fp32 matmul       {peak:.1f} GFLOP/s ({matmul_size}x{matmul_size}, best of "
          f"{len(matmul)}: {', '.join(f'{m:.0f}' for m in matmul)})")
    for name in names:
        print(f"{name:17} {best[name] * 1e3:8.1f} ms/step (best of {args.rounds} rounds of "
              f"{args.iters}; median {statistics.median(seconds[name]) * 1e3:.1f}), "
              f"{args.batch / best[name]:.2f} images/s, {flops / best[name] / 1e9:.1f} GFLOP/s "
              f"= {flops / best[name] / 1e9 / peak:.0%} of matmul; warm-up "
              f"{first[name]:.1f} s")
    print(f"after / before    {best['before'] / best['after']:.3f}x the throughput "
          "(host reads removed from the step)")
    if "compiled" in best:
        print(f"compiled / eager  {best['after'] / best['compiled']:.3f}x the throughput "
              f"(compile and warm-up {first['compiled']:.1f} s)")
    if args.out is not None:
        write_json(args.out, {
            "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
            "device": label, "cpu": platform.processor() or platform.machine(),
            "backbone": args.backbone, "precision": args.precision, "batch": args.batch,
            "crop": [height, width], "iters": args.iters, "rounds": args.rounds,
            "flops_per_step": flops, "matmul_gflops": peak,
            "variants": {name: {"ms_per_step": best[name] * 1e3,
                                "ms_per_step_median": statistics.median(seconds[name]) * 1e3,
                                "images_per_s": args.batch / best[name],
                                "warmup_s": first[name]} for name in names},
            "after_over_before": best["before"] / best["after"],
            "compiled_over_eager": (best["after"] / best["compiled"] if "compiled" in best
                                    else None)})


if __name__ == "__main__":
    main()
