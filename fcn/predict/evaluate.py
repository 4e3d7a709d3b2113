"""The evaluate stage's work: score val predictions and write metrics, tables and plots.

Predictions come either from the model (streamed, never all in memory) or from label-id PNGs
exported earlier (found as the official script finds them). Everything is computed before the
first output is written, and each output is written atomically, so a failed run leaves the
previous report intact.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fcn.analysis.evaluation import AnalysisResult, EvaluationAnalysis
from fcn.analysis.per_image import IMAGE_FIELDS
from fcn.atomic import atomic_dir, write_json, write_text
from fcn.cityscapes.labels import (CLASS_NAMES, EVAL_LABELS, ID_TO_TRAINID,
                                   TRAINID_TO_ID)
from fcn.cityscapes.layout import list_images, stem_of
from fcn.cityscapes.scoring import (CityscapesEvaluator, CityscapesScores, EvalFiles,
                                    evaluate_files, ground_truth_files, match_predictions)
from fcn.errors import DataError
from fcn.images import MAX_PIXELS, read_labels, read_rgb, read_size, write_png
from fcn.params import EvaluateParams, ModelParams
from fcn.predict.predictor import Predictor, predict_stream
from fcn.predict.visualize import confusion_heatmap, sample_panel, spread

log = logging.getLogger(__name__)

SPLIT = "val"
CLASS_IOU, CONFUSION, SAMPLES = "class_iou.csv", "confusion.png", "samples"
BOUNDARY_IOU, TRIMAP, RELIABILITY, WORST = ("boundary_iou.csv", "trimap.csv", "reliability.csv",
                                            "worst")
"""What the plots folder holds (dvc.yaml's evaluate plots name them)."""


@dataclass(frozen=True)
class ReportPaths:
    """Where the evaluate stage writes: `<metrics>` (means), `<tables>_classes.csv/.md` and
    `<tables>_categories.csv`, and the `<plots>` folder."""

    metrics: Path
    tables: Path
    plots: Path

    @property
    def classes_csv(self) -> Path:
        return self.tables.with_name(self.tables.name + "_classes.csv")

    @property
    def classes_md(self) -> Path:
        return self.tables.with_name(self.tables.name + "_classes.md")

    @property
    def categories_csv(self) -> Path:
        return self.tables.with_name(self.tables.name + "_categories.csv")

    @property
    def images_csv(self) -> Path:
        return self.tables.with_name(self.tables.name + "_images.csv")



def evaluate_stage(root: str | Path, generated: str | Path, model: ModelParams,
                   params: EvaluateParams, paths: ReportPaths, checkpoint: str | Path,
                   predictions: str | Path | None = None,
                   max_pixels: int = MAX_PIXELS) -> CityscapesScores:
    """The evaluate stage: score the model of `checkpoint` on val (or, given `predictions`,
    the label-id PNGs under that folder instead) and write the report to `paths`. Every file
    read (image, ground truth, prediction) is refused above `max_pixels` before decoding."""
    truth_root = Path(generated if params.ground_truth == "generated" else root)
    compute = None
    if predictions is not None:
        scores, panels, analysis = evaluate_exported(predictions, root, truth_root, params,
                                                     max_pixels)
    else:
        predictor = Predictor.from_params(checkpoint, model, params)
        scores, panels, analysis = evaluate_model(predictor, root, truth_root, params,
                                                  max_pixels)
        compute = predictor.flags()
    write_report(scores, panels, paths, compute, analysis)
    return scores


def new_analysis(images: int, params: EvaluateParams, probabilities: bool
                 ) -> EvaluationAnalysis:
    """The analysis `params` ask for (no temperature fit without the model's probabilities)."""
    return EvaluationAnalysis(
        images, params.boundary_ratio, params.trimap_widths, params.ece_bins,
        params.temperature_pixels if params.temperature and probabilities else 0,
        params.worst, params.sample_width)


def evaluate_model(predictor: Predictor, root: str | Path, truth_root: str | Path,
                   params: EvaluateParams, max_pixels: int = MAX_PIXELS, analyse: bool = True
                   ) -> tuple[CityscapesScores, dict[str, np.ndarray], AnalysisResult | None]:
    """Predict every val image under `root`, score it against the ground truth under
    `truth_root` (generated masks, or the ones shipped with the dataset); also the panels and,
    if `analyse`, the analysis (boundaries, calibration from the model's probabilities, per
    image; benchmarks/evaluate_analysis.py times what it adds)."""
    images = list_images(root, SPLIT)
    stems = [stem_of(p) for p in images]
    truth = ground_truth_files(truth_root, SPLIT, stems)
    items = list(zip(images, truth))
    chosen = {stems[i] for i in spread(len(items), params.samples)}

    def load(item: tuple[Path, tuple[Path, Path | None]]):
        image, (labels, instances) = item
        return read_rgb(image, "image", max_pixels), (
            read_labels(labels, "ground-truth labelIds", max_pixels),
            read_labels(instances, "ground-truth instanceIds", max_pixels))

    evaluator = CityscapesEvaluator(instance_scores=True)
    analysis = new_analysis(len(items), params, probabilities=True) if analyse else None
    panels: dict[str, np.ndarray] = {}
    stream = predict_stream(predictor, items, load, params.batch_size, params.workers,
                            keep_scores=analyse)
    for index, ((image_path, (labels_path, instances_path)), image, (labels, instances),
                train_ids, scores) in enumerate(tqdm(stream, total=len(items), desc="evaluate",
                                                     unit="img")):
        evaluator.add(TRAINID_TO_ID[train_ids], labels, instances,
                      names=(f"prediction for {image_path}", str(labels_path),
                             str(instances_path)))
        stem = stem_of(image_path)
        if analysis is not None:
            analysis.add(index, stem, image, ID_TO_TRAINID[labels], train_ids, scores,
                         predictor.averages_probabilities)
        if stem in chosen:
            panels[stem] = sample_panel(image, labels, train_ids, params.sample_width)
    return evaluator.scores(), panels, None if analysis is None else analysis.result()


def evaluate_exported(predictions: str | Path, root: str | Path, truth_root: str | Path,
                      params: EvaluateParams, max_pixels: int = MAX_PIXELS
                      ) -> tuple[CityscapesScores, dict[str, np.ndarray], AnalysisResult]:
    """Score label-id PNGs under `predictions` (one `<city>_<seq>_<frame>*.png` per val image);
    the analysis has no calibration (files hold no probabilities)."""
    images = list_images(root, SPLIT)
    stems = [stem_of(p) for p in images]
    truth = ground_truth_files(truth_root, SPLIT, stems)
    found = match_predictions(predictions, [labels for labels, _ in truth])
    for image, (labels, _) in zip(images, truth):  # the panels show image | truth | prediction
        image_size = read_size(image, "image", max_pixels)
        truth_size = read_size(labels, "ground-truth labelIds", max_pixels)
        if image_size != truth_size:
            raise DataError(f"{image}: image is {image_size[0]}x{image_size[1]} but its ground "
                            f"truth {labels} is {truth_size[0]}x{truth_size[1]}")
    files = [EvalFiles(p, labels, instances) for p, (labels, instances) in zip(found, truth)]
    analysis = new_analysis(len(files), params, probabilities=False)

    def each(index: int, prediction: np.ndarray, labels: np.ndarray) -> None:
        analysis.add(index, stems[index],
                     lambda: read_rgb(images[index], "image", max_pixels),
                     ID_TO_TRAINID[labels], ID_TO_TRAINID[prediction])

    scores = evaluate_files(files, instance_scores=True, workers=params.workers,
                            max_pixels=max_pixels, each=each)
    panels = {}
    for i in spread(len(files), params.samples):
        predicted_ids = read_labels(files[i].prediction, "prediction", max_pixels)
        panels[stems[i]] = sample_panel(
            read_rgb(images[i], "image", max_pixels),
            read_labels(files[i].labels, "ground-truth labelIds", max_pixels),
            ID_TO_TRAINID[predicted_ids], params.sample_width)
    return scores, panels, analysis.result()


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def class_rows(scores: CityscapesScores, analysis: AnalysisResult | None = None
               ) -> list[dict[str, object]]:
    """One row per evaluated class (trainId order): the official IoU/iIoU, Dice, accuracy and
    pixel counts (ground truth, and predictions on evaluated ground truth); with the analysis
    its Boundary IoU and (from the model's probabilities) its ECE."""
    cm = scores.confusion
    evaluated = [lab.id for lab in EVAL_LABELS]
    rows = []
    for label in EVAL_LABELS:
        row: dict[str, object] = {
            "class": label.name, "train_id": label.trainId, "label_id": label.id,
            "category": label.category,
            "iou": scores.class_iou[label.name],
            "iiou": scores.class_iiou.get(label.name, math.nan),
            "dice": scores.dice[label.name], "accuracy": scores.accuracy[label.name],
            "gt_pixels": int(cm[label.id].sum()),
            "predicted_pixels": int(cm[evaluated, label.id].sum()),
        }
        if analysis is not None:
            row["boundary_iou"] = analysis.boundary["boundary_iou"][label.trainId]
            if analysis.calibration is not None:
                row["ece"] = analysis.calibration["ece_per_class"][label.trainId]
        rows.append(row)
    return rows


def _csv(rows: Sequence[dict[str, object]], fields: Sequence[str] | None = None) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields or rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in row.items()}
                     for row in rows)
    return buffer.getvalue()


