"""Stage `masks`: polygons → labelIds, labelTrainIds, color, instanceIds masks + agreement report."""

import logging
from pathlib import Path

from fcn.agreement import summarize, worst_report, write_table
from fcn.cli import run_stage, stage_parser
from fcn.io import write_json
from fcn.mask_dataset import agreement_figure, generate
from fcn.params import load_params

log = logging.getLogger("fcn.masks")


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--metrics", default="metrics/masks.json", help="agreement report (JSON)")
    parser.add_argument("--plots", default="plots/masks",
                        help="folder for the per-image table, the worst images and the agreement figure")
    args = parser.parse_args()
    params = load_params(args.params)
    m = params.masks
    results = generate(params.data.root, params.data.generated, m.encodings, m.splits, m.workers)
    report = summarize(results, m.encodings)
    plots = Path(args.plots)
    write_table(plots / "agreement.csv", results)
    write_json(plots / "worst.json", worst_report(results, m.worst))
    figure = plots / "agreement.png"
    if not agreement_figure(figure, params.data.root, results, m.figure_images):
        figure.unlink(missing_ok=True)  # a stale figure would show masks of another run
    write_json(args.metrics, report)
    if report["agreement"] is None:
        log.info("no *_gtFine_{labelIds,labelTrainIds,color,instanceIds}.png next to the "
                 "polygons under %s: nothing to compare with", params.data.root)
    else:
        log.info("agreement with shipped masks: %s", ", ".join(
            f"{e} {a['overall']:.6f}" for e, a in report["agreement"].items()))


if __name__ == "__main__":
    run_stage(main)
