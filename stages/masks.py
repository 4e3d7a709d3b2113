"""Stage `masks`: polygons → labelIds, labelTrainIds, color, instanceIds masks + agreement report."""

from fcn.stage import run_stage, stage_parser
from fcn.masks.generate import masks_stage
from fcn.params import load_params


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--metrics", default="metrics/masks.json", help="agreement report (JSON)")
    parser.add_argument("--plots", default="plots/masks",
                        help="folder for the per-image table, the worst images and the agreement figure")
    args = parser.parse_args()
    params = load_params(args.params)
    m = params.masks
    masks_stage(params.data.root, params.data.generated, m.encodings, m.splits, m.workers,
                m.worst, m.figure_images, args.metrics, args.plots, params.data.max_pixels)


if __name__ == "__main__":
    run_stage(main)
