"""`fcn-predict`: predict a folder of images, or a video, with a trained checkpoint, from anywhere.

    fcn-predict --checkpoint models/best.pt IMAGES OUT [--mode slide --window 512 1024 …]
    fcn-predict --checkpoint models/best.pt VIDEO_OR_FRAMES OUT.mp4 [--fps F] [--side-by-side]

No params.yaml and no repository layout are needed: the model is rebuilt from the
checkpoint's own parameters, the inference options come from the command line (defaults as
in params.yaml's `export` section), and the work is the export stage's `--images` path, with
the same checks and one-line errors. An OUT ending in `.mp4` (required for a video input)
writes the prediction video instead (`fcn.predict.export.predict_video_stage`).
`add_inference_arguments` / `with_overrides` also give `stages/export.py --images` the same
options.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from fcn.errors import FcnError
from fcn.stage import run_stage
from fcn.params import (DEVICES, PRECISIONS, DataParams, ExportParams, default_params_dict,
                        parse_params)
from fcn.predict.export import predict_folder_stage, predict_video_stage
from fcn.video import VIDEO_SUFFIXES


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
             "batch_size", "workers", "confidence_maps", "confidence_bits", "temperature",
             *VIDEO_OPTIONS)
    changes: dict[str, Any] = {n: getattr(args, n) for n in names
                               if getattr(args, n, None) is not None}
    raw = default_params_dict()
    raw["export"] = {**dataclasses.asdict(export), **changes}
    return parse_params(raw, source).export


VIDEO_OPTIONS = ("video_fps", "video_side_by_side", "video_crf")
"""The `export` fields fcn-predict's video options set (--fps, --side-by-side, --crf)."""


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of a prediction video (OUT ending in .mp4)."""
    group = parser.add_argument_group("video (OUT ending in .mp4)")
    group.add_argument("--fps", type=float, dest="video_fps", metavar="F", help="frame rate "
                       "of the MP4 (default: a video's own; 17, Cityscapes' rate, for a folder of "
                       "frames)")
    group.add_argument("--side-by-side", action=argparse.BooleanOptionalAction,
                       dest="video_side_by_side", help="each frame: the input beside its overlay")
    group.add_argument("--crf", type=int, dest="video_crf", metavar="N", help="x264 quality: "
                       "0 = best ... 51 = smallest (default 23)")


def check_video_request(images: Path, out: Path, args: argparse.Namespace) -> bool:
    """Whether to write a video (OUT ends in .mp4); a video input with another OUT, or video
    or confidence options that do not apply, are one-line errors (before any work)."""
    video_out = out.suffix.lower() == ".mp4"
    if images.suffix.lower() in VIDEO_SUFFIXES and not images.is_dir() and not video_out:
        raise FcnError(f"{out}: the input {images} is a video, so its predictions are a video "
                       "too: give an output path ending in .mp4")
    if not video_out and any(getattr(args, n) is not None for n in VIDEO_OPTIONS):
        raise FcnError("--fps, --side-by-side and --crf apply to a video: give an output path "
                       "ending in .mp4")
    if video_out and args.confidence_maps:
        raise FcnError("--confidence applies to a folder of images, not to a video (.mp4)")
    return video_out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fcn-predict", description=__doc__.split("\n")[0])
    parser.add_argument("images", type=Path, help="folder of .png/.jpg/.jpeg images "
                        "(recursive); with OUT ending in .mp4, a video file "
                        f"({' '.join(VIDEO_SUFFIXES)}) or a folder of frames (natural order "
                        "of their names: Cityscapes' city, seq, frame)")
    parser.add_argument("out", type=Path, help="where <name>_labelIds.png and "
                        "overlay_<name>.png go, or the .mp4 video of the overlays")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint")
    parser.add_argument("--max-pixels", type=int, default=DataParams().max_pixels,
                        help="refuse images larger than this many pixels, checked from every "
                             "header before any work (data.max_pixels; default %(default)s)")
    add_inference_arguments(parser)
    add_video_arguments(parser)
    args = parser.parse_args(argv)

    def predict() -> None:
        video = check_video_request(args.images, args.out, args)
        params = with_overrides(ExportParams(), args)
        raw = default_params_dict()
        raw["data"]["max_pixels"] = args.max_pixels
        max_pixels = parse_params(raw, "command line").data.max_pixels  # its range, as in yaml
        if video:
            predict_video_stage(args.checkpoint, None, params, args.images, args.out,
                                max_pixels, args.video_fps)
        else:
            predict_folder_stage(args.checkpoint, None, params, args.images, args.out,
                                 max_pixels)

    run_stage(predict)


if __name__ == "__main__":
    main()
