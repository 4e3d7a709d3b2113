"""Stage `decode`: the train and val images and trainId masks as raw uint8 arrays, decoded once
for the train loader to memory-map (decode.enabled false: only the index, and the loader
decodes the PNGs)."""

from fcn.stage import run_stage, stage_parser
from fcn.params import load_params
from fcn.decode import decode_stage


def main() -> None:
    args = stage_parser(__doc__).parse_args()
    params = load_params(args.params)
    decode_stage(params.data.root, params.data.generated, params.decode.out,
                 params.decode.enabled, params.decode.workers, params.data.max_pixels)


if __name__ == "__main__":
    run_stage(main)
