"""Stage `evaluate`: official Cityscapes scores on val, per-class tables and plots.

By default the trained model predicts every val image; `--predictions DIR` scores label-id PNGs
exported earlier instead (found by `<city>_<seq>_<frame>*.png`, as the official script does).
"""

from pathlib import Path

from fcn.cli import run_stage, stage_parser
from fcn.inference import build_predictor
from fcn.params import load_params
from fcn.report import ReportPaths, evaluate_exported, evaluate_model, write_report


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path,
                        help="model checkpoint (default: <train.out>/best.pt)")
    parser.add_argument("--predictions", type=Path,
                        help="score label-id PNGs under this folder instead of running the model")
    args = parser.parse_args()
    params = load_params(args.params)
    if args.predictions is not None:
        scores, panels = evaluate_exported(args.predictions, params.data, params.evaluate)
    else:
        checkpoint = args.checkpoint or Path(params.train.out) / "best.pt"
        predictor = build_predictor(checkpoint, params.model, params.evaluate)
        scores, panels = evaluate_model(predictor, params.data, params.evaluate)
    write_report(scores, panels, ReportPaths())


if __name__ == "__main__":
    run_stage(main)
