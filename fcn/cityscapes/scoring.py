"""The official Cityscapes pixel-level scores, as `evalPixelLevelSemanticLabeling.py` computes them.

Everything is accumulated per image into exact sums (a label-id confusion matrix and weighted
instance counts), so any number of images can be scored without keeping them, and the scores
agree with cityscapesScripts to floating-point rounding (tests hold them to 1e-9):

- confusion matrix over the 34 label ids, rows = ground truth, columns = prediction;
- class IoU = TP / (TP + FP + FN): FP counts only pixels whose ground truth is an evaluated
  class, FN is the whole ground-truth row minus TP (predicting an ignored label still misses);
- iIoU weights each ground-truth instance's TP/FN pixels by avgClassSize[class] / instance size
  (the script's fixed table), with the class's plain FP; only instance ids > 1000 count;
- category IoU/iIoU do the same over categories (iIoU only where every label has instances);
- means are over the defined (non-NaN) entries.

Where the script is wrong for us we differ on purpose: scores that were not computed are NaN
(it reports iIoU 0.0 without instances), and label ids outside the table are a clear error
naming the file (it crashes with IndexError, or KeyError for instance ids).
Pixel accuracy and Dice come from the same matrix through `fcn.metrics`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fcn.errors import DataError
from fcn.cityscapes.labels import CATEGORIES, EVAL_LABELS, ID_TO_LABEL, LABELS, MAX_ID, NUM_IDS
from fcn.cityscapes.layout import PREDICTION_PATTERN, mask_path, stem_of
from fcn.metrics import class_scores
from fcn.threads import read_ahead
from fcn.images import MAX_PIXELS, read_labels

log = logging.getLogger(__name__)

AVG_CLASS_SIZE: dict[str, float] = {
    "bicycle": 4672.3249222261,
    "caravan": 36771.8241758242,
    "motorcycle": 6298.7200839748,
    "rider": 3930.4788056518,
    "bus": 35732.1511111111,
    "train": 67583.7075812274,
    "car": 12794.0202738185,
    "person": 3462.4756337644,
    "truck": 27855.1264367816,
    "trailer": 16926.9763313609,
}
"""Average instance size (pixels) per class, fixed by the official script: the iIoU weights."""

INSTANCE_ID_OFFSET = 1000
"""instanceIds encode `labelId * 1000 + k`; the script counts only values above 1000."""

_TABLE = [lab for lab in LABELS if lab.id >= 0]
_EVALUATED = np.array([not ID_TO_LABEL[i].ignoreInEval for i in range(NUM_IDS)])
_CATEGORY_OF_ID = np.array([ID_TO_LABEL[i].category for i in range(NUM_IDS)])


def _all_instances(category: str) -> bool:
    return all(lab.hasInstances for lab in _TABLE if lab.category == category)


INSTANCE_CATEGORIES: tuple[str, ...] = tuple(c for c in CATEGORIES if _all_instances(c))
"""Categories whose labels all have instances (human, vehicle): the only ones with an iIoU."""

# Per label id: the iIoU weight numerator (NaN = not an instance class of the script's table).
_AVG_SIZE = np.array([AVG_CLASS_SIZE.get(ID_TO_LABEL[i].name, math.nan) for i in range(NUM_IDS)])
# Per label id: index into INSTANCE_CATEGORIES + 1, or 0 when the category has no iIoU.
_INSTANCE_CATEGORY = np.zeros(NUM_IDS, dtype=np.intp)
for _label in _TABLE:
    if _label.category in INSTANCE_CATEGORIES:
        _INSTANCE_CATEGORY[_label.id] = INSTANCE_CATEGORIES.index(_label.category) + 1
_SCORED_INSTANCE = np.array(
    [ID_TO_LABEL[i].hasInstances and not ID_TO_LABEL[i].ignoreInEval for i in range(NUM_IDS)])


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator != 0 else math.nan


@dataclass(frozen=True)
class CityscapesScores:
    """The official scores (dicts keyed by class/category name) plus Dice and pixel accuracy."""

    class_iou: dict[str, float]
    class_iiou: dict[str, float]
    category_iou: dict[str, float]
    category_iiou: dict[str, float]
    dice: dict[str, float]
    accuracy: dict[str, float]
    confusion: np.ndarray = field(repr=False)
    images: int = 0

    @property
    def class_iou_mean(self) -> float:
        return _nanmean(list(self.class_iou.values()))

    @property
    def class_iiou_mean(self) -> float:
        return _nanmean(list(self.class_iiou.values()))

    @property
    def category_iou_mean(self) -> float:
        return _nanmean(list(self.category_iou.values()))

    @property
    def category_iiou_mean(self) -> float:
        return _nanmean(list(self.category_iiou.values()))

    @property
    def mean_dice(self) -> float:
        return _nanmean(list(self.dice.values()))

    @property
    def mean_pixel_accuracy(self) -> float:
        """Mean over classes of per-class pixel accuracy (recall)."""
        return _nanmean(list(self.accuracy.values()))

    @property
    def pixel_accuracy(self) -> float:
        """Correct pixels / pixels whose ground truth is an evaluated class."""
        ids = [lab.id for lab in EVAL_LABELS]
        evaluated = self.confusion[ids].sum()
        return float(self.confusion[ids, ids].sum() / evaluated) if evaluated else math.nan

    def trainid_confusion(self) -> np.ndarray:
        """int64[19, 19] pixel counts in trainId order (ground truth of ignored labels and
        predictions of ignored labels left out): what the heatmap shows."""
        ids = [lab.id for lab in EVAL_LABELS]
        return self.confusion[np.ix_(ids, ids)]

    def means(self) -> dict[str, float]:
        return {
            "class_iou_mean": self.class_iou_mean,
            "class_iiou_mean": self.class_iiou_mean,
            "category_iou_mean": self.category_iou_mean,
            "category_iiou_mean": self.category_iiou_mean,
            "mean_dice": self.mean_dice,
            "mean_pixel_accuracy": self.mean_pixel_accuracy,
            "pixel_accuracy": self.pixel_accuracy,
        }


class CityscapesEvaluator:
    """Accumulates images into exact sums; `scores()` turns them into the official scores.

    `instance_scores=False` skips instanceIds: iIoU is then NaN ("not computed"), never 0.
    """

    def __init__(self, instance_scores: bool = True) -> None:
        self.instance_scores = instance_scores
        self.confusion = np.zeros((NUM_IDS, NUM_IDS), dtype=np.int64)
        self.class_tp = np.zeros(NUM_IDS)  # weighted, per label id
        self.class_fn = np.zeros(NUM_IDS)
        self.category_tp = np.zeros(len(INSTANCE_CATEGORIES) + 1)  # weighted, index 0 unused
        self.category_fn = np.zeros(len(INSTANCE_CATEGORIES) + 1)
        self.images = 0

    def add(self, prediction: np.ndarray, ground_truth: np.ndarray,
            instances: np.ndarray | None = None, *, names: Sequence[str] = ()) -> None:
        """Add one image: label-id arrays of equal shape (+ its instanceIds if scored).

        `names` (prediction, ground truth, instances) name the sources in error messages.
        """
        defaults = ["prediction", "ground truth", "instances"]
        pred_name, gt_name, inst_name = (list(names) + defaults[len(names):])[:3]
        if prediction.shape != ground_truth.shape:
            raise DataError(f"{pred_name}: prediction is {_size(prediction)} but its ground truth "
                            f"{gt_name} is {_size(ground_truth)}")
        check_ids(prediction, pred_name, "prediction")
        check_ids(ground_truth, gt_name, "ground truth")
        arrays = [prediction, ground_truth]
        if self.instance_scores:
            if instances is None:
                raise ValueError("instance scores are on: every image needs its instanceIds")
            if instances.shape != ground_truth.shape:
                raise DataError(f"{inst_name}: instanceIds are {_size(instances)} but the label "
                                f"ids {gt_name} are {_size(ground_truth)}")
            arrays.append(instances)
        pred, gt, *inst, weights = _runs(arrays)
        key = gt.astype(np.intp) * NUM_IDS + pred
        counts = _count(key, weights, NUM_IDS * NUM_IDS)
        if inst:
            self._add_instances(pred, inst[0], weights, inst_name)
        self.confusion += counts.reshape(NUM_IDS, NUM_IDS)
        self.images += 1

    def _add_instances(self, pred: np.ndarray, instances: np.ndarray,
                       weights: np.ndarray | None, name: str) -> None:
        """Per-instance TP/FN pixel counts, weighted as the script weights them."""
        inside = instances > INSTANCE_ID_OFFSET
        if not inside.any():
            return
        ids = instances[inside].astype(np.intp)
        predicted = pred[inside].astype(np.intp)
        weights = weights[inside] if weights is not None else None
        labels_of = ids // INSTANCE_ID_OFFSET
        if labels_of.max() > MAX_ID:
            bad = sorted({int(i) for i in np.unique(ids[labels_of > MAX_ID])[:5]})
            raise DataError(f"{name}: instance ids {bad} encode label ids above {MAX_ID} "
                            "(instance id = label id * 1000 + k)")
        sizes = _count(ids, weights, 0)
        hit = predicted == labels_of
        hits = _count(ids[hit], None if weights is None else weights[hit], sizes.size)
        same_category = ((_INSTANCE_CATEGORY[predicted] == _INSTANCE_CATEGORY[labels_of])
                         & (_INSTANCE_CATEGORY[labels_of] > 0))
        category_hits = _count(ids[same_category],
                               None if weights is None else weights[same_category], sizes.size)
        present = np.flatnonzero(sizes)
        label_ids = present // INSTANCE_ID_OFFSET
        keep = _EVALUATED[label_ids]  # the script skips instances of ignored labels
        unscored = keep & ~_SCORED_INSTANCE[label_ids]
        if unscored.any():
            inst = int(present[unscored][0])
            raise DataError(f"{name}: instance id {inst} belongs to "
                            f"'{ID_TO_LABEL[inst // INSTANCE_ID_OFFSET].name}', a class without "
                            "instances (only label id * 1000 + k of instance classes are valid)")
        present, label_ids = present[keep], label_ids[keep]
        size = sizes[present].astype(np.float64)
        weight = _AVG_SIZE[label_ids] / size
        tp = hits[present].astype(np.float64)
        np.add.at(self.class_tp, label_ids, tp * weight)
        np.add.at(self.class_fn, label_ids, (size - tp) * weight)
        category = _INSTANCE_CATEGORY[label_ids]
        in_category = category > 0
        category_tp = category_hits[present].astype(np.float64)
        np.add.at(self.category_tp, category[in_category], (category_tp * weight)[in_category])
        np.add.at(self.category_fn, category[in_category],
                  ((size - category_tp) * weight)[in_category])

    def scores(self) -> CityscapesScores:
        cm = self.confusion
        evaluated_rows = cm[_EVALUATED]
        class_iou, class_iiou = {}, {}
        for label in EVAL_LABELS:
            i = label.id
            tp = int(cm[i, i])
            fn = int(cm[i].sum()) - tp
            fp = int(evaluated_rows[:, i].sum()) - tp
            class_iou[label.name] = _ratio(tp, tp + fp + fn)
            if label.hasInstances:
                if self.instance_scores:
                    tp_w, fn_w = self.class_tp[i], self.class_fn[i]
                    class_iiou[label.name] = _ratio(tp_w, tp_w + fp + fn_w)
                else:
                    class_iiou[label.name] = math.nan
        category_iou, category_iiou = {}, {}
        for category in CATEGORIES:
            members = [lab.id for lab in EVAL_LABELS if lab.category == category]
            outside_rows = cm[_EVALUATED & (_CATEGORY_OF_ID != category)]
            tp = int(cm[np.ix_(members, members)].sum())
            fn = int(cm[members].sum()) - tp
            fp = int(outside_rows[:, members].sum())
            category_iou[category] = _ratio(tp, tp + fp + fn)
            if category in INSTANCE_CATEGORIES:
                if not self.instance_scores:
                    category_iiou[category] = math.nan
                    continue
                # the script's category iIoU counts FP over *all* the category's labels,
                # ignored ones (caravan, trailer) included
                all_members = [lab.id for lab in _TABLE if lab.category == category]
                fp_all = int(outside_rows[:, all_members].sum())
                k = INSTANCE_CATEGORIES.index(category) + 1
                tp_w, fn_w = self.category_tp[k], self.category_fn[k]
                category_iiou[category] = _ratio(tp_w, tp_w + fp_all + fn_w)
        # Dice and accuracy per trainId class, from the same matrix: predictions of ignored
        # labels are misses (an extra column), ground truth of ignored labels is left out.
        ids = [lab.id for lab in EVAL_LABELS]
        square = np.zeros((len(ids) + 1, len(ids) + 1), dtype=np.int64)
        square[: len(ids), : len(ids)] = cm[np.ix_(ids, ids)]
        square[: len(ids), -1] = cm[ids].sum(axis=1) - square[: len(ids), : len(ids)].sum(axis=1)
        pixel = class_scores(square)
        names = [lab.name for lab in EVAL_LABELS]
        return CityscapesScores(
            class_iou=class_iou, class_iiou=class_iiou,
            category_iou=category_iou, category_iiou=category_iiou,
            dice={n: float(v) for n, v in zip(names, pixel["dice"][: len(ids)])},
            accuracy={n: float(v) for n, v in zip(names, pixel["accuracy"][: len(ids)])},
            confusion=cm.copy(), images=self.images,
        )


def _runs(arrays: Sequence[np.ndarray]) -> list:
    """Run-length encode arrays jointly (row-major): the value of each at every run start, plus
    the run lengths. Label maps are piecewise constant, so a 1024x2048 image has some 10^4 runs
    and everything after this costs next to nothing; when runs are not much fewer than pixels
    (noise), the pixels themselves are returned with lengths None."""
    flat = [np.ravel(a) for a in arrays]
    size = flat[0].size
    change = np.empty(size, dtype=bool)
    change[:1] = True
    np.not_equal(flat[0][1:], flat[0][:-1], out=change[1:])
    for values in flat[1:]:
        change[1:] |= values[1:] != values[:-1]
    starts = np.flatnonzero(change)
    if starts.size > size // 4:
        return [*flat, None]
    lengths = np.diff(starts, append=size)
    return [*(values[starts] for values in flat), lengths]


def _count(keys: np.ndarray, weights: np.ndarray | None, minlength: int) -> np.ndarray:
    """Exact int64 counts of `keys`, each counted `weights` times (run lengths) if given."""
    if weights is None:
        return np.bincount(keys, minlength=minlength)
    # float64 sums of integers below 2**53 are exact; round-trip to int64
    return np.rint(np.bincount(keys, weights=weights, minlength=minlength)).astype(np.int64)


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}" if array.ndim >= 2 else str(array.shape)


def check_ids(array: np.ndarray, name: str, what: str) -> None:
    """Label ids must lie in the table (0..33): anything else is an error naming the file."""
    if array.size == 0:
        return
    high = int(array.max())
    low = 0 if array.dtype.kind in "ub" else int(array.min())
    if low >= 0 and high <= MAX_ID:
        return
    bad_mask = (array < 0) | (array > MAX_ID)
    bad = [int(v) for v in np.unique(array[bad_mask])[:8]]
    y, x = (int(v) for v in np.argwhere(bad_mask)[0][:2])
    raise DataError(f"{name}: {what} holds ids outside the Cityscapes label table (0..{MAX_ID}): "
                    f"{bad} (first at x={x}, y={y}); predictions must be label ids, not trainIds")


@dataclass(frozen=True)
class EvalFiles:
    """One image's files: our/any prediction and its ground truth (instanceIds if scored)."""

    prediction: Path
    labels: Path
    instances: Path | None = None