def _markdown(scores: CityscapesScores, analysis: AnalysisResult | None = None) -> str:
    boundary = analysis.boundary if analysis is not None else None
    calibration = analysis.calibration if analysis is not None else None
    extra = (" Boundary IoU |" if boundary else "") + (" ECE |" if calibration else "")
    extra_rule = ("---:|" if boundary else "") + ("---:|" if calibration else "")
    lines = [f"# Evaluation on {SPLIT} ({scores.images} images)", "",
             "Official Cityscapes scores (cityscapesScripts semantics); n/a = not defined.", "",
             f"| class | IoU | iIoU | Dice | accuracy |{extra} gt pixels |",
             f"|---|---:|---:|---:|---:|{extra_rule}---:|"]
    for label in EVAL_LABELS:
        name = label.name
        iiou = _cell(scores.class_iiou[name]) if name in scores.class_iiou else ""
        more = ""
        if boundary:
            more += f" {_cell(boundary['boundary_iou'][label.trainId])} |"
        if calibration:
            more += f" {_cell(calibration['ece_per_class'][label.trainId])} |"
        lines.append(f"| {name} | {_cell(scores.class_iou[name])} | {iiou} | "
                     f"{_cell(scores.dice[name])} | {_cell(scores.accuracy[name])} |{more} "
                     f"{int(scores.confusion[label.id].sum())} |")
    more = ""
    if boundary:
        more += f" **{_cell(boundary['boundary_miou'])}** |"
    if calibration:
        more += f" **{_cell(calibration['ece'])}** |"
    lines.append(f"| **mean** | **{_cell(scores.class_iou_mean)}** | "
                 f"**{_cell(scores.class_iiou_mean)}** | **{_cell(scores.mean_dice)}** | "
                 f"**{_cell(scores.mean_pixel_accuracy)}** |{more} |")
    lines += ["", "| category | IoU | iIoU |", "|---|---:|---:|"]
    for category, value in scores.category_iou.items():
        iiou = scores.category_iiou.get(category)
        lines.append(f"| {category} | {_cell(value)} | {'' if iiou is None else _cell(iiou)} |")
    lines.append(f"| **mean** | **{_cell(scores.category_iou_mean)}** | "
                 f"**{_cell(scores.category_iiou_mean)}** |")
    lines += ["", f"Global pixel accuracy: {_cell(scores.pixel_accuracy)}", ""]
    return "\n".join(lines)


