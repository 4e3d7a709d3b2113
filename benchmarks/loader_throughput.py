"""Train loader throughput per CPU core at the Cityscapes recipe: the old path against the new,
in the same run, with the per-step breakdown and what a GPU needs.

    .venv/bin/python benchmarks/loader_throughput.py [--images 4] [--samples 48] [--rounds 3]
        [--crop 512 1024] [--scale 0.5 2.0] [--jitter 0.5] [--batch 8] [--data DIR]
        [--image 1024 2048] [--out docs/measured/loader_throughput.json] [--json] [--smoke]

It synthesizes `--images` 1024×2048 train images with their masks (or reuses `--data`, a
folder this script made before), builds the decoded cache from them (`fcn.decode`),
and times, on one thread (`torch.set_num_threads(1)`: per core), the same seeded samples
through:

- **old**: decode both PNGs (`fcn.train.pairs.load_pair`), then torchvision v2 on the whole
  image: rescale, crop (pad), flip, ColorJitter on uint8, to float
  (`fcn.train.augment.reference_transform`, the pipeline the loader had before);
- **new**: the train loader as it is (`fcn.train.data.SegmentationDataset` on the decoded
  cache): read only the crop's source rows from the memory-mapped arrays, resize that region,
  pad, flip, all in uint8; the jitter parameters are drawn here and applied on the device;
- **new, PNG**: the same without the cache (decode.enabled false): decode, then crop.

Each figure is samples/s on one core including collation into batches of `--batch`; rounds
interleave the paths and the best round counts (the least disturbed by other load). The
breakdown times each step alone over the same samples. The photometric jitter of the new path
runs batched on the training device; its cost on this CPU is printed for CPU training, and
is not loader work. The decoders torchvision.io, PIL (and pyspng / OpenCV where installed) are
timed on one image. Last, the GPU demand: FLOPs of one training sample (3 × the forward of a
crop) against an H100's dense bf16 rate tell how many samples/s a GPU takes, and so how many
cores each path needs to keep it busy. `--json` ends the output with one line: a JSON object
of the headline figures (HEADLINE). `--smoke` is a seconds-long run at a tiny size (2 images of
64x128, crop 32x64, 4 samples, 1 round) that CI runs so the script cannot rot.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import tv_tensors

from fcn.benchmark.flops import analytic_flops
from fcn.device import to_model_input
from fcn.masks.generate import generate
from fcn.model import FCN8s
from fcn.params import SynthesizeParams
from fcn.synthetic import synthesize
from fcn.train import photometric
from fcn.train.augment import Recipe, crop_pair, draw, reference_transform
from fcn.train.data import SegmentationDataset, read_region, sample_seed
from fcn.decode import decode_stage
from fcn.train.pairs import load_pair

warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)

H100_BF16_TFLOPS = 990.0  # dense bf16 tensor-core peak (NVIDIA H100 SXM datasheet)
UTILISATION = (0.4, 0.8)  # the range a well-fed training step reaches
HEADLINE = ("samples_per_s_per_core", "old_samples_per_s_per_core", "ratio")
"""The keys of the last line `--json` prints."""


def make_data(folder: Path, images: int, height: int = 1024, width: int = 2048
              ) -> tuple[Path, Path, Path]:
    """(root, generated, decoded) of `images` synthetic height×width train images (val: 1);
    a folder that already holds them is reused as it is."""
    root, generated, decoded = folder / "cityscapes", folder / "generated", folder / "decoded"
    if not (decoded / "index.json").exists():
        synthesize(root, SynthesizeParams(seed=3, height=height, width=width,
                                          train_cities=["aachen"], val_cities=["frankfurt"],
                                          test_cities=["berlin"], train_per_city=images,
                                          val_per_city=1, test_per_city=1,
                                          train_extra_cities=[]))
        generate(root, generated, ["labelTrainIds"], ["train", "val"], workers=1)
        decode_stage(root, generated, decoded, True, workers=1)
    return root, generated, decoded


def old_sample(dataset: SegmentationDataset, transform: Callable, key: tuple[int, int]):
    """What the loader did before: decode both PNGs, then the v2 pipeline under the seed."""
    image, mask = load_pair(dataset.pairs[key[0]])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key[1])
        out_image, out_mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask[None]))
    return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor)[0]


def per_sample_s(make: Callable[[tuple[int, int]], Any], keys: list[tuple[int, int]],
                 batch: int) -> float:
    """Seconds per sample of making every key's sample and collating them in batches."""
    start = time.perf_counter()
    for first in range(0, len(keys), batch):
        default_collate([make(k) for k in keys[first:first + batch]])
    return (time.perf_counter() - start) / len(keys)


