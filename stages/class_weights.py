"""Stage `class_weights`: the train split's trainId pixel histogram and the enet and
median_frequency class weights computed from it (read by train when train.class_weights names
a scheme)."""

from fcn.stage import run_stage, stage_parser
from fcn.params import load_params
from fcn.class_weights import write_class_weights


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", default="data/class_weights.json",
                        help="histogram and weights (JSON; default: %(default)s)")
    args = parser.parse_args()
    params = load_params(args.params)
    write_class_weights(params.data.generated, args.out,
                        max_pixels=params.data.max_pixels)


if __name__ == "__main__":
    run_stage(main)
