"""What each inference option changes: val mIoU and time per image, on the trained model.

    .venv/bin/python benchmarks/inference_modes.py [--checkpoint models/best.pt]
        [--out docs/measured/inference_modes.json] [--smoke]

Scores every val image of `data.root` (params.yaml) with the evaluate stage's own code
(`fcn.predict.evaluate.evaluate_model`, official class IoU) under each option: whole images;
flip; multi-scale (mmseg's Cityscapes ratios) with and without flip; slide mode with windows
of half the image's height and width (stride two thirds of the window, mmseg's proportion),
alone and with flip. Time per image is wall time over the val split (decode included, one
process, the CPU's default threads), best of `--rounds`. The JSON it writes feeds the table in
docs/performance.md (docs/generate.py).

`--smoke` is a seconds-long run that CI runs so the script cannot rot: the same options and
code on a tiny synthetic dataset made in a temporary folder (two 64x128 val images and their
generated masks), one round, with a random FCN8s saved as a checkpoint there unless
--checkpoint is given; it writes no JSON unless --out is given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fcn.checkpoint import FORMAT, best_path, load_model, save
from fcn.cityscapes.labels import NUM_CLASSES
from fcn.cityscapes.layout import ENCODINGS, list_images
from fcn.images import read_size
from fcn.masks.generate import generate
from fcn.model import FCN, score_layers
from fcn.params import ModelParams, Params, SynthesizeParams, load_params
from fcn.predict.evaluate import evaluate_model
from fcn.predict.predictor import Predictor
from fcn.synthetic import synthesize

MMSEG_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
DEFAULT_OUT = Path("docs/measured/inference_modes.json")
SMOKE_DATA = SynthesizeParams(seed=0, height=64, width=128, train_cities=["aachen"],
                              val_cities=["frankfurt"], test_cities=["berlin"],
                              train_per_city=1, val_per_city=2, test_per_city=1,
                              train_extra_cities=[])


def random_checkpoint(path: Path, params: ModelParams, seed: int) -> Path:
    """A checkpoint of a seeded random FCN of `params`' arch (random score layers too, so it
    predicts more than one class) with the keys best.pt has, written where `load_model` reads
    it."""
    torch.manual_seed(seed)
    model = FCN.from_params(params, NUM_CLASSES)
    with torch.no_grad():
        for layer in score_layers(model):
            layer.weight.normal_(0, 0.01)
    save(path, {"format": FORMAT, "model": model.state_dict(),
                "model_params": dataclasses.asdict(params), "num_classes": NUM_CLASSES,
                "epoch": 0, "params_hash": "", "metrics": {}})
    return path


def smoke_data(folder: Path, params: Params) -> Params:
    """`params` pointed at a tiny synthetic dataset with generated masks made in `folder`."""
    root, generated = folder / "cityscapes", folder / "generated"
    synthesize(root, SMOKE_DATA)
    generate(root, generated, ENCODINGS, ["val"], workers=1)
    return dataclasses.replace(params, data=dataclasses.replace(
        params.data, root=str(root), generated=str(generated)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path,
                        help=f"where to write the JSON (default {DEFAULT_OUT}; none with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run that checks the script works (CI): two 64x128 val "
                             "images made in a temporary folder, 1 round, a random checkpoint "
                             "unless --checkpoint is given")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    with contextlib.ExitStack() as stack:
        if args.smoke:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="inference_modes_")))
            params = smoke_data(tmp, params)
            args.rounds = 1
            if args.checkpoint is None:
                args.checkpoint = random_checkpoint(tmp / "random.pt", params.model, 0)
        run(args, params, args.out or (None if args.smoke else DEFAULT_OUT))


def run(args: argparse.Namespace, params: Params, out: Path | None) -> None:
    """Every option over the val split of `params.data.root`; the JSON to `out` (if any)."""
    checkpoint = args.checkpoint or best_path(params.train.out)
    model = load_model(checkpoint, params.model)
    width, height = read_size(list_images(params.data.root, "val")[0])
    window = [height // 2, width // 2]
    stride = [2 * window[0] // 3, 2 * window[1] // 3]
    options = {
        "whole": {},
        "whole + flip": {"flip_tta": True},
        "3 scales (0.75, 1, 1.25)": {"scales": [0.75, 1.0, 1.25]},
        "3 scales + flip": {"scales": [0.75, 1.0, 1.25], "flip_tta": True},
        "6 scales (0.5 … 1.75) + flip": {"scales": MMSEG_SCALES, "flip_tta": True},
        f"slide {window[0]}x{window[1]}": {"mode": "slide"},
        f"slide {window[0]}x{window[1]} + flip": {"mode": "slide", "flip_tta": True},
    }
    base = dataclasses.replace(params.evaluate, samples=0, device="cpu", window=window,
                               stride=stride)
    rows = []
    for name, changes in options.items():
        section = dataclasses.replace(base, **changes)
        predictor = Predictor(model, "cpu", "fp32", section.channels_last, section.flip_tta,
                              section.mode, section.window, section.stride, section.scales)
        best = float("inf")
        for _ in range(args.rounds):
            start = time.perf_counter()
            scores, *_ = evaluate_model(predictor, params.data.root, params.data.generated,
                                        section, analyse=False)  # the official scores only
            best = min(best, time.perf_counter() - start)
        rows.append({"option": name, **changes, "class_iou": scores.class_iou_mean,
                     "category_iou": scores.category_iou_mean,
                     "ms_per_image": 1e3 * best / scores.images})
        print(f"{name:32s} class IoU {scores.class_iou_mean:.4f}  category IoU "
              f"{scores.category_iou_mean:.4f}  {rows[-1]['ms_per_image']:8.1f} ms/image")
    report = {"command": "python benchmarks/inference_modes.py", "checkpoint": str(checkpoint),
              "images": scores.images, "image_size": [height, width],
              "window": window, "stride": stride, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "rows": rows}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
