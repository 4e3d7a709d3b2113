"""The synthetic dataset: official layout and names, determinism, annotations real tools load."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.annotation import Annotation as CsAnnotation
from PIL import Image

from fcn.cityscapes.labels import EVAL_LABELS, ID_TO_TRAINID, NAME_TO_LABEL
from fcn.masks.render import draw_label_ids
from fcn.metrics import summary
from fcn.cityscapes.annotations import read_annotation
from fcn.synthetic import synthesize

from helpers.tiny import TINY, with_changes

IMAGE = re.compile(
    r"leftImg8bit/(train|val|test|train_extra)/([a-z0-9]+)/\2_\d{6}_\d{6}_leftImg8bit\.png")
POLYGONS = re.compile(
    r"gtFine/(train|val|test)/([a-z0-9]+)/\2_\d{6}_\d{6}_gtFine_polygons\.json")
COARSE_POLYGONS = re.compile(
    r"gtCoarse/(train|val|train_extra)/([a-z0-9]+)/\2_\d{6}_\d{6}_gtCoarse_polygons\.json")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _digest(root: Path) -> dict[str, str]:
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in _files(root)}


def test_layout_and_names_follow_the_official_scheme(tiny_dataset):
    files = _files(tiny_dataset)
    images = [f for f in files if f.startswith("leftImg8bit/")]
    polygons = [f for f in files if f.startswith("gtFine/")]
    coarse = [f for f in files if f.startswith("gtCoarse/")]
    assert len(files) == len(images) + len(polygons) + len(coarse)
    assert len(images) == 2 * 3 + 2 + 2 + 2 and len(polygons) == 2 * 3 + 2 + 2
    assert len(coarse) == 2 * 3 + 2 + 2  # train, val, train_extra: no test, as Cityscapes
    assert all(IMAGE.fullmatch(f) for f in images), images
    assert all(POLYGONS.fullmatch(f) for f in polygons), polygons
    assert all(COARSE_POLYGONS.fullmatch(f) for f in coarse), coarse

    def stems(names: list[str], split: str = "") -> set[str]:
        return {f.split("/")[-1].split("_gt")[0].removesuffix("_leftImg8bit.png")
                for f in names if f.split("/")[1].startswith(split)}

    assert stems(polygons) == stems([f for f in images if "/train_extra/" not in f])
    assert stems(coarse) == stems([f for f in images if "/test/" not in f])
    for split, cities in (("train", TINY.train_cities), ("val", TINY.val_cities),
                          ("test", TINY.test_cities), ("train_extra", TINY.train_extra_cities)):
        assert sorted(p.name for p in (tiny_dataset / "leftImg8bit" / split).iterdir()) == cities


def test_images_are_rgb_of_the_configured_size(tiny_dataset):
    for path in (tiny_dataset / "leftImg8bit").rglob("*.png"):
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (TINY.width, TINY.height)


def test_same_seed_byte_identical_other_seed_different(tmp_path, tiny_dataset):
    again = tmp_path / "again"
    synthesize(again, TINY)
    assert _digest(again) == _digest(tiny_dataset)
    other = tmp_path / "other"
    synthesize(other, with_changes(TINY, seed=TINY.seed + 1))
    a, b = _digest(other), _digest(tiny_dataset)
    assert a.keys() == b.keys()
    assert all(a[f] != b[f] for f in a if not f.startswith("gtFine/test"))  # test: border only


def test_every_annotation_loads_in_cityscapesscripts(tiny_dataset):
    for path in (tiny_dataset / "gtFine").rglob("*_polygons.json"):
        annotation = CsAnnotation()
        annotation.fromJsonFile(str(path))
        assert (annotation.imgHeight, annotation.imgWidth) == (TINY.height, TINY.width)
        assert annotation.objects


def _objects(root: Path, split: str) -> list[dict]:
    out = []
    for path in sorted((root / "gtFine" / split).rglob("*_polygons.json")):
        out += json.loads(path.read_text())["objects"]
    return out


def test_annotations_exercise_what_real_ones_contain(tmp_path):
    root = tmp_path / "ds"
    synthesize(root, with_changes(TINY, width=256, height=128, train_per_city=6))
    objects = _objects(root, "train")
    names = {o["label"] for o in objects}
    assert {"license plate", "ego vehicle", "out of roi", "cargroup", "persongroup"} <= names
    assert any(o["deleted"] for o in objects)
    coords = [c for o in objects for p in o["polygon"] for c in p]
    assert any(c != int(c) for c in coords), "float coordinates"
    assert min(coords) < 0 and max(x for o in objects for x, _ in o["polygon"]) > 256
    # several instances of a class with instances in one image
    first = json.loads(next((root / "gtFine/train").rglob("*.json")).read_text())["objects"]
    assert sum(o["label"] == "car" and not o["deleted"] for o in first) >= 2
    # non-convex polygons: some vertex turns the other way
    def non_convex(poly):
        p = np.asarray(poly, float)
        d1, d2 = np.roll(p, -1, 0) - p, np.roll(p, -2, 0) - np.roll(p, -1, 0)
        cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
        return (cross > 1e-9).any() and (cross < -1e-9).any()
    assert any(non_convex(o["polygon"]) for o in objects if o["label"] == "person")
    # later objects cover earlier ones: a car drawn over the road changes the road's pixels
    annotation = read_annotation(next((root / "gtFine/train").rglob("*.json")))
    ids = draw_label_ids(annotation)
    assert (ids == NAME_TO_LABEL["car"].id).any() and (ids == NAME_TO_LABEL["road"].id).any()


def test_all_19_evaluated_classes_appear_in_train(tiny_dataset):
    seen = set()
    for path in (tiny_dataset / "gtFine" / "train").rglob("*_polygons.json"):
        seen |= set(np.unique(ID_TO_TRAINID[draw_label_ids(read_annotation(path))]).tolist())
    assert seen >= {lab.trainId for lab in EVAL_LABELS}


def test_test_split_annotations_are_withheld(tiny_dataset):
    names = {o["label"] for o in _objects(tiny_dataset, "test")}
    assert names <= {"ego vehicle", "rectification border", "out of roi"}


def test_a_color_lookup_cannot_segment_the_images(tiny_dataset):
    """Classes share colors: even the best per-color class table, fitted on the very images it
    is scored on, stays far below the val mIoU the network must reach (0.5)."""
    votes = np.zeros((512, 19), np.int64)  # quantised color (8 levels per channel) × class
    for path in (tiny_dataset / "gtFine" / "train").rglob("*_polygons.json"):
        train_ids = ID_TO_TRAINID[draw_label_ids(read_annotation(path))].reshape(-1)
        image_path = str(path).replace("gtFine", "leftImg8bit", 1).replace(
            "_gtFine_polygons.json", "_leftImg8bit.png")
        q = np.asarray(Image.open(image_path)).astype(np.int64) // 32
        color = (q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).reshape(-1)
        keep = train_ids != 255
        np.add.at(votes, (color[keep], train_ids[keep]), 1)
    lookup = votes.argmax(axis=1)
    confusion = np.zeros((19, 19), np.int64)
    for predicted in range(19):
        confusion[:, predicted] = votes[lookup == predicted].sum(axis=0)
    assert summary(confusion)["miou"] < 0.35


def test_the_sequence_adds_its_frames_and_changes_no_other_byte(tmp_path, tiny_dataset):
    """synthesize.sequence_frames writes a camera pan in leftImg8bit_sequence's layout from its
    own generator: the rest of the dataset is byte-identical with it on or off."""
    root = tmp_path / "with_sequence"
    synthesize(root, with_changes(TINY, sequence_frames=5))
    with_sequence, without = _digest(root), _digest(tiny_dataset)
    extra = sorted(set(with_sequence) - set(without))
    city, seq = TINY.val_cities[0], TINY.val_per_city  # after the val images: no shared stem
    assert extra == [f"leftImg8bit_sequence/val/{city}/{city}_{seq:06d}_{frame:06d}"
                     "_leftImg8bit.png" for frame in range(5)]
    assert all(with_sequence[f] == without[f] for f in without)
    frames = [np.asarray(Image.open(root / f)) for f in extra]
    assert all(f.shape == (TINY.height, TINY.width, 3) for f in frames)
    step = TINY.width // 4  # the pan crosses one image width in 4 steps
    for a, b in zip(frames, frames[1:]):  # each frame: the previous one, moved left by a step
        assert np.array_equal(b[:, :-step], a[:, step:]) and not np.array_equal(a, b)
