"""Training-step throughput of FCN8s, against what this machine's matmul can do.

    .venv/bin/python benchmarks/train_throughput.py [--crop 128 128] [--batch 8]
        [--backbone vgg11_bn] [--iters 5] [--rounds 2] [--device auto] [--precision fp32]

Times the step the train stage runs (forward, cross-entropy, backward, AdamW update) on
random images of the crop size, so data loading is left out. FLOPs of one step are counted
by `torch.utils.flop_counter.FlopCounterMode` over forward + backward (matmuls and
convolutions; BN, ReLU, pooling and the optimizer are not in the count), giving the achieved
GFLOP/s. In the same run, interleaved with the training rounds, an fp32 square matmul
measures the machine's attainable GFLOP/s; achieved / matmul is the utilisation. Each is
measured `--rounds` times and the best round counts (the least disturbed by other load).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fcn.benchmark.capability import matmul_rate, set_tf32
from fcn.benchmark.plan import MATMUL_N
from fcn.device import autocast, resolve_device, synchronize
from fcn.model import FCN8s
from fcn.params import BACKBONES, DEVICES, PRECISIONS


def matmul_gflops(device: torch.device, size: int, reps: int = 5) -> float:
    """Best fp32 GFLOP/s of an n×n matmul (TF32 off: the fp32 reference)."""
    if device.type == "cuda":
        set_tf32(False)
    return matmul_rate(device, torch.float32, size, reps) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crop", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backbone", default="vgg11_bn", choices=BACKBONES)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    args = parser.parse_args()

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = FCN8s(args.backbone).to(device).train()
    with torch.no_grad():  # score layers start at zero; give the backward its full work
        for layer in (model.score_pool3, model.score_pool4, model.score_pool5):
            layer.weight.normal_(0, 0.01)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda"
                                  and args.precision == "fp16")
    height, width = args.crop
    images = torch.rand(args.batch, 3, height, width, device=device)
    targets = torch.randint(0, 19, (args.batch, height, width), device=device)

    def step() -> None:
        with autocast(device, args.precision):
            loss = F.cross_entropy(model(images).float(), targets, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    synchronize(device)

    matmul_size = MATMUL_N[device.type]
    step_seconds, matmul = [], []
    for _ in range(args.rounds):
        matmul.append(matmul_gflops(device, matmul_size))
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        synchronize(device)
        step_seconds.append((time.perf_counter() - start) / args.iters)
    matmul.append(matmul_gflops(device, matmul_size))

    seconds = min(step_seconds)
    achieved = flops / seconds / 1e9
    peak = max(matmul)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} threads")
    print(f"device            {name}")
    print(f"model             FCN8s {args.backbone}, {args.precision}, batch {args.batch}, "
          f"crop {height}x{width}")
    print(f"step              {seconds * 1e3:.1f} ms (best of {args.rounds} rounds of "
          f"{args.iters}; median {statistics.median(step_seconds) * 1e3:.1f} ms)")
    print(f"throughput        {args.batch / seconds:.2f} images/s")
    print(f"FLOPs per step    {flops / 1e9:.1f} GFLOP (forward + backward, "
          f"{flops / 1e9 / args.batch:.2f} per image)")
    print(f"achieved          {achieved:.1f} GFLOP/s")
    print(f"fp32 matmul       {peak:.1f} GFLOP/s ({matmul_size}x{matmul_size}, best of "
          f"{len(matmul)}: {', '.join(f'{m:.0f}' for m in matmul)})")
    print(f"utilisation       {achieved / peak:.1%} of measured matmul")


if __name__ == "__main__":
    main()
