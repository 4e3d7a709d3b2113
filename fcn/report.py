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

from fcn.evaluation import (CityscapesEvaluator, CityscapesScores, EvalFiles, evaluate_files,
                            ground_truth_files, match_predictions, read_label_png)
from fcn.inference import Predictor, predict_stream, read_image
from fcn.io import atomic_dir, write_json, write_text
from fcn.labels import EVAL_LABELS, ID_TO_TRAINID, TRAINID_TO_ID
from fcn.layout import list_images, stem_of
from fcn.params import DataParams, EvaluateParams
from fcn.visualize import confusion_heatmap, sample_panel, spread, write_png

log = logging.getLogger(__name__)

SPLIT = "val"


@dataclass(frozen=True)
class ReportPaths:
    """Where the evaluate stage writes (relative to the working directory by default)."""

    metrics: Path = Path("metrics/evaluate.json")
    classes_csv: Path = Path("metrics/evaluate_classes.csv")
    classes_md: Path = Path("metrics/evaluate_classes.md")
    categories_csv: Path = Path("metrics/evaluate_categories.csv")
    plots: Path = Path("plots/evaluate")

    @property
    def class_iou(self) -> Path:
        return self.plots / "class_iou.csv"

    @property
    def confusion(self) -> Path:
        return self.plots / "confusion.png"

    @property
    def samples(self) -> Path:
        return self.plots / "samples"


def ground_truth_root(data: DataParams, evaluate: EvaluateParams) -> Path:
    """Generated masks by default; `dataset` scores against the masks shipped in data.root
    (real Cityscapes), which is what the official server compares with."""
    return Path(data.generated if evaluate.ground_truth == "generated" else data.root)


def evaluate_model(predictor: Predictor, data: DataParams, params: EvaluateParams
                   ) -> tuple[CityscapesScores, dict[str, np.ndarray]]:
    """Predict every val image, score it against its ground truth; also the sample panels."""
    images = list_images(data.root, SPLIT)
    stems = [stem_of(p) for p in images]
    truth = ground_truth_files(ground_truth_root(data, params), SPLIT, stems)
    items = list(zip(images, truth))
    chosen = {stems[i] for i in spread(len(items), params.samples)}

    def load(item: tuple[Path, tuple[Path, Path | None]]):
        image, (labels, instances) = item
        return read_image(image), (read_label_png(labels, "ground-truth labelIds"),
                                   read_label_png(instances, "ground-truth instanceIds"))

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


def evaluate_exported(predictions: str | Path, data: DataParams, params: EvaluateParams
                      ) -> tuple[CityscapesScores, dict[str, np.ndarray]]:
    """Score label-id PNGs under `predictions` (one `<city>_<seq>_<frame>*.png` per val image)."""
    images = list_images(data.root, SPLIT)
    stems = [stem_of(p) for p in images]
    truth = ground_truth_files(ground_truth_root(data, params), SPLIT, stems)
    found = match_predictions(predictions, [labels for labels, _ in truth])
    files = [EvalFiles(p, labels, instances) for p, (labels, instances) in zip(found, truth)]
    scores = evaluate_files(files, instance_scores=True, workers=params.workers)
    panels = {}
    for i in spread(len(files), params.samples):
        predicted_ids = read_label_png(files[i].prediction, "prediction")
        panels[stems[i]] = sample_panel(read_image(images[i]),
                                        read_label_png(files[i].labels, "ground-truth labelIds"),
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
                 paths: ReportPaths = ReportPaths()) -> None:
    """Metrics JSON (means; null = not defined), class/category tables, plot data and images."""
    rows = class_rows(scores)
    metrics = {key: _number(value) for key, value in scores.means().items()}
    metrics["images"] = scores.images
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
        write_text(tmp / paths.class_iou.name, _csv(bars))
        confusion_heatmap(tmp / paths.confusion.name, scores.trainid_confusion())
        for stem, panel in panels.items():
            write_png(tmp / paths.samples.name / f"{stem}.png", panel)

