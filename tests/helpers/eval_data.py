"""Test helpers: run cityscapesScripts (the oracle), make ground truth as it does, and make
checkpoints whose predictions are worth scoring."""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import numpy as np
from PIL import Image

from fcn.cityscapes.annotations import read_annotation
from fcn.cityscapes.layout import mask_path, stem_of
from fcn.masks.render import draw_label_ids
from fcn.params import SynthesizeParams

if not hasattr(np, "in1d"):  # cityscapesscripts 2.3.0 still calls np.in1d (removed in numpy 2.4)
    np.in1d = np.isin  # type: ignore[attr-defined]


def official_evaluation(gt_label_files: list[Path], prediction_files: list[Path] | None = None
                        ) -> dict:
    """cityscapesScripts' evalPixelLevelSemanticLabeling with instance scores on.

    Without `prediction_files` it finds each prediction itself, as the server does: under
    $CITYSCAPES_RESULTS (set it first), by `<city>_<seq>_<frame>*.png`.
    """
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cs

    args = copy.copy(cs.args)
    args.evalInstLevelScore = True
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    args.predictionPath = None
    args.predictionWalk = None
    gts = [str(g) for g in gt_label_files]
    with contextlib.redirect_stdout(io.StringIO()):
        preds = ([str(p) for p in prediction_files] if prediction_files is not None
                 else [cs.getPrediction(args, g) for g in gts])
        return cs.evaluateImgLists(preds, gts, args)


def official_instance_ids(polygons: Path) -> np.ndarray:
    """instanceIds as cityscapesScripts' json2instanceImg draws them (array: its PNG save
    fails with Pillow 13)."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage

    annotation = Annotation()
    annotation.fromJsonFile(str(polygons))
    return np.asarray(createInstanceImage(annotation, "ids"))


def write_ground_truth(dataset: Path, out_root: Path, split: str) -> list[Path]:
    """`<out_root>/gtFine/<split>/<city>/<stem>_gtFine_{labelIds,instanceIds}.png` for every
    polygons file of a split; returns the labelIds paths."""
    label_files = []
    for polygons in sorted((dataset / "gtFine" / split).glob("*/*_gtFine_polygons.json")):
        stem = stem_of(polygons)
        labels = mask_path(out_root, split, stem, "labelIds")
        labels.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(draw_label_ids(read_annotation(polygons))).save(labels)
        instances = official_instance_ids(polygons)
        assert instances.max() < 2**16
        Image.fromarray(instances.astype(np.uint16)).save(mask_path(out_root, split, stem,
                                                                    "instanceIds"))
        label_files.append(labels)
    return label_files


def save_checkpoint(path: Path, model, model_params=None, num_classes: int = 19,
                    **extra) -> Path:
    """A checkpoint as the train stage writes it: state dict, model params, classes, epoch."""
    import dataclasses

    import torch

    from fcn.params import ModelParams

    model_params = model_params or ModelParams()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_params": dataclasses.asdict(model_params),
                "num_classes": num_classes, "epoch": 0, **extra}, path)
    return path


def probe_model(dataset: Path, generated: Path, split: str = "train", seed: int = 0):
    """A random FCN8s whose pool3 score layer is fitted by ridge regression to the ground truth
    of `split`: cheap (seconds), and its predictions are non-trivial (most classes, ~60% of
    pixels right), which is what comparing scores needs."""
    import torch
    import torch.nn.functional as F

    from fcn.images import read_rgb
    from fcn.cityscapes.labels import ID_TO_TRAINID
    from fcn.cityscapes.layout import list_images

    torch.manual_seed(seed)
    from fcn.model import FCN8s

    model = FCN8s("vgg11_bn", 19).eval()
    images = list_images(dataset, split)
    x = torch.from_numpy(np.stack([read_rgb(p) for p in images])).permute(0, 3, 1, 2) / 255
    targets = np.stack([ID_TO_TRAINID[np.asarray(Image.open(
        mask_path(generated, split, stem_of(p), "labelIds")))] for p in images])
    with torch.no_grad():
        features = model.to_pool3((x - model.mean) / model.std)
    t = torch.from_numpy(targets[:, 4::8, 4::8]).long().reshape(-1)  # pool3 cell centres
    f = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double()
    keep = t != 255
    a = torch.cat([f[keep], torch.ones(int(keep.sum()), 1, dtype=torch.double)], 1)
    w = torch.linalg.solve(a.T @ a + 0.1 * torch.eye(a.shape[1], dtype=torch.double),
                           a.T @ F.one_hot(t[keep], 19).double())
    with torch.no_grad():
        model.score_pool3.weight.copy_(w[:-1].T.float()[:, :, None, None])
        model.score_pool3.bias.copy_(w[-1].float())
    return model


def assert_agrees(ours, theirs: dict, tol: float = 1e-9) -> None:
    """Our CityscapesScores equal the official result dict, per class/category and in the
    means (NaN where, and only where, the official script has NaN)."""
    import math

    def same(a: float, b: float) -> bool:
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol

    pairs = [(ours.class_iou, theirs["classScores"]),
             (ours.class_iiou, theirs["classInstScores"]),
             (ours.category_iou, theirs["categoryScores"]),
             (ours.category_iiou, theirs["categoryInstScores"])]
    for mine, official in pairs:
        for name, value in mine.items():
            assert same(value, official[name]), (name, value, official[name])
        for name, value in official.items():  # what we leave out, the script leaves undefined
            assert name in mine or math.isnan(value), (name, value)
    means = [(ours.class_iou_mean, theirs["averageScoreClasses"]),
             (ours.class_iiou_mean, theirs["averageScoreInstClasses"]),
             (ours.category_iou_mean, theirs["averageScoreCategories"]),
             (ours.category_iiou_mean, theirs["averageScoreInstCategories"])]
    for mine_mean, official_mean in means:
        assert same(mine_mean, official_mean), (mine_mean, official_mean)
    assert np.array_equal(ours.confusion, np.array(theirs["confMatrix"], dtype=np.int64))


EVAL_SET = SynthesizeParams(seed=11, height=64, width=128, train_cities=["aachen", "bochum"],
                            val_cities=["frankfurt", "lindau"], test_cities=["berlin", "bonn"],
                            train_per_city=3, val_per_city=3, test_per_city=2,
                            train_extra_cities=[])
_CACHE: dict[str, object] = {}


class EvalData:
    """A small dataset with ground truth for train and val, and a fitted probe checkpoint."""

    def __init__(self, base: Path) -> None:
        import torch  # noqa: F401  (probe_model needs it)

        from fcn.synthetic import synthesize

        self.root = base / "cityscapes"
        self.generated = base / "generated"
        synthesize(self.root, EVAL_SET)
        write_ground_truth(self.root, self.generated, "train")
        self.val_labels = write_ground_truth(self.root, self.generated, "val")
        self.models = base / "models"
        self.checkpoint = save_checkpoint(self.models / "best.pt",
                                          probe_model(self.root, self.generated))


def eval_data(tmp_path_factory) -> EvalData:
    """One EvalData per test session (read-only for tests), whichever module asks first."""
    if "data" not in _CACHE:
        _CACHE["data"] = EvalData(tmp_path_factory.mktemp("evaldata"))
    return _CACHE["data"]  # type: ignore[return-value]


def predict_in_process(checkpoint: Path, *args: str) -> int:
    """`fcn-predict` in-process (its main: argument parsing, run_stage's one-line errors) on
    the CPU with one worker; its exit code."""
    from fcn.predict.cli import main

    try:
        main(["--checkpoint", str(checkpoint), "--device", "cpu", "--workers", "1", *args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
