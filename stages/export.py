"""Stage `export`: test predictions as label-id PNGs + upload zip, overlays, a val GIF, and the
MP4 of export.sequence's frames (<out>/video/sequence.mp4; none while it is null).

`--images DIR --out DIR` instead predicts any folder of images (outside the dataset too):
`<out>/<relative path>/<name>_labelIds.png` and `overlay_<name>.png` per image; --mode,
--window, --stride, --scales, --flip … override the export section for that (as fcn-predict).
Every image is checked (opens, at most data.max_pixels) before any work, and --out is replaced
whole once every prediction is written: a failure leaves the previous folder as it was.
"""

from pathlib import Path

from fcn.checkpoint import best_path
from fcn.cityscapes.layout import SPLITS
from fcn.stage import run_stage, stage_parser
from fcn.errors import FcnError
from fcn.params import load_params
from fcn.predict.cli import add_inference_arguments, with_overrides
from fcn.predict.export import ExportPaths, export_stage, predict_folder_stage


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path,
                        help="model checkpoint (default: <train.out>/best.pt)")
    parser.add_argument("--split", default="test", choices=SPLITS,
                        help="dataset split to export (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="output folder (default: export.out)")
    parser.add_argument("--images", type=Path,
                        help="predict every .png/.jpg under this folder instead (needs --out)")
    add_inference_arguments(parser)
    args = parser.parse_args()
    params = load_params(args.params)
    if args.images is not None and args.out is None:
        raise FcnError("--images needs --out: where to write the predictions")
    overrides = with_overrides(params.export, args)
    if args.images is None and overrides != params.export:
        raise FcnError("inference options on the command line apply to --images only; the "
                       "export stage reads params.yaml (e.g. dvc exp run -S export.mode=slide)")
    checkpoint = args.checkpoint or best_path(params.train.out)
    if args.images is not None:
        predict_folder_stage(checkpoint, params.model, overrides, args.images, args.out,
                             params.data.max_pixels)
    else:
        export_stage(checkpoint, params.data.root, params.model, params.export,
                     ExportPaths(args.out or Path(params.export.out), args.split),
                     params.data.max_pixels)


if __name__ == "__main__":
    run_stage(main)
