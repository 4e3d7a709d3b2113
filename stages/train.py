"""Stage `train`: FCN8s on the generated masks; resumable, and under torchrun when train.nproc > 1
(DDP) or train.max_restarts > 0 (the group restarts after a worker fails, resuming). With
`--phase pretrain|finetune` it is a stage of the coarse pipeline (recipes/coarse_to_fine.yaml):
`train` with that phase's coarse.* fields; with `--staged fcn32s|fcn16s|fcn8s` a step of the
staged pipeline (recipes/staged.yaml): that arch with the staged.* fields."""

import sys

from fcn.stage import run_stage, stage_parser
from fcn.params import PHASES, STAGES, data_identity, load_params, phase_train, staged_params
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
    recipe = parser.add_mutually_exclusive_group()
    recipe.add_argument("--phase", choices=PHASES, default=None,
                        help="a coarse -> fine phase: train with its coarse.* fields")
    recipe.add_argument("--staged", choices=STAGES, default=None,
                        help="a step of staged training: this arch with the staged.* fields")
    args = parser.parse_args()
    params = load_params(args.params)
    model, train = params.model, params.train
    if args.phase is not None:
        train = phase_train(train, params.coarse, args.phase)
    if args.staged is not None:
        model, train = staged_params(model, train, params.staged, args.staged)
    if needs_launch(train.nproc, train.max_restarts):
        sys.exit(relaunch(train.nproc, __file__, sys.argv[1:], max_restarts=train.max_restarts))
    identity = data_identity(params)
    if args.phase:  # which coarse masks it reads (the phase's own fields are in `train`)
        identity["coarse"] = {"generated": params.coarse.generated, "splits": params.coarse.splits}
    fit(model, train, params.data.root, params.data.generated,
        None if args.no_live else args.live_dir, identity=identity,
        class_weights_file=args.class_weights,
        decoded=params.decode.out if params.decode.enabled else None,
        max_pixels=params.data.max_pixels,
        generated_coarse=params.coarse.generated if args.phase else None)


if __name__ == "__main__":
    run_stage(main)