def breakdown(pngs: SegmentationDataset, cached: SegmentationDataset, recipe: Recipe,
              keys: list[tuple[int, int]], batch: int) -> dict[str, dict[str, float]]:
    """Milliseconds per sample of each step of each path, timed alone (the old path's on the
    first key's image, the new path's on the first key's draw)."""
    from torchvision.transforms import v2

    steps: dict[str, dict[str, float]] = {"old": {}, "new": {}}

    def ms(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        for _ in keys:
            fn()
        return (time.perf_counter() - start) / len(keys) * 1e3

    pairs = [load_pair(pngs.pairs[i]) for i, _ in keys[:2]]
    steps["old"]["read/decode"] = ms(lambda: load_pair(pngs.pairs[keys[0][0]]))
    geometry = reference_transform(Recipe(recipe.crop, recipe.scale, recipe.flip, 0.0))
    image, mask = tv_tensors.Image(pairs[0][0]), tv_tensors.Mask(pairs[0][1][None])
    steps["old"]["geometry"] = ms(lambda: geometry(image, mask))  # includes to-float
    cropped = geometry(image, mask)[0]
    uint8 = (cropped * 255).round().to(torch.uint8)
    j = recipe.jitter
    jitter = v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 4))
    steps["old"]["photometric"] = ms(lambda: jitter(tv_tensors.Image(uint8)))
    old_batch = [(cropped, torch.zeros(recipe.crop, dtype=torch.int64))] * batch
    steps["old"]["collate"] = ms(lambda: default_collate(old_batch)) / batch

    index, seed = keys[0]
    size = cached.pairs[index].size
    memmaps = cached.memmaps(index)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        d = draw(recipe, *size)
    timed = {"read": 0.0}

    def region(array: np.ndarray) -> Callable[..., torch.Tensor]:
        def read(*box: int) -> torch.Tensor:
            start = time.perf_counter()
            out = read_region(array, *box)
            timed["read"] += time.perf_counter() - start
            return out
        return read

    total = ms(lambda: crop_pair(region(memmaps[0]), region(memmaps[1]), size, d, recipe.crop))
    steps["new"]["read/decode"] = timed["read"] / len(keys) * 1e3
    steps["new"]["geometry"] = total - steps["new"]["read/decode"]
    sample = cached[keys[0]]
    new_batch = [sample] * batch
    steps["new"]["collate"] = ms(lambda: default_collate(new_batch)) / batch
    images, _, params = default_collate(new_batch)
    steps["new"]["photometric (on the device; this CPU)"] = ms(
        lambda: photometric.jitter(to_model_input(images), params)) / batch
    return steps


def decoders(path: Path, rounds: int) -> dict[str, float]:
    """Milliseconds to decode one RGB PNG into a uint8 array, per available decoder."""
    from torchvision.io import ImageReadMode, decode_png, read_file

    data = path.read_bytes()
    candidates: dict[str, Callable[[], Any]] = {
        "torchvision.io": lambda: decode_png(read_file(str(path)), mode=ImageReadMode.RGB),
        "PIL": lambda: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
    }
    try:
        import pyspng
        candidates["pyspng"] = lambda: pyspng.load(data)
    except ImportError:
        pass
    try:
        import cv2
        cv2.setNumThreads(1)
        candidates["opencv"] = lambda: cv2.imdecode(np.frombuffer(data, np.uint8),
                                                    cv2.IMREAD_COLOR)
    except ImportError:
        pass
    out = {}
    for name, decode in candidates.items():
        decode()
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            decode()
            best = min(best, time.perf_counter() - start)
        out[name] = best * 1e3
    return out


def verify_cost(decoded: Path, pairs: list, rounds: int) -> dict[str, float]:
    """What a training run's check of the decoded cache costs (`fcn.decode.verify`,
    one thread; the source PNGs are hashed too): seconds per GB of arrays, best of `rounds`."""
    from fcn.decode import verify

    gb = sum(p.stat().st_size for p in (decoded / "train").rglob("*.npy")) / 1e9
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        verify(decoded, "train", pairs, threads=1)
        best = min(best, time.perf_counter() - start)
    return {"gb": gb, "seconds": best, "seconds_per_gb": best / gb}


