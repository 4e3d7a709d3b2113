"""Stage `masks`: polygons → labelIds, labelTrainIds, color, instanceIds masks + agreement report.
With `--annotation gtCoarse` it is the coarse pipeline's `coarse_masks` stage: gtCoarse's
splits (coarse.splits) under coarse.generated."""

from fcn.cityscapes.layout import ANNOTATION_SPLITS, COARSE, FINE
from fcn.stage import run_stage, stage_parser
from fcn.masks.generate import masks_stage
from fcn.params import load_params


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--annotation", choices=tuple(ANNOTATION_SPLITS), default=FINE,
                        help="annotation set to render (default: %(default)s)")
    parser.add_argument("--metrics", default="metrics/masks.json", help="agreement report (JSON)")
    parser.add_argument("--plots", default="plots/masks",
                        help="folder for the per-image table, the worst images and the agreement figure")
    args = parser.parse_args()
    params = load_params(args.params)
    m = params.masks
    coarse = args.annotation == COARSE
    masks_stage(params.data.root, params.coarse.generated if coarse else params.data.generated,
                m.encodings, params.coarse.splits if coarse else m.splits, m.workers, m.worst,
                m.figure_images, args.metrics, args.plots, params.data.max_pixels,
                args.annotation)


if __name__ == "__main__":
    run_stage(main)
