"""Stage `train`: FCN8s on the generated masks; resumable, and under torchrun when train.nproc > 1
(DDP) or train.max_restarts > 0 (the group restarts after a worker fails, resuming)."""

import sys

from fcn.stage import run_stage, stage_parser
from fcn.params import load_params, sections_dict
from fcn.train.distributed import needs_launch, relaunch
from fcn.train.fit import fit


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--live-dir", default="metrics/train",
                        help="DVCLive folder for per-epoch metrics (default: %(default)s)")
    parser.add_argument("--no-live", action="store_true",
                        help="no DVCLive log, checkpoints only (tools that need no curves, "
                             "e.g. the GPU check on a machine without DVC)")
    parser.add_argument("--class-weights", default="data/class_weights.json",
                        help="the class_weights stage's output, read when train.class_weights "
                             "names a scheme (default: %(default)s)")
    args = parser.parse_args()
    params = load_params(args.params)
    if needs_launch(params.train.nproc, params.train.max_restarts):
        sys.exit(relaunch(params.train.nproc, __file__, sys.argv[1:],
                          max_restarts=params.train.max_restarts))
    fit(params.model, params.train, params.data.root, params.data.generated,
        None if args.no_live else args.live_dir,
        identity=sections_dict(params, "data", "synthesize"),
        class_weights_file=args.class_weights,
        decoded=params.decode.out if params.decode.enabled else None,
        max_pixels=params.data.max_pixels)


if __name__ == "__main__":
    run_stage(main)
