"""What each inference option changes: val mIoU and time per image, on the trained model.

    .venv/bin/python benchmarks/inference_modes.py [--checkpoint models/best.pt]
        [--out docs/measured/inference_modes.json]

Scores every val image of `data.root` (params.yaml) with the evaluate stage's own code
(`fcn.predict.evaluate.evaluate_model`, official class IoU) under each option: whole images;
flip; multi-scale (mmseg's Cityscapes ratios) with and without flip; slide mode with windows
of half the image's height and width (stride two thirds of the window, mmseg's proportion),
alone and with flip. Time per image is wall time over the val split (decode included, one
process, the CPU's default threads), best of `--rounds`. The JSON it writes feeds the table in
docs/performance.md (docs/generate.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from fcn.checkpoint import best_path, load_model
from fcn.cityscapes.layout import list_images
from fcn.images import read_size
from fcn.params import load_params
from fcn.predict.evaluate import evaluate_model
from fcn.predict.predictor import Predictor

MMSEG_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/measured/inference_modes.json"))
    args = parser.parse_args()
    params = load_params(args.params)
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
            scores, _ = evaluate_model(predictor, params.data.root, params.data.generated,
                                       section)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
