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

from fcn.atomic import atomic_dir, write_json, write_text
from fcn.cityscapes.labels import EVAL_LABELS, ID_TO_TRAINID, TRAINID_TO_ID
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
        scores, panels = evaluate_exported(predictions, root, truth_root, params, max_pixels)
    else:
        predictor = Predictor.from_params(checkpoint, model, params)
        scores, panels = evaluate_model(predictor, root, truth_root, params, max_pixels)
        compute = predictor.flags()
    write_report(scores, panels, paths, compute)
    return scores


def evaluate_model(predictor: Predictor, root: str | Path, truth_root: str | Path,
                   params: EvaluateParams, max_pixels: int = MAX_PIXELS
                   ) -> tuple[CityscapesScores, dict[str, np.ndarray]]:
    """Predict every val image under `root`, score it against the ground truth under
    `truth_root` (generated masks, or the ones shipped with the dataset); also the panels."""
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
    panels: dict[str, np.ndarray] = {}
    stream = predict_stream(predictor, items, load, params.batch_size, params.workers)
    for (image_path, (labels_path, instances_path)), image, (labels, instances), train_ids in tqdm(
            stream, total=len(items), desc="evaluate", unit="img"):
        evaluator.add(TRAINID_TO_ID[train_ids], labels, instances,
                      names=(f"prediction for {image_path}", str(labels_path),
                             str(instances_path)))
        stem = stem_of(image_path)
        if stem in chosen:
            panels[stem] = sample_panel(image, labels, train_ids, params.sample_width)
    return evaluator.scores(), panels


def evaluate_exported(predictions: str | Path, root: str | Path, truth_root: str | Path,
                      params: EvaluateParams, max_pixels: int = MAX_PIXELS
                      ) -> tuple[CityscapesScores, dict[str, np.ndarray]]:
    """Score label-id PNGs under `predictions` (one `<city>_<seq>_<frame>*.png` per val image)."""
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
    scores = evaluate_files(files, instance_scores=True, workers=params.workers,
                            max_pixels=max_pixels)
    panels = {}
    for i in spread(len(files), params.samples):
        predicted_ids = read_labels(files[i].prediction, "prediction", max_pixels)
        panels[stems[i]] = sample_panel(
            read_rgb(images[i], "image", max_pixels),
            read_labels(files[i].labels, "ground-truth labelIds", max_pixels),
            ID_TO_TRAINID[predicted_ids], params.sample_width)
    return scores, panels


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def class_rows(scores: CityscapesScores) -> list[dict[str, object]]:
    """One row per evaluated class (trainId order): the official IoU/iIoU, Dice, accuracy and
    pixel counts (ground truth, and predictions on evaluated ground truth)."""
    cm = scores.confusion
    evaluated = [lab.id for lab in EVAL_LABELS]
    rows = []
    for label in EVAL_LABELS:
        rows.append({
            "class": label.name, "train_id": label.trainId, "label_id": label.id,
            "category": label.category,
            "iou": scores.class_iou[label.name],
            "iiou": scores.class_iiou.get(label.name, math.nan),
            "dice": scores.dice[label.name], "accuracy": scores.accuracy[label.name],
            "gt_pixels": int(cm[label.id].sum()),
            "predicted_pixels": int(cm[evaluated, label.id].sum()),
        })
    return rows


def _csv(rows: Sequence[dict[str, object]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in row.items()}
                     for row in rows)
    return buffer.getvalue()


def _markdown(scores: CityscapesScores) -> str:
    lines = [f"# Evaluation on {SPLIT} ({scores.images} images)", "",
             "Official Cityscapes scores (cityscapesScripts semantics); n/a = not defined.", "",
             "| class | IoU | iIoU | Dice | accuracy | gt pixels |",
             "|---|---:|---:|---:|---:|---:|"]
    for label in EVAL_LABELS:
        name = label.name
        iiou = _cell(scores.class_iiou[name]) if name in scores.class_iiou else ""
        lines.append(f"| {name} | {_cell(scores.class_iou[name])} | {iiou} | "
                     f"{_cell(scores.dice[name])} | {_cell(scores.accuracy[name])} | "
                     f"{int(scores.confusion[label.id].sum())} |")
    lines.append(f"| **mean** | **{_cell(scores.class_iou_mean)}** | "
                 f"**{_cell(scores.class_iiou_mean)}** | **{_cell(scores.mean_dice)}** | "
                 f"**{_cell(scores.mean_pixel_accuracy)}** | |")
    lines += ["", "| category | IoU | iIoU |", "|---|---:|---:|"]
    for category, value in scores.category_iou.items():
        iiou = scores.category_iiou.get(category)
        lines.append(f"| {category} | {_cell(value)} | {'' if iiou is None else _cell(iiou)} |")
    lines.append(f"| **mean** | **{_cell(scores.category_iou_mean)}** | "
                 f"**{_cell(scores.category_iiou_mean)}** |")
    lines += ["", f"Global pixel accuracy: {_cell(scores.pixel_accuracy)}", ""]
    return "\n".join(lines)


def write_report(scores: CityscapesScores, panels: dict[str, np.ndarray],
                 paths: ReportPaths, compute: dict[str, object] | None = None) -> None:
    """Metrics JSON (means; null = not defined; `compute`: how the predictions were computed,
    `fcn.backends.flags`), class/category tables, plot data and images."""
    rows = class_rows(scores)
    metrics: dict[str, object] = {key: _number(value) for key, value in scores.means().items()}
    metrics["images"] = scores.images
    if compute is not None:
        metrics["compute"] = dict(compute)
    write_json(paths.metrics, metrics)
    write_text(paths.classes_csv, _csv(rows))
    write_text(paths.classes_md, _markdown(scores))
    category_rows = [{"category": c, "iou": v, "iiou": scores.category_iiou.get(c, math.nan)}
                     for c, v in scores.category_iou.items()]
    write_text(paths.categories_csv, _csv(category_rows))
    write_plots(scores, panels, paths)
    log.info("class IoU %.4f, iIoU %.4f, category IoU %.4f, iIoU %.4f over %d images -> %s",
             scores.class_iou_mean, scores.class_iiou_mean, scores.category_iou_mean,
             scores.category_iiou_mean, scores.images, paths.metrics)


def write_plots(scores: CityscapesScores, panels: dict[str, np.ndarray], paths: ReportPaths
                ) -> None:
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