def ground_truth_files(gt_root: str | Path, split: str, stems: Sequence[str],
                       instance_scores: bool = True) -> list[tuple[Path, Path | None]]:
    """(labelIds, instanceIds) paths for each stem under `<gt_root>/gtFine/<split>/`; every
    missing file is an error (checked before any work, so a long run cannot die at the end)."""
    pairs = []
    for stem in stems:
        labels = mask_path(gt_root, split, stem, "labelIds")
        instances = mask_path(gt_root, split, stem, "instanceIds") if instance_scores else None
        pairs.append((labels, instances))
    require_files([p for pair in pairs for p in pair if p is not None], "ground-truth")
    return pairs


def require_files(paths: Sequence[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}: {what} file not found{more}")


def match_predictions(folder: str | Path, label_files: Sequence[Path]) -> list[Path]:
    """The prediction of each ground-truth file, found as the official script and server find
    it: exactly one `<city>_<seq>_<frame>*.png` anywhere under `folder`; none or several is an
    error naming the ground-truth file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: prediction folder not found")
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*.png")):
        match = PREDICTION_PATTERN.fullmatch(path.name)
        if match:
            found.setdefault(match.group(1), []).append(path)
    predictions = []
    for labels in label_files:
        candidates = found.get(stem_of(labels), [])
        if not candidates:
            raise DataError(f"{labels}: no prediction file {stem_of(labels)}*.png under {folder}")
        if len(candidates) > 1:
            raise DataError(f"{labels}: several predictions match {stem_of(labels)}*.png: "
                            + ", ".join(str(c) for c in candidates[:4]))
        predictions.append(candidates[0])
    return predictions


def _load(files: EvalFiles, max_pixels: int = MAX_PIXELS
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    prediction = read_labels(files.prediction, "prediction", max_pixels)
    labels = read_labels(files.labels, "ground-truth labelIds", max_pixels)
    instances = (read_labels(files.instances, "ground-truth instanceIds", max_pixels)
                 if files.instances is not None else None)
    return prediction, labels, instances


def evaluate_files(files: Sequence[EvalFiles], instance_scores: bool = True,
                   workers: int = 2, max_pixels: int = MAX_PIXELS,
                   each: Callable[[int, np.ndarray, np.ndarray], None] | None = None
                   ) -> CityscapesScores:
    """Score prediction PNGs against ground-truth PNGs (files decoded `workers` at a time;
    each refused above `max_pixels` pixels from its header, before decoding). `each(index,
    prediction, labels)` (label-id arrays, checked) sees every file pair after it is scored."""
    if instance_scores and any(f.instances is None for f in files):
        raise ValueError("instance scores are on: every item needs its instanceIds file")
    require_files([p for f in files for p in (f.prediction, f.labels, f.instances)
                   if p is not None], "input")
    evaluator = CityscapesEvaluator(instance_scores)
    stream = read_ahead(functools.partial(_load, max_pixels=max_pixels), files, workers=workers)
    for index, (item, (prediction, labels, instances)) in enumerate(tqdm(
            stream, total=len(files), desc="evaluate", unit="img", leave=False)):
        evaluator.add(prediction, labels, instances,
                      names=(str(item.prediction), str(item.labels), str(item.instances)))
        if each is not None:
            each(index, prediction, labels)
    check_not_train_ids(evaluator.confusion, [str(f.prediction) for f in files])
    return evaluator.scores()


MOSTLY_UNSCORED = 0.5
"""Share of predicted pixels on label ids that no class is scored on (the void and ignored
labels) above which prediction files are refused: such files are trainIds or colour indices,
which the official evaluator scores silently as near 0."""


def check_not_train_ids(confusion: np.ndarray, predictions: Sequence[str]) -> None:
    """Refuse predictions whose pixels are mostly label ids no class is scored on: a trainId
    map (road = 0, sidewalk = 1, …) passes the id check (0..18 are label ids too) and would be
    scored as void everywhere."""
    total = int(confusion.sum())
    unscored = int(confusion[:, ~_EVALUATED].sum())
    if total and unscored > MOSTLY_UNSCORED * total:
        ids = [int(i) for i in np.flatnonzero(~_EVALUATED)]
        where = (predictions[0] if len(predictions) == 1
                 else f"{len(predictions)} predictions (e.g. {predictions[0]})")
        raise DataError(f"{where}: {unscored / total:.0%} of the predicted pixels are label "
                        f"ids no class is scored on ({ids}): they look like trainIds or colour "
                        "indices; predictions must be label ids (trainId -> label id: "
                        "fcn.cityscapes.labels.TRAINID_TO_ID, as stages/export.py writes them)")