def write_report(scores: CityscapesScores, panels: dict[str, np.ndarray],
                 paths: ReportPaths, compute: dict[str, object] | None = None,
                 analysis: AnalysisResult | None = None) -> None:
    """Metrics JSON (means; null = not defined; `compute`: how the predictions were computed,
    `fcn.backends.flags`; the analysis' means, calibration and per-city means), class,
    category and per-image tables, plot data and images."""
    rows = class_rows(scores, analysis)
    metrics: dict[str, object] = {key: _number(value) for key, value in scores.means().items()}
    metrics["images"] = scores.images
    if analysis is not None:
        metrics.update(analysis_metrics(analysis))
    if compute is not None:
        metrics["compute"] = dict(compute)
    write_json(paths.metrics, metrics)
    write_text(paths.classes_csv, _csv(rows))
    write_text(paths.classes_md, _markdown(scores, analysis))
    category_rows = [{"category": c, "iou": v, "iiou": scores.category_iiou.get(c, math.nan)}
                     for c, v in scores.category_iou.items()]
    write_text(paths.categories_csv, _csv(category_rows))
    if analysis is not None:
        write_text(paths.images_csv, _csv(analysis.rows, IMAGE_FIELDS))
    write_plots(scores, panels, paths, analysis)
    log.info("class IoU %.4f, iIoU %.4f, category IoU %.4f, iIoU %.4f over %d images -> %s",
             scores.class_iou_mean, scores.class_iiou_mean, scores.category_iou_mean,
             scores.category_iiou_mean, scores.images, paths.metrics)
    if analysis is not None:
        log.info("boundary IoU %.4f, ECE %s%s", analysis.boundary["boundary_miou"],
                 "n/a" if analysis.calibration is None else
                 f"{analysis.calibration['ece']:.4f}",
                 "" if analysis.temperature is None else
                 f" (temperature {analysis.temperature.temperature:.4f}: ECE "
                 f"{analysis.temperature.ece_before:.4f} -> {analysis.temperature.ece_after:.4f}"
                 " on the fitting sample)")


