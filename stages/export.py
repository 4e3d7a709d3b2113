"""Stage `export`: test predictions as label-id PNGs + upload zip, overlays and a val GIF.

`--images DIR --out DIR` instead predicts any folder of images (outside the dataset too):
`<out>/<relative path>/<name>_labelIds.png` and `<name>_overlay.png` per image.
"""

from pathlib import Path

from fcn.cli import run_stage, stage_parser
from fcn.errors import FcnError
from fcn.export import ExportPaths, export_gif, export_split, predict_folder
from fcn.inference import build_predictor
from fcn.params import load_params


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path,
                        help="model checkpoint (default: <train.out>/best.pt)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"],
                        help="dataset split to export (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="output folder (default: export.out)")
    parser.add_argument("--images", type=Path,
                        help="predict every .png/.jpg under this folder instead (needs --out)")
    args = parser.parse_args()
    params = load_params(args.params)
    if args.images is not None and args.out is None:
        raise FcnError("--images needs --out: where to write the predictions")
    checkpoint = args.checkpoint or Path(params.train.out) / "best.pt"
    predictor = build_predictor(checkpoint, params.model, params.export)
    if args.images is not None:
        predict_folder(predictor, args.images, args.out, params.export)
        return
    paths = ExportPaths(args.out or Path(params.export.out), args.split)
    export_split(predictor, params.data.root, paths, params.export)
    export_gif(predictor, params.data.root, paths.gif, params.export)


if __name__ == "__main__":
    run_stage(main)
