"""Stage `evaluate`: official Cityscapes scores on val, per-class tables and plots.

By default the trained model predicts every val image; `--predictions DIR` scores label-id PNGs
exported earlier instead (found by `<city>_<seq>_<frame>*.png`, as the official script does).
"""

from pathlib import Path

from fcn.checkpoint import best_path
from fcn.stage import run_stage, stage_parser
from fcn.params import load_params
from fcn.predict.evaluate import ReportPaths, evaluate_stage


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path,
                        help="model checkpoint (default: <train.out>/best.pt)")
    parser.add_argument("--predictions", type=Path,
                        help="score label-id PNGs under this folder instead of running the model")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/evaluate.json"),
                        help="the means (what dvc metrics/exp show list)")
    parser.add_argument("--tables", type=Path, default=Path("metrics/evaluate"),
                        help="prefix of the per-class and per-category tables")
    parser.add_argument("--plots", type=Path, default=Path("plots/evaluate"))
    args = parser.parse_args()
    params = load_params(args.params)
    evaluate_stage(params.data.root, params.data.generated, params.model, params.evaluate,
                   ReportPaths(args.metrics, args.tables, args.plots),
                   args.checkpoint or best_path(params.train.out), args.predictions,
                   params.data.max_pixels)


if __name__ == "__main__":
    run_stage(main)
