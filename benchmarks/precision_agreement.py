"""How often bf16/fp16 (and TF32 on CUDA) change FCN8s's argmax prediction versus fp32.

    .venv/bin/python benchmarks/precision_agreement.py [--checkpoint models/best.pt]
        [--height 256] [--width 512] [--images 2] [--device auto] [--smoke]

The benchmark stage reports agreement only for the configurations the device can time; on a
CPU without native bf16/fp16 those are skipped. This script answers the accuracy half of the
fast-path question anyway: it runs the same autocast on PyTorch's reference kernels (slow,
same rounding to bf16/fp16 between layers), on the benchmark's synthetic street scenes, for
the trained-like model and, given --checkpoint, a trained one. It prints the pixel agreement
with fp32 and the logit margin (top-1 minus top-2) quantiles that explain it: pixels whose
margin is below the low precision's rounding error are the ones that flip.

`--smoke` is a seconds-long run at a tiny size (one 64x128 image) that CI runs so the script
cannot rot; without --checkpoint it saves a random FCN8s as a checkpoint in a temporary folder
and loads it back as the --checkpoint path does, so that path runs too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fcn.benchmark.capability import precision_support
from fcn.benchmark.inputs import benchmark_images, predict_classes, to_input, trained_like_model
from fcn.benchmark.run import MIN_AGREEMENT
from fcn.checkpoint import load_model
from fcn.device import resolve_device
from fcn.params import ModelParams
from inference_modes import random_checkpoint  # benchmarks/, this script's folder


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="also test this training checkpoint")
    parser.add_argument("--backbone", default="vgg11_bn")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run that checks the script works (CI): one 64x128 image; "
                             "a random checkpoint when --checkpoint is not given")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.height, args.width = 1, 64, 128

    device = resolve_device(args.device)
    params = ModelParams(backbone=args.backbone)
    images = benchmark_images(args.images, args.height, args.width, args.seed)
    models = {"trained_like": trained_like_model(params, images[0], args.seed)}
    if args.checkpoint:
        models[args.checkpoint] = load_model(args.checkpoint, params)
    elif args.smoke:
        with tempfile.TemporaryDirectory(prefix="precision_agreement_") as tmp:
            path = random_checkpoint(Path(tmp) / "random.pt", params, args.seed)
            models["random checkpoint"] = load_model(path, params)
    precisions = ["tf32", "bf16", "fp16"] if device.type == "cuda" else ["bf16", "fp16"]
    print(f"{args.images} synthetic images {args.height}x{args.width} on {device}; "
          f"fast path needs agreement >= {100 * MIN_AGREEMENT:.1f}%")
    for name, model in models.items():
        model = model.eval().to(device)
        with torch.inference_mode():
            logits = model(to_input(images, device, False)).float()
        reference = logits.argmax(1)
        top2 = logits.topk(2, dim=1).values
        margin = (top2[:, 0] - top2[:, 1]).flatten().cpu()
        sample = margin[torch.randperm(margin.numel())[:1_000_000]]
        q = torch.quantile(sample, torch.tensor([0.001, 0.01, 0.5])).tolist()
        print(f"\n{name}: {reference.unique().numel()} classes predicted; logit margin "
              f"quantiles 0.1% {q[0]:.4f}, 1% {q[1]:.4f}, median {q[2]:.3f}")
        for precision in precisions:
            start = time.perf_counter()
            predicted = predict_classes(model, images, device, precision, True)
            agreement = (predicted == reference).double().mean().item()
            native = precision_support(device, precision)
            kernels = "native kernels" if native is None else "reference kernels (emulated)"
            verdict = "keeps predictions" if agreement >= MIN_AGREEMENT else "changes predictions"
            print(f"  {precision}: agreement {100 * agreement:.3f}% -> {verdict} "
                  f"[{kernels}, {time.perf_counter() - start:.1f} s]")


if __name__ == "__main__":
    main()
