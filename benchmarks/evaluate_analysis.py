"""What the evaluate stage's analysis (Boundary IoU, trimap IoU, ECE, temperature sample,
per-image rows, worst-k gallery) adds to its time, at Cityscapes' 1024x2048, in one run.

    .venv/bin/python benchmarks/evaluate_analysis.py [--images 4] [--rounds 3]
        [--height 1024 --width 2048] [--out docs/measured/evaluate_analysis.json] [--smoke]

It makes a synthetic val split of `--images` images at the given size (and their generated
masks) in a temporary folder, and a seeded random FCN8s (params.yaml's model), then times the
evaluate stage's own `fcn.predict.evaluate.evaluate_model` over it on the CPU (fp32, whole
images, batch 1, the CPU's default threads): without the analysis (`analyse=False`: the
official scores only, what the stage computed before) and with it, alternating, best of
`--rounds` each. Decoding, prediction and the official scoring are the same in both; the
difference is the analysis. It also prints the peak of Python-allocated memory (tracemalloc)
of one analysed run over the images and over twice as many, to show the analysis streams.

`--smoke` is the CI run: two 64x128 images, one round; no JSON unless --out is given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import torch

from inference_modes import random_checkpoint  # benchmarks/, this script's folder
from fcn.checkpoint import load_model
from fcn.cityscapes.layout import ENCODINGS
from fcn.masks.generate import generate
from fcn.params import EvaluateParams, SynthesizeParams, load_params
from fcn.predict.evaluate import evaluate_model
from fcn.predict.predictor import Predictor
from fcn.synthetic import synthesize

DEFAULT_OUT = Path("docs/measured/evaluate_analysis.json")


def dataset(folder: Path, images: int, height: int, width: int) -> tuple[Path, Path]:
    """A synthetic Cityscapes root with `images` val images and their generated masks."""
    root, generated = folder / "cityscapes", folder / "generated"
    synthesize(root, SynthesizeParams(seed=0, height=height, width=width,
                                      train_cities=["aachen"], val_cities=["frankfurt"],
                                      test_cities=["berlin"], train_per_city=1,
                                      val_per_city=images, test_per_city=1))
    generate(root, generated, ENCODINGS, ["val"], workers=1)
    return root, generated


def time_once(predictor: Predictor, root: Path, generated: Path, params: EvaluateParams,
              analyse: bool) -> float:
    start = time.perf_counter()
    evaluate_model(predictor, root, generated, params, analyse=analyse)
    return time.perf_counter() - start


def peak_python_mb(predictor: Predictor, root: Path, generated: Path,
                   params: EvaluateParams) -> float:
    """Peak Python-allocated memory (numpy arrays included) of one analysed run, in MB."""
    tracemalloc.start()
    try:
        evaluate_model(predictor, root, generated, params, analyse=True)
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--out", type=Path,
                        help=f"where to write the JSON (default {DEFAULT_OUT}; none with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run that checks the script works (CI): two 64x128 images, "
                             "one round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.rounds, args.height, args.width = 2, 1, 64, 128
    out = args.out or (None if args.smoke else DEFAULT_OUT)
    params = load_params(args.params)
    evaluate = dataclasses.replace(params.evaluate, batch_size=1, device="cpu", precision="fp32",
                                   mode="whole", scales=[1.0], flip_tta=False, samples=0)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="evaluate_analysis_")))
        root, generated = dataset(tmp / "once", args.images, args.height, args.width)
        model = load_model(random_checkpoint(tmp / "random.pt", params.model, 0), None)
        predictor = Predictor(model, "cpu", "fp32", evaluate.channels_last)
        print(f"{args.images} val images of {args.height}x{args.width}, fp32 on the CPU "
              f"({torch.get_num_threads()} threads), best of {args.rounds} rounds")
        time_once(predictor, root, generated, evaluate, True)  # warm-up: allocator, caches
        before, after = float("inf"), float("inf")
        for _ in range(args.rounds):
            before = min(before, time_once(predictor, root, generated, evaluate, False))
            after = min(after, time_once(predictor, root, generated, evaluate, True))
        per = 1e3 / args.images
        print(f"official scores only  {before * per:9.1f} ms/image")
        print(f"with the analysis     {after * per:9.1f} ms/image  (+{(after - before) * per:.1f} "
              f"ms/image, {100 * (after / before - 1):+.1f}%)")
        small = peak_python_mb(predictor, root, generated, evaluate)
        root2, generated2 = dataset(tmp / "twice", 2 * args.images, args.height, args.width)
        large = peak_python_mb(predictor, root2, generated2, evaluate)
        print(f"peak Python memory of an analysed run: {small:.1f} MB over {args.images} "
              f"images, {large:.1f} MB over {2 * args.images}")
    report = {"command": "python benchmarks/evaluate_analysis.py", "images": args.images,
              "image_size": [args.height, args.width], "rounds": args.rounds,
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "ms_per_image_before": before * per, "ms_per_image_after": after * per,
              "added_percent": 100 * (after / before - 1),
              "peak_python_mb": {str(args.images): small, str(2 * args.images): large}}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
