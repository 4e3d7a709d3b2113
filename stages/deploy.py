"""Stage `deploy`: best.pt → ONNX (dynamic height and width) and its int8 copy for CPUs, each
checked against PyTorch with onnxruntime on the val images (agreement, val mIoU), and every
runtime timed at full resolution."""

from pathlib import Path

from fcn.checkpoint import best_path
from fcn.stage import run_stage, stage_parser
from fcn.deploy import deploy_stage
from fcn.params import load_params


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path,
                        help="model checkpoint (default: <train.out>/best.pt)")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/deploy.json"),
                        help="agreement, logit difference, val mIoU of each runtime, file sizes")
    parser.add_argument("--latency", type=Path, default=Path("metrics/deploy_latency.json"),
                        help="every runtime's latency on this machine (a timing file)")
    args = parser.parse_args()
    params = load_params(args.params)
    deploy_stage(args.checkpoint or best_path(params.train.out), params.data.root,
                 params.data.generated, params.model, params.deploy, args.metrics,
                 params.data.max_pixels, args.latency)


if __name__ == "__main__":
    run_stage(main)
