"""`fcn-predict`: predict a folder of images with a trained checkpoint, from anywhere.

    fcn-predict --checkpoint models/best.pt IMAGES OUT [--mode slide --window 512 1024 …]

No params.yaml and no repository layout are needed: the model is rebuilt from the
checkpoint's own parameters, the inference options come from the command line (defaults as
in params.yaml's `export` section), and the work is the export stage's `--images` path, with
the same checks and one-line errors. `add_inference_arguments` / `with_overrides` also give
`stages/export.py --images` the same options.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from fcn.stage import run_stage
from fcn.params import (DEVICES, PRECISIONS, DataParams, ExportParams, default_params_dict,
                        parse_params)
from fcn.predict.export import predict_folder_stage


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that override the `export` section's inference fields (unset: keep them)."""
    group = parser.add_argument_group("inference (default: params.yaml's export section)")
    group.add_argument("--mode", choices=["whole", "slide"])
    group.add_argument("--window", type=int, nargs=2, metavar=("H", "W"))
    group.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"))
    group.add_argument("--scales", type=float, nargs="+", metavar="S")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, dest="flip_tta",
                       help="flip test-time augmentation")
    group.add_argument("--precision", choices=PRECISIONS)
    group.add_argument("--device", choices=DEVICES)
    group.add_argument("--batch-size", type=int, dest="batch_size")
    group.add_argument("--workers", type=int)
    maps = parser.add_argument_group("confidence maps (default: off)")
    maps.add_argument("--confidence", action=argparse.BooleanOptionalAction,
                      dest="confidence_maps", help="also write confidence_<name>.png (max "
                      "probability) and entropy_<name>.png per image, and their overlays")
    maps.add_argument("--confidence-bits", type=int, choices=[8, 16], dest="confidence_bits",
                      help="PNG bit depth: value = round(x * (2^bits - 1)), x = the max "
                      "probability, or the entropy / ln(19)")
    maps.add_argument("--temperature", type=float, help="softmax temperature of the maps "
                      "(evaluate's fitted calibration.temperature calibrates them)")


def with_overrides(export: ExportParams, args: argparse.Namespace,
                   source: str = "command line") -> ExportParams:
    """`export` with the options given on the command line, validated as params.yaml is
    (one message listing every problem, naming export.<key>)."""
    names = ("mode", "window", "stride", "scales", "flip_tta", "precision", "device",
             "batch_size", "workers", "confidence_maps", "confidence_bits", "temperature")
    changes: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    raw = default_params_dict()
    raw["export"] = {**dataclasses.asdict(export), **changes}
    return parse_params(raw, source).export


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fcn-predict", description=__doc__.split("\n")[0])
    parser.add_argument("images", type=Path, help="folder of .png/.jpg/.jpeg images (recursive)")
    parser.add_argument("out", type=Path, help="where <name>_labelIds.png and overlay_<name>.png go")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint")
    parser.add_argument("--max-pixels", type=int, default=DataParams().max_pixels,
                        help="refuse images larger than this many pixels, checked from every "
                             "header before any work (data.max_pixels; default %(default)s)")
    add_inference_arguments(parser)
    args = parser.parse_args(argv)

    def predict() -> None:
        params = with_overrides(ExportParams(), args)
        raw = default_params_dict()
        raw["data"]["max_pixels"] = args.max_pixels
        max_pixels = parse_params(raw, "command line").data.max_pixels  # its range, as in yaml
        predict_folder_stage(args.checkpoint, None, params, args.images, args.out, max_pixels)

    run_stage(predict)


if __name__ == "__main__":
    main()
