"""Cityscapes' coarse annotations (gtCoarse, train_extra) as cityscapesScripts treats them: the
layout's names, the synthetic coarse set, masks pixel-identical to `createTrainIdLabelImgs`
(which renders gtFine and gtCoarse alike), training sources, and the coarse -> fine phases."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.annotation import Annotation as CsAnnotation
from cityscapesscripts.preparation import createTrainIdLabelImgs
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from PIL import Image

from fcn.cityscapes import layout
from fcn.cityscapes.annotations import read_annotation
from fcn.errors import DataError, ParamsError
from fcn.images import read_labels
from fcn.masks.generate import masks_stage
from fcn.params import default_params_dict, parse_params, phase_train
from fcn.synthetic import synthesize
from fcn.train.data import SegmentationDataset

from helpers.tiny import TINY, with_changes

COARSE = layout.COARSE


# --- names ------------------------------------------------------------------------------------

def test_coarse_files_have_the_official_names():
    stem = "erlangen_000001_000019"
    assert layout.polygons_path("r", "train_extra", stem, COARSE) == Path(
        "r/gtCoarse/train_extra/erlangen/erlangen_000001_000019_gtCoarse_polygons.json")
    assert layout.mask_path("g", "val", stem, "labelTrainIds", COARSE) == Path(
        "g/gtCoarse/val/erlangen/erlangen_000001_000019_gtCoarse_labelTrainIds.png")
    assert layout.mask_path("g", "val", stem, "color") == Path(
        "g/gtFine/val/erlangen/erlangen_000001_000019_gtFine_color.png")  # gtFine by default
    assert layout.is_mask_file(Path(f"gtCoarse/train/erlangen/{stem}_gtCoarse_instanceIds.png"))
    assert not layout.is_mask_file(Path(f"gtCoarse/train/erlangen/{stem}_gtFine_instanceIds.png"))
    assert not layout.is_mask_file(Path(f"gtMedium/train/erlangen/{stem}_gtMedium_color.png"))


@pytest.mark.parametrize(("source", "expected"), [
    ("train", ("train", "gtFine")), ("val", ("val", "gtFine")),
    ("gtFine/train", ("train", "gtFine")), ("gtCoarse/train_extra", ("train_extra", "gtCoarse")),
    ("gtCoarse/val", ("val", "gtCoarse"))])
def test_a_source_names_a_split_of_an_annotation_set(source, expected):
    assert layout.parse_source(source) == expected


@pytest.mark.parametrize(("source", "message"), [
    ("test", "no annotations"), ("gtCoarse/test", "gtCoarse has no split 'test'"),
    ("train_extra", "gtFine has no split 'train_extra'"),
    ("gtMedium/train", "unknown annotation set 'gtMedium'")])
def test_a_source_without_annotations_is_refused(source, message):
    with pytest.raises(ValueError, match=message):
        layout.parse_source(source)


# --- the synthetic coarse set -----------------------------------------------------------------

def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_coarse_annotations_are_coarser_and_leave_the_fine_set_unchanged(tiny_dataset, tmp_path):
    fine_objects = coarse_objects = 0
    for stem, path in layout.list_annotations(tiny_dataset, "train", COARSE):
        coarse = read_annotation(path)
        fine = read_annotation(layout.polygons_path(tiny_dataset, "train", stem))
        assert (coarse.height, coarse.width) == (fine.height, fine.width)
        fine_objects += len(fine.objects)
        coarse_objects += len(coarse.objects)
        assert all(len(o.polygon) <= 6 for o in coarse.objects
                   if o.label not in ("out of roi", "ego vehicle", "rectification border"))
        # a subsequence of the fine objects: drawing order, labels and deleted flags kept
        remaining = iter((o.label, o.deleted) for o in fine.objects)
        assert all((o.label, o.deleted) in remaining for o in coarse.objects)
    assert coarse_objects < 0.9 * fine_objects  # fewer objects, as gtCoarse has
    deleted = [o for _, path in layout.list_annotations(tiny_dataset, "train", COARSE)
               for o in read_annotation(path).objects if o.deleted]
    assert deleted  # the hard cases reach the coarse set too
    assert not (tiny_dataset / "gtFine" / "train_extra").exists()
    assert not (tiny_dataset / "gtCoarse" / "test").exists()
    # the coarse set draws from its own generators: without it, every other byte is the same
    without = tmp_path / "without"
    synthesize(without, with_changes(TINY, coarse=False))
    expected = {f: d for f, d in _digests(tiny_dataset).items() if not f.startswith("gtCoarse/")}
    assert _digests(without) == expected


# --- masks, as cityscapesScripts draws them ---------------------------------------------------

def _hard_case(root: Path) -> str:
    """A coarse annotation in train_extra with what makes rendering hard: overlaps drawn in file
    order, deleted objects, group labels, an unknown-to-trainId label, polygons off the image."""
    stem = "erlangen_000009_000019"
    objects = [
        {"label": "road", "polygon": [[-5, 30], [70, 30], [70, 70], [-5, 70]], "deleted": 0},
        {"label": "car", "polygon": [[10, 20], [40, 20], [40, 50], [10, 50]], "deleted": 0},
        {"label": "cargroup", "polygon": [[30, 25], [60, 25], [60, 45]], "deleted": 0},
        {"label": "person", "polygon": [[12, 10], [20, 10], [20, 40], [12, 40]], "deleted": 1},
        {"label": "persongroup", "polygon": [[44, 5], [52, 5], [52, 35]], "deleted": 0},
        {"label": "license plate", "polygon": [[20, 44], [30, 44], [30, 48], [20, 48]],
         "deleted": 0},
        {"label": "rider", "polygon": [[50, 0], [200, 0], [200, 80]], "deleted": 0},
        {"label": "out of roi", "polygon": [[0, 0], [64, 0], [64, 2], [0, 2]], "deleted": 0},
    ]
    path = layout.polygons_path(root, "train_extra", stem, COARSE)
    path.write_text(json.dumps({"imgHeight": 64, "imgWidth": 128, "objects": objects}))
    image = layout.image_path(root, "train_extra", stem)
    Image.new("RGB", (128, 64)).save(image)
    return stem


def test_coarse_masks_equal_cityscapesscripts_and_the_shipped_ones(tiny_dataset, tmp_path,
                                                                   monkeypatch):
    root, generated = tmp_path / "cityscapes", tmp_path / "generated_coarse"
    shutil.copytree(tiny_dataset, root)
    hard = _hard_case(root)
    # cityscapesScripts' own preparation script: labelTrainIds next to every gtFine and
    # gtCoarse polygon file (its glob: <set>/*/*/*_gt*_polygons.json)
    monkeypatch.setenv("CITYSCAPES_DATASET", str(root))
    createTrainIdLabelImgs.main()
    report = masks_stage(root, generated, list(layout.ENCODINGS), ["train", "train_extra", "val"],
                         1, 3, 1, tmp_path / "masks.json", tmp_path / "plots", annotation=COARSE)
    assert report["per_split"] == {"train": 6, "train_extra": 3, "val": 2}
    assert report["agreement"]["labelTrainIds"]["overall"] == 1.0  # the shipped (theirs) ones
    assert report["shipped_masks"] == 11
    for split in ("train", "train_extra", "val"):
        for stem, path in layout.list_annotations(root, split, COARSE):
            ours = read_labels(layout.mask_path(generated, split, stem, "labelTrainIds", COARSE),
                               "mask")
            theirs = read_labels(layout.mask_path(root, split, stem, "labelTrainIds", COARSE),
                                 "mask")
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{split}/{stem}")
    # every encoding of the hard case, against cityscapesScripts' renderers
    polygons = layout.polygons_path(root, "train_extra", hard, COARSE)
    annotation = CsAnnotation()
    annotation.fromJsonFile(str(polygons))
    theirs = {"labelIds": np.asarray(createLabelImage(annotation, "ids")),
              "color": np.asarray(createLabelImage(annotation, "color")),
              "instanceIds": np.asarray(createInstanceImage(annotation, "ids"))}
    for encoding, expected in theirs.items():
        mask = layout.mask_path(generated, "train_extra", hard, encoding, COARSE)
        with Image.open(mask) as image:
            np.testing.assert_array_equal(np.asarray(image), expected, err_msg=encoding)
    assert len(np.unique(theirs["instanceIds"])) >= 4  # the case is not trivially empty


# --- training sources and phases --------------------------------------------------------------

@pytest.fixture(scope="module")
def coarse_masks(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coarse") / "generated_coarse"
    masks_stage(tiny_dataset, out, ["labelTrainIds"], ["train", "train_extra", "val"], 1, 0, 0,
                out.parent / "masks.json", out.parent / "plots", annotation=COARSE)
    return out


def test_training_reads_coarse_sources_from_the_coarse_masks(tiny_dataset, masks,
                                                             coarse_masks):
    both = SegmentationDataset(tiny_dataset, masks, ["gtCoarse/train", "gtCoarse/train_extra"],
                               generated_coarse=coarse_masks)
    assert len(both) == 6 + 2
    assert [p.mask for p in both.pairs] == sorted(
        layout.mask_path(coarse_masks, split, stem, "labelTrainIds", COARSE)
        for split in ("train", "train_extra")
        for stem, _ in layout.list_annotations(tiny_dataset, split, COARSE))
    fine = SegmentationDataset(tiny_dataset, masks, ["train"])
    image, coarse_mask = both.whole(0)
    fine_image, fine_mask = fine.whole(0)
    assert both.pairs[0].image == fine.pairs[0].image and image.equal(fine_image)
    # the same image, its coarse mask (not the fine one)
    assert not coarse_mask.equal(fine_mask)
    np.testing.assert_array_equal(coarse_mask.numpy(), read_labels(both.pairs[0].mask, "mask"))


def test_a_coarse_source_without_its_masks_or_with_the_decoded_cache_is_refused(
        tiny_dataset, masks, coarse_masks, tmp_path):
    with pytest.raises(DataError, match="coarse.pretrain_splits or coarse.finetune_splits"):
        SegmentationDataset(tiny_dataset, masks, ["gtCoarse/train"])
    with pytest.raises(DataError, match="holds gtFine only, not gtCoarse/train"):
        SegmentationDataset(tiny_dataset, masks, ["gtCoarse/train"], decoded=tmp_path,
                            generated_coarse=coarse_masks)


def test_each_phase_trains_with_train_but_for_its_own_fields():
    params = parse_params(default_params_dict())
    pretrain = phase_train(params.train, params.coarse, "pretrain")
    finetune = phase_train(params.train, params.coarse, "finetune")
    assert pretrain.splits == ["gtCoarse/train", "gtCoarse/train_extra"] and pretrain.init is None
    assert finetune.splits == ["train"] and finetune.init == "models_coarse/last.pt"
    assert (pretrain.out, finetune.out) == ("models_coarse", "models_finetune")
    changed = {f.name for f in dataclasses.fields(params.train)
               if getattr(finetune, f.name) != getattr(params.train, f.name)}
    assert changed == {"out", "init"}  # the defaults: the same schedule and rate as train
    raw = default_params_dict()
    raw["coarse"].update(finetune_lr=1e-4, finetune_epochs=None, finetune_iterations=500)
    finetune = phase_train(params.train, parse_params(raw).coarse, "finetune")
    assert (finetune.lr, finetune.epochs, finetune.iterations) == (1e-4, None, 500)


@pytest.mark.parametrize(("changes", "message"), [
    ({"train": {"splits": ["train", "gtFine/train"]}}, "train.splits: expected"),
    ({"coarse": {"pretrain_splits": []}}, "coarse.pretrain_splits: expected"),
    ({"coarse": {"pretrain_epochs": None}}, "coarse.pretrain_epochs, coarse.pretrain_iterations"),
    ({"coarse": {"finetune_out": "models/finetune"}}, "train.out, coarse.finetune_out"),
    ({"coarse": {"generated": "data/synthetic/gtCoarse"}}, "coarse.generated: "),
    ({"train": {"splits": ["gtCoarse/test"]}}, "train.splits"),
])
def test_coarse_parameters_are_checked_before_any_work(changes, message):
    raw = default_params_dict()
    for section, values in changes.items():
        raw[section].update(values)
    with pytest.raises(ParamsError, match=message.replace(".", r"\.")):
        parse_params(raw)
