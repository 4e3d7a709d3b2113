"""Rasterizer parity: our four encodings equal cityscapesScripts' pixel for pixel, and the PNG
files read back (with PIL) to exactly those arrays."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.annotation import Annotation as CsAnnotation
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fcn.cityscapes.annotations import MAX_COORDINATE, Annotation, PolygonObject, parse_annotation
from fcn.errors import DataError
from fcn.cityscapes.labels import LABELS, NAME_TO_LABEL
from fcn.cityscapes.layout import ENCODINGS, mask_path
from fcn.masks.render import draw_label_ids, render, write_masks
from fcn.png import encode_png

CS_ENCODING = {"labelIds": "ids", "labelTrainIds": "trainIds", "color": "color"}


def reference(text: str) -> dict[str, np.ndarray]:
    """cityscapesScripts' masks of a polygons JSON text, as arrays."""
    annotation = CsAnnotation()
    annotation.fromJsonText(text)
    masks = {e: np.asarray(createLabelImage(annotation, cs)) for e, cs in CS_ENCODING.items()}
    masks["instanceIds"] = np.asarray(createInstanceImage(annotation, "ids"))
    return masks


def assert_same_as_reference(data: dict) -> None:
    text = json.dumps(data)
    ours = render(parse_annotation(json.loads(text), "test.json"))
    theirs = reference(text)
    for encoding in ENCODINGS:
        assert ours[encoding].shape == theirs[encoding].shape, encoding
        np.testing.assert_array_equal(ours[encoding], theirs[encoding], err_msg=encoding)
    assert ours["labelIds"].dtype == ours["labelTrainIds"].dtype == np.uint8
    assert ours["color"].dtype == np.uint8 and ours["color"].shape[2] == 4
    assert ours["instanceIds"].dtype == np.uint16


def obj(label: str, polygon: list, deleted: int = 0) -> dict:
    return {"label": label, "polygon": polygon, "deleted": deleted}


# --- every synthetic annotation ---------------------------------------------------------------

def test_every_synthetic_annotation_matches_cityscapesscripts(tiny_dataset):
    files = sorted((tiny_dataset / "gtFine").rglob("*_gtFine_polygons.json"))
    assert len(files) == 10
    for path in files:
        assert_same_as_reference(json.loads(path.read_text()))


# --- hypothesis-generated annotations ---------------------------------------------------------

GROUPS = [f"{lab.name}group" for lab in LABELS if f"{lab.name}group" not in NAME_TO_LABEL]
NAMES = [lab.name for lab in LABELS] + GROUPS

coordinate = st.one_of(
    st.integers(-20, 60),
    st.floats(-20, 60, allow_nan=False).map(lambda v: round(v, 2)),
    st.floats(-1.5, 1.5, allow_nan=False),          # truncation towards zero around 0
    st.floats(-1e6, 1e6, allow_nan=False),          # far out of bounds
    st.sampled_from([-(MAX_COORDINATE - 1), MAX_COORDINATE - 1]),
)
point = st.lists(coordinate, min_size=2, max_size=2)
annotation_json = st.fixed_dictionaries({
    "imgHeight": st.integers(1, 40),
    "imgWidth": st.integers(1, 40),
    "objects": st.lists(
        st.fixed_dictionaries({
            "label": st.sampled_from(NAMES),
            "polygon": st.lists(point, min_size=2, max_size=10),
            "deleted": st.sampled_from([0, 0, 0, 1]),
        }),
        max_size=30),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(annotation_json)
def test_random_annotations_match_cityscapesscripts(data):
    assert_same_as_reference(data)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["car", "person", "cargroup", "bicycle", "truck"]),
                min_size=1, max_size=60), st.randoms(use_true_random=False))
def test_instances_counted_per_class_in_file_order(labels, rnd):
    """Many overlapping instances, some deleted: ids are id*1000 + k per class, deleted
    objects not counted, groups plain."""
    objects = []
    for label in labels:
        x, y = rnd.randint(0, 20), rnd.randint(0, 20)
        objects.append(obj(label, [[x, y], [x + 8, y], [x + 4, y + 8]], int(rnd.random() < 0.2)))
    assert_same_as_reference({"imgHeight": 30, "imgWidth": 30, "objects": objects})