def gpu_demand(crop: tuple[int, int], rates: dict[str, float]) -> dict[str, Any]:
    """Samples/s an H100 takes at the recipe's crop, and cores each path needs for it."""
    forward = analytic_flops(FCN8s("vgg11_bn"), *crop).flops
    per_sample = 3 * forward  # forward + backward (about twice the forward)
    takes = [H100_BF16_TFLOPS * 1e12 * u / per_sample for u in UTILISATION]
    return {"sample_gflop": per_sample / 1e9, "h100_samples_per_s": takes,
            "cores_needed": {name: [t / rate for t in takes] for name, rate in rates.items()}}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--crop", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    parser.add_argument("--scale", type=float, nargs=2, default=[0.5, 2.0])
    parser.add_argument("--jitter", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"),
                        help="the synthesized images' size")
    parser.add_argument("--data", type=Path, help="a folder to make the images in, or reuse "
                        "(made at --image; reused as it is)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the "
                        "headline figures")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run that checks the script works (CI): 2 images of "
                             "64x128, crop 32x64, 4 samples, batch 2, 1 round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.samples, args.rounds, args.batch = 2, 4, 1, 2
        args.image, args.crop = [64, 128], [32, 64]
    height, width = args.image
    torch.set_num_threads(1)
    recipe = Recipe.of(args.crop, args.scale, True, args.jitter)

    with tempfile.TemporaryDirectory() as tmp:
        root, generated, decoded = make_data(args.data or Path(tmp), args.images, height,
                                             width)
        pngs = SegmentationDataset(root, generated, "train", recipe)
        cached = SegmentationDataset(root, generated, "train", recipe, decoded)
        keys = [(i % len(cached), sample_seed(0, 0, i)) for i in range(args.samples)]
        transform = reference_transform(recipe)
        paths: dict[str, Callable[[tuple[int, int]], Any]] = {
            "old": lambda k: old_sample(pngs, transform, k),
            "new": lambda k: cached[k],
            "new_png": lambda k: pngs[k],
        }
        best = {name: float("inf") for name in paths}
        for _ in range(args.rounds):
            for name, make in paths.items():
                best[name] = min(best[name], per_sample_s(make, keys, args.batch))
        rates = {name: 1 / s for name, s in best.items()}
        steps = breakdown(pngs, cached, recipe, keys, args.batch)
        decode_ms = decoders(pngs.pairs[0].image, args.rounds)
        verify = verify_cost(decoded, pngs.pairs, args.rounds)

    demand = gpu_demand(recipe.crop, {"new": rates["new"], "old": rates["old"]})
    result = {
        "samples_per_s_per_core": rates["new"], "old_samples_per_s_per_core": rates["old"],
        "ratio": rates["new"] / rates["old"], "new_png_samples_per_s_per_core": rates["new_png"],
        "breakdown_ms_per_sample": steps, "decode_ms": decode_ms, "gpu": demand,
        "cache_verify": verify,
        "recipe": {"image": [height, width], "crop": list(recipe.crop),
                   "scale": list(recipe.scale), "flip": True, "jitter": recipe.jitter,
                   "batch": args.batch},
        "samples": args.samples, "rounds": args.rounds, "threads": 1,
        "machine": platform.processor() or platform.machine(),
        "command": "python benchmarks/loader_throughput.py",
    }

    print(f"Train loader at the recipe ({height}x{width} images, "
          f"crop {recipe.crop[0]}x{recipe.crop[1]}, "
          f"scale {recipe.scale[0]}-{recipe.scale[1]}, flip, jitter {recipe.jitter}), one core, "
          f"{args.samples} samples, batch {args.batch}, best of {args.rounds}:")
    print(f"  old (PNG decode, whole-image resize, uint8 jitter): {rates['old']:7.1f} samples/s")
    print(f"  new (decoded cache, crop-only resize, uint8 out)  : {rates['new']:7.1f} samples/s "
          f"({result['ratio']:.1f}x)")
    print(f"  new without the cache (PNG decode, crop-only)     : {rates['new_png']:7.1f} "
          "samples/s")
    print("Per step, ms per sample:")
    for path, parts in steps.items():
        print(f"  {path}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    print(f"PNG decoders, one {height}x{width} RGB image: " +
          ", ".join(f"{k} {v:.1f} ms" for k, v in decode_ms.items()))
    print(f"Checking the decoded cache before training (SHA-256 of every array, one thread): "
          f"{verify['seconds_per_gb']:.2f} s per GB ({verify['gb']:.3f} GB in "
          f"{verify['seconds']:.3f} s)")
    low, high = demand["h100_samples_per_s"]
    print(f"GPU demand: one {recipe.crop[0]}x{recipe.crop[1]} training sample is "
          f"{demand['sample_gflop']:.0f} GFLOP (3 x forward); an H100 at "
          f"{UTILISATION[0]:.0%}-{UTILISATION[1]:.0%} of {H100_BF16_TFLOPS:.0f} bf16 TFLOP/s "
          f"takes {low:.0f}-{high:.0f} samples/s, i.e. "
          + "; ".join(f"{a:.1f}-{b:.1f} cores with the {name} path"
                      for name, (a, b) in demand["cores_needed"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps({key: result[key] for key in HEADLINE}), flush=True)


if __name__ == "__main__":
    main()
