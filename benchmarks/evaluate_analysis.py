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
difference is the analysis: what it adds per image as the images stream past (run with
`evaluate.temperature` off) and, once per run, the temperature fit (the difference with it on),
so that the share at Cityscapes' 500 val images follows from the two. It also prints the peak
of Python-allocated memory (tracemalloc) of one analysed run over `--memory-images` images and
over twice as many: equal, because the analysis streams (from that many images on, which fill
the read-ahead of decoded images first).

`--smoke` is the CI run: two 64x128 images, one round; no JSON unless --out is given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import torch

from inference_modes import random_checkpoint  # benchmarks/, this script's folder
from fcn.atomic import write_json
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
                                      val_per_city=images, test_per_city=1,
                                      train_extra_cities=[]))
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
    parser.add_argument("--memory-images", type=int, default=8,
                        help="the memory check's smaller split (the larger is twice it); at "
                             "least the read-ahead's depth (4 images), which fills first")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--out", type=Path,
                        help=f"where to write the JSON (default {DEFAULT_OUT}; none with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run that checks the script works (CI): two 64x128 images, "
                             "one round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.rounds, args.height, args.width, args.memory_images = 2, 1, 64, 128, 2
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
        no_fit = dataclasses.replace(evaluate, temperature=False)
        time_once(predictor, root, generated, evaluate, True)  # warm-up: allocator, caches
        before = streaming = after = float("inf")
        for _ in range(args.rounds):
            before = min(before, time_once(predictor, root, generated, evaluate, False))
            streaming = min(streaming, time_once(predictor, root, generated, no_fit, True))
            after = min(after, time_once(predictor, root, generated, evaluate, True))
        per = 1e3 / args.images
        added = (streaming - before) * per  # ms per image
        fit = max(0.0, after - streaming)  # s, once per run
        at_500 = 100 * ((before * per + added) * 500 + 1e3 * fit) / (before * per * 500) - 100
        print(f"official scores only  {before * per:9.1f} ms/image")
        print(f"with the analysis     {streaming * per:9.1f} ms/image  (+{added:.1f} ms/image, "
              f"{100 * (streaming / before - 1):+.1f}%), temperature fit not included")
        print(f"temperature fit       {fit:9.2f} s once ({evaluate.temperature_pixels} pixels): "
              f"{100 * (after / before - 1):+.1f}% over these {args.images} images, "
              f"{at_500:+.1f}% over Cityscapes' 500 val images")
        m = args.memory_images
        peaks = {}
        for count in (m, 2 * m):
            folder = dataset(tmp / f"memory_{count}", count, args.height, args.width)
            peaks[count] = peak_python_mb(predictor, *folder, evaluate)
        print(f"peak Python memory of an analysed run: {peaks[m]:.1f} MB over {m} images, "
              f"{peaks[2 * m]:.1f} MB over {2 * m}")
    report = {"command": "python benchmarks/evaluate_analysis.py", "images": args.images,
              "image_size": [args.height, args.width], "rounds": args.rounds,
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "ms_per_image_before": before * per, "ms_per_image_streaming": streaming * per,
              "streaming_added_percent": 100 * (streaming / before - 1),
              "temperature_fit_s": fit, "temperature_pixels": evaluate.temperature_pixels,
              "added_percent_here": 100 * (after / before - 1),
              "added_percent_at_500_images": at_500,
              "peak_python_mb": {str(k): v for k, v in peaks.items()}}
    if out is not None:
        write_json(out, report)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