def test_more_than_256_distinct_values_use_a_32_bit_canvas():
    """300 car instances + other classes: more palette entries than an 8-bit canvas holds."""
    objects = [obj("car", [[i % 40, i // 40], [i % 40 + 2, i // 40], [i % 40, i // 40 + 2]])
               for i in range(300)]
    objects += [obj("road", [[0, 30], [39, 30], [39, 39]]), obj("person", [[5, 5], [30, 5], [5, 30]])]
    assert_same_as_reference({"imgHeight": 40, "imgWidth": 40, "objects": objects})


def test_instance_counts_above_999_follow_the_reference():
    objects = [obj("car", [[i % 16, 0], [i % 16 + 1, 0], [i % 16, 3]]) for i in range(1100)]
    assert_same_as_reference({"imgHeight": 4, "imgWidth": 16, "objects": objects})


def test_instance_id_beyond_16_bits_is_an_error_only_for_instanceIds():
    # bicycle (id 33): 33000 + k > 65535 from the 32536th instance on
    objects = tuple(PolygonObject("bicycle", ((0, 0), (1, 0), (0, 1))) for _ in range(32537))
    annotation = Annotation(2, 2, objects)
    with pytest.raises(DataError, match=r"x\.json: object 32536 \(bicycle\): instance id 65536"):
        render(annotation, source="x.json")
    assert render(annotation, ["labelIds"])["labelIds"][0, 0] == 33


# --- the < 3 points policy ---------------------------------------------------------------------

def test_two_point_and_repeated_point_polygons_draw_as_pil_does():
    data = {"imgHeight": 10, "imgWidth": 12, "objects": [
        obj("road", [[1, 1], [10, 8]]),                   # a line
        obj("car", [[3, 7], [3, 7]]),                     # one pixel
        obj("person", [[5.7, 2.2], [5.7, 2.2], [5.7, 2.2]]),
        obj("sky", [[0, 9], [11, 9], [6, 9]]),             # collinear: a row
    ]}
    assert_same_as_reference(data)
    ours = render(parse_annotation(data, "x"))
    assert ours["labelIds"][1, 1] == 7 and ours["instanceIds"][7, 3] == 26000
    assert ours["instanceIds"][2, 5] == 24000 and (ours["labelIds"][9] == 23).all()


def test_fewer_than_two_points_allowed_where_nothing_is_drawn():
    """Deleted and negative-id objects are skipped by cityscapesScripts before drawing."""
    data = {"imgHeight": 6, "imgWidth": 6, "objects": [
        obj("car", [], deleted=1), obj("road", [[1, 1]], deleted=1),
        obj("license plate", [[2, 2]]), obj("license plategroup", []),
        obj("car", [[0, 0], [5, 0], [5, 5]]),
    ]}
    assert_same_as_reference(data)
    assert render(parse_annotation(data, "x"))["instanceIds"][1, 4] == 26000


@pytest.mark.parametrize("polygon", [[], [[3, 4]]], ids=["empty", "one point"])
def test_drawn_object_with_fewer_than_two_points_is_an_error(polygon):
    data = {"imgHeight": 6, "imgWidth": 6,
            "objects": [obj("road", [[0, 0], [5, 0], [5, 5]]), obj("car", polygon)]}
    with pytest.raises(TypeError):  # what cityscapesScripts does: PIL refuses, the script dies
        reference(json.dumps(data))
    with pytest.raises(DataError, match=r"^a\.json: object 1 \(car\): polygon has "
                                        f"{len(polygon)} point"):
        parse_annotation(data, "a.json")


@pytest.mark.parametrize("value", [MAX_COORDINATE, -MAX_COORDINATE, 1e300, 10**400])
def test_coordinates_beyond_c_int_range_are_rejected(value):
    data = {"imgHeight": 6, "imgWidth": 6, "objects": [obj("road", [[0, 0], [value, 0], [5, 5]])]}
    with pytest.raises(DataError, match=r"^a\.json: object 0 \(road\): polygon point"):
        parse_annotation(data, "a.json")


# --- PNG files ---------------------------------------------------------------------------------

def read_png(path: Path) -> tuple[str, np.ndarray]:
    with Image.open(path) as image:
        return image.mode, np.asarray(image)


def test_written_pngs_read_back_to_the_arrays(tiny_dataset, tmp_path):
    path = next((tiny_dataset / "gtFine" / "val").rglob("*_gtFine_polygons.json"))
    stem = path.name.removesuffix("_gtFine_polygons.json")
    masks = render(parse_annotation(json.loads(path.read_text()), str(path)))
    paths = {e: mask_path(tmp_path, "val", stem, e) for e in ENCODINGS}
    write_masks(masks, paths)
    city = stem.split("_")[0]
    assert paths["labelIds"] == tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png"
    expected_modes = {"labelIds": "L", "labelTrainIds": "L", "color": "RGBA", "instanceIds": "I;16"}
    for encoding, p in paths.items():
        mode, array = read_png(p)
        assert mode == expected_modes[encoding]
        assert array.dtype == masks[encoding].dtype
        np.testing.assert_array_equal(array, masks[encoding])
    assert sorted(p.name for p in paths["labelIds"].parent.iterdir()) == sorted(
        p.name for p in paths.values())  # no temporary files left behind
    assert read_png(paths["instanceIds"])[1].max() >= 24000  # real 16-bit values survive


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.sampled_from(["L", "I;16", "RGBA"]),
       st.randoms(use_true_random=False))
def test_png_encoder_round_trips_any_array(height, width, kind, rnd):
    rng = np.random.default_rng(rnd.getrandbits(32))
    if kind == "L":
        array = rng.integers(0, 256, (height, width), dtype=np.uint8)
    elif kind == "I;16":
        array = rng.choice(np.array([0, 1, 255, 256, 33001, 65535], np.uint16), (height, width))
    else:
        array = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    with Image.open(io.BytesIO(encode_png(array))) as image:
        assert image.mode == kind and image.size == (width, height)
        np.testing.assert_array_equal(np.asarray(image), array)


@pytest.mark.parametrize("array", [np.zeros((2, 2), np.int32), np.zeros((2, 2, 3), np.uint8),
                                   np.zeros((0, 3), np.uint8)], ids=["int32", "rgb", "empty"])
def test_png_encoder_rejects_what_it_does_not_write(array):
    with pytest.raises(ValueError, match="encode_png"):
        encode_png(array)


def test_draw_label_ids_and_mask_path():
    data = {"imgHeight": 4, "imgWidth": 4, "objects": [obj("sky", [[0, 0], [3, 0], [3, 3], [0, 3]])]}
    assert (draw_label_ids(parse_annotation(data, "x")) == 23).all()
    assert mask_path("out", "train", "aachen_000001_000019", "color") == Path(
        "out/gtFine/train/aachen/aachen_000001_000019_gtFine_color.png")
    with pytest.raises(ValueError, match="unknown encoding"):
        mask_path("out", "train", "aachen_000001_000019", "depth")
