"""Stage `synthesize`: write the synthetic Cityscapes-format dataset."""

from fcn.stage import run_stage, stage_parser
from fcn.params import load_params
from fcn.synthetic import synthesize


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", default="data/synthetic", help="dataset root to write")
    args = parser.parse_args()
    params = load_params(args.params)
    synthesize(args.out, params.synthesize)


if __name__ == "__main__":
    run_stage(main)
