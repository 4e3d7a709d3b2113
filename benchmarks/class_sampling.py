"""How often each class appears in training crops with and without rare-class sampling, and
what it costs the loader per core, in one run.

    .venv/bin/python benchmarks/class_sampling.py [--samples 2000] [--rounds 3]
        [--out docs/measured/class_sampling.json] [--smoke]

It synthesizes the default dataset (params.yaml's `synthesize` section: the default pipeline's
data) and its trainId masks in a temporary folder, then draws `--samples` training crops
(params.yaml's `train.crop`, `scale`, `flip`, `jitter`; sample seeds as training makes them)
from the train split through the train loader's own dataset (`SegmentationDataset`, PNGs,
one process: samples/s per core) under four settings: today's random crops, class-uniform
crops (`train.class_uniform` 0.5), `train.cat_max_ratio` 0.75 (10 tries, mmsegmentation's), and
both; and today's random crops as the loader seeded them before this change (the same crops).
For each it prints the share of crops holding each class and the samples/s, best of
`--rounds` interleaved rounds, as a ratio to the loader before this change.

`--smoke` (CI): the tiny test dataset's size, 40 samples, one round; no JSON unless --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fcn.atomic import write_json
from fcn.cityscapes.labels import CLASS_NAMES
from fcn.masks.generate import generate
from fcn.params import SynthesizeParams, load_params
from fcn.synthetic import synthesize
from fcn.train.augment import Recipe
from fcn.train.data import SegmentationDataset, sample_seed
from fcn.train.sampling import crop_frequency

DEFAULT_OUT = Path("docs/measured/class_sampling.json")
SMOKE_DATA = SynthesizeParams(seed=7, height=64, width=128, train_cities=["aachen"],
                              val_cities=["frankfurt"], test_cities=["berlin"],
                              train_per_city=4, val_per_city=1, test_per_city=1,
                              train_extra_cities=[])


class TodaysSeeding(SegmentationDataset):
    """The loader's dataset as it seeded each sample before rare-class sampling came: with
    `torch.manual_seed`, which also queues a lazy seed (and records a stack trace) for every
    accelerator backend; now only the CPU generator is seeded (the same draws)."""

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._sample(index, self.recipe)


def crops(dataset: SegmentationDataset, samples: int) -> tuple[list[torch.Tensor], float]:
    """`samples` crops as epochs of training draw them (seed 0, epoch e, index i), and the
    seconds they took."""
    keys = [(i % len(dataset), sample_seed(0, i // len(dataset), i % len(dataset)))
            for i in range(samples)]
    start = time.perf_counter()
    masks = [dataset[key][1] for key in keys]
    return masks, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"),
                        help="crop size (default: half the image's height and width, the "
                             "Cityscapes recipe's 512x1024 of 1024x2048)")
    parser.add_argument("--out", type=Path,
                        help=f"where to write the JSON (default {DEFAULT_OUT}; none with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run for CI")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    data, t = params.synthesize, params.train
    if args.smoke:
        data, args.samples, args.rounds, args.crop = SMOKE_DATA, 40, 1, [48, 48]
    crop = args.crop or [data.height // 2, data.width // 2]
    out = args.out or (None if args.smoke else DEFAULT_OUT)
    torch.set_num_threads(1)  # per core
    base = Recipe.of(crop, t.scale, t.flip, t.jitter)
    settings = {"random crops": base,
                "class_uniform 0.5": dataclasses.replace(base, class_uniform=0.5),
                "cat_max_ratio 0.75": dataclasses.replace(base, cat_max_ratio=0.75),
                "both": dataclasses.replace(base, class_uniform=0.5, cat_max_ratio=0.75)}
    with tempfile.TemporaryDirectory(prefix="class_sampling_") as tmp:
        root, generated = Path(tmp) / "cityscapes", Path(tmp) / "generated"
        synthesize(root, data)
        generate(root, generated, ["labelTrainIds"], ["train"], workers=1)
        datasets = {name: SegmentationDataset(root, generated, "train", recipe)
                    for name, recipe in settings.items()}
        datasets = {"before this change": TodaysSeeding(root, generated, "train", base),
                    **datasets}
        print(f"{len(datasets[next(iter(datasets))])} train images of {data.height}x"
              f"{data.width}, {args.samples} crops of {crop[0]}x{crop[1]} per setting, one "
              f"thread, best of {args.rounds} rounds")
        best = {name: float("inf") for name in datasets}
        shares: dict[str, np.ndarray] = {}
        for _ in range(args.rounds):
            for name, dataset in datasets.items():
                masks, seconds = crops(dataset, args.samples)
                best[name] = min(best[name], seconds)
                shares[name] = crop_frequency(masks)
    names = list(settings)
    print("share of crops holding each class (random crops: the same crops before and after "
          "this change):")
    print(f"  {'class':14s}" + "".join(f"{n:>22s}" for n in names))
    for cls, class_name in enumerate(CLASS_NAMES):
        print(f"  {class_name:14s}" + "".join(f"{shares[n][cls]:22.3f}" for n in names))
    today = args.samples / best["before this change"]
    rows = []
    for name in ["before this change", *names]:
        rate = args.samples / best[name]
        print(f"{name:22s} {rate:8.1f} samples/s per core ({rate / today:.2f}x the loader "
              "before this change)")
        rows.append({"setting": name, "samples_per_s_per_core": rate,
                     "ratio_to_today": rate / today,
                     "class_share": dict(zip(CLASS_NAMES, shares[name].tolist()))
                     if name in shares else None})
    if out is not None:
        report = {"command": "python benchmarks/class_sampling.py", "samples": args.samples,
                  "rounds": args.rounds, "image_size": [data.height, data.width],
                  "crop": list(crop), "rows": rows}
        write_json(out, report)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