def analysis_metrics(analysis: AnalysisResult) -> dict[str, object]:
    """The analysis' entries of metrics/evaluate.json (null = not defined)."""
    boundary = analysis.boundary
    out: dict[str, object] = {
        "boundary_iou": _number(boundary["boundary_miou"]),
        "trimap_iou": {f"{w}px": _number(v) for w, v in zip(boundary["trimap_widths"],
                                                            boundary["trimap_miou"])},
        "trimap_accuracy": {f"{w}px": _number(v) for w, v in zip(
            boundary["trimap_widths"], boundary["trimap_pixel_accuracy"])},
    }
    if analysis.calibration is not None:
        out["ece"] = _number(analysis.calibration["ece"])
    if analysis.temperature is not None:
        fit = analysis.temperature
        out["calibration"] = {"temperature": fit.temperature, "nll_before": fit.nll_before,
                              "nll_after": fit.nll_after, "ece_before": fit.ece_before,
                              "ece_after": fit.ece_after, "pixels": fit.pixels}
    out["cities"] = {city: {k: _number(v) for k, v in means.items()}
                     for city, means in analysis.cities.items()}
    return out


def write_plots(scores: CityscapesScores, panels: dict[str, np.ndarray], paths: ReportPaths,
                analysis: AnalysisResult | None = None) -> None:
    """The plots folder is rebuilt beside the old one and swapped in whole."""
    final = paths.plots
    with atomic_dir(final) as tmp:
        # every class, so the chart always has its 19 rows; undefined IoU (no pixel of the class
        # in truth or prediction) is left empty, not drawn as a zero bar
        bars = [{"class": name, "iou": "" if math.isnan(value) else value}
                for name, value in scores.class_iou.items()]
        write_text(tmp / CLASS_IOU, _csv(bars))
        confusion_heatmap(tmp / CONFUSION, scores.trainid_confusion())
        for stem, panel in panels.items():
            write_png(tmp / SAMPLES / f"{stem}.png", panel)
        if analysis is None:
            return
        boundary = analysis.boundary
        write_text(tmp / BOUNDARY_IOU, _csv([
            {"class": name, "boundary_iou": "" if math.isnan(v) else v}
            for name, v in zip(CLASS_NAMES, boundary["boundary_iou"])]))
        write_text(tmp / TRIMAP, _csv([
            {"width": w, "trimap_iou": "" if math.isnan(iou) else iou,
             "accuracy": "" if math.isnan(acc) else acc}
            for w, iou, acc in zip(boundary["trimap_widths"], boundary["trimap_miou"],
                                   boundary["trimap_pixel_accuracy"])]))
        if analysis.calibration is not None:  # the bins holding pixels (an empty one would
            # be drawn as a point at 0 and bend the diagram)
            write_text(tmp / RELIABILITY, _csv([
                {"confidence": (row["lower"] + row["upper"]) / 2, "accuracy": row["accuracy"],
                 "mean_confidence": row["confidence"], "pixels": row["count"]}
                for row in analysis.calibration["reliability"] if row["count"]],
                ("confidence", "accuracy", "mean_confidence", "pixels")))
        for rank, (stem, _, panel) in enumerate(analysis.worst, 1):
            write_png(tmp / WORST / f"{rank:02d}_{stem}.png", panel)
