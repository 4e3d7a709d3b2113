"""The check's data: synthetic Cityscapes roots (`fcn.synthetic`), their labelTrainIds masks
(the masks stage's `fcn.masks.generate`) and the decode stage's cache (`fcn.decode`),
made in the work folder; and the step that makes them."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import numpy as np

from fcn.cityscapes.layout import list_images
from fcn.gpucheck.runner import Check, Outcome
from fcn.images import read_rgb
from fcn.masks.generate import generate
from fcn.params import SynthesizeParams
from fcn.synthetic import dataset_items, synthesize, write_item
from fcn.train.data import SegmentationDataset
from fcn.decode import decode_stage

DATASETS = ("small", "large", "overfit")


def make_dataset(root: Path, generated: Path, params: SynthesizeParams, workers: int) -> int:
    """A synthetic Cityscapes root and its labelTrainIds masks, with `workers` processes; the
    number of images."""
    if workers <= 1:
        count = synthesize(root, params)
    else:  # the library's per-item writer, in parallel (items are independent)
        items = [(root, params, *item) for item in dataset_items(params)]
        with multiprocessing.Pool(workers) as pool:
            pool.starmap(write_item, items)
        count = len(items)
    generate(root, generated, ["labelTrainIds"], ["train", "val"], max(1, workers))
    return count


def data(check: Check, name: str) -> tuple[Path, Path, SynthesizeParams]:
    """(root, generated masks, parameters) of dataset `name`."""
    return check.artifacts[name]


def decoded(check: Check, name: str) -> Path:
    """The decode stage's cache of dataset `name` (made once): what the train stage reads."""
    key = f"decoded-{name}"
    if key not in check.artifacts:
        root, generated, _ = data(check, name)
        out = check.work / key
        decode_stage(root, generated, out, True, max(2, check.sizes.data_workers))
        check.artifacts[key] = out
    return check.artifacts[key]


def images(check: Check, name: str, split: str = "val") -> list[np.ndarray]:
    """The uint8 RGB images of a split of dataset `name` (writable arrays)."""
    root, _, _ = data(check, name)
    return [np.array(read_rgb(path)) for path in list_images(root, split)]


def step_data(check: Check) -> Outcome:
    """Synthesize the datasets the sizes ask for, their masks, and the decoded caches."""
    figures: dict[str, Any] = {}
    ok = True
    for name in DATASETS:
        params = getattr(check.sizes, name)
        root, generated = check.work / f"data-{name}", check.work / f"masks-{name}"
        start = time.perf_counter()
        count = make_dataset(root, generated, params, check.sizes.data_workers)
        check.artifacts[name] = (root, generated, params)
        train = len(SegmentationDataset(root, generated, "train"))
        val = len(SegmentationDataset(root, generated, "val"))
        expected = (len(params.train_cities) * params.train_per_city,
                    len(params.val_cities) * params.val_per_city)
        ok &= (train, val) == expected
        seconds = time.perf_counter() - start
        figures[name] = {"height": params.height, "width": params.width, "images": count,
                         "train_pairs": train, "val_pairs": val, "seconds": seconds,
                         "megapixels": count * params.height * params.width / 1e6}
        if name != "overfit":  # the train stage's default input
            start = time.perf_counter()
            decoded(check, name)
            figures[name]["decode_s"] = time.perf_counter() - start
    parts = [f"{n} {f['height']}x{f['width']}: {f['train_pairs']}+{f['val_pairs']} pairs"
             for n, f in figures.items()]
    figures["workers"] = check.sizes.data_workers
    return Outcome(ok, figures, "; ".join(parts),
                   "" if ok else "the datasets do not hold the image/mask pairs asked for")
