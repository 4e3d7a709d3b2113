"""The masks stage: layout of its outputs, the agreement report, refusal to touch shipped files,
and bad input: one clear line naming the file, exit code 1, no PNG left behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from cityscapesscripts.helpers.annotation import Annotation as CsAnnotation
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from PIL import Image

from fcn.masks.agreement import summarize, worst_report
from fcn.stage import run_stage
from fcn.errors import DataError
from fcn.masks.generate import check_output_root, generate, masks_stage
from fcn.cityscapes.layout import ENCODINGS, mask_path
from fcn.params import default_params_dict, load_params
from fcn.synthetic import make_scene

REPO = Path(__file__).resolve().parents[1]

H, W = 24, 48


def write_item(root: Path, split: str, stem: str, annotation: dict | str) -> Path:
    """An annotation (dict or raw text) and its image, in the official layout."""
    city = stem.split("_")[0]
    polygons = root / "gtFine" / split / city / f"{stem}_gtFine_polygons.json"
    polygons.parent.mkdir(parents=True, exist_ok=True)
    polygons.write_text(annotation if isinstance(annotation, str) else json.dumps(annotation))
    image = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (W, H)).save(image)
    return polygons


def scene(seed: int) -> dict:
    return make_scene(W, H, np.random.default_rng(seed), seed).to_json()


def run(tmp_path: Path, root: Path, workers: int = 1, **masks) -> tuple[int, dict | None]:
    """Run the stage's library function as its script does (validated params, run_stage's
    error handling); (exit code, metrics or None)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = default_params_dict()
    raw["data"] = {"root": str(root), "generated": str(tmp_path / "generated")}
    raw["masks"].update({"workers": workers, "splits": ["val"], **masks})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    metrics = tmp_path / "metrics" / "masks.json"

    def main() -> None:
        params = load_params(tmp_path / "params.yaml")
        m = params.masks
        masks_stage(params.data.root, params.data.generated, m.encodings, m.splits, m.workers,
                    m.worst, m.figure_images, metrics, tmp_path / "plots")

    try:
        run_stage(main)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, json.loads(metrics.read_text()) if metrics.exists() else None


# --- a good run --------------------------------------------------------------------------------

def test_stage_writes_every_encoding_in_the_official_layout(tmp_path, tiny_dataset):
    code, report = run(tmp_path, tiny_dataset, splits=["train", "val", "test"])
    assert code == 0
    stems = {(p.parts[-3], p.name.removesuffix("_gtFine_polygons.json"))
             for p in (tiny_dataset / "gtFine").rglob("*_gtFine_polygons.json")}
    expected = {mask_path(tmp_path / "generated", split, stem, e)
                for split, stem in stems for e in ENCODINGS}
    written = {p for p in (tmp_path / "generated").rglob("*") if p.is_file()}
    assert written == expected
    # nothing shipped with the synthetic data: the report says so, with no invented numbers
    assert report["shipped_masks"] == 0 and report["agreement"] is None
    assert json.loads((tmp_path / "plots" / "worst.json").read_text()) == []
    assert report["annotations"] == len(stems) == 10
    assert report["per_split"] == {"train": 6, "val": 2, "test": 2}
    assert report["files_written"] == 40
    # only numbers (and the encodings list) in the metrics: text would widen `dvc metrics show`
    assert set(report) == {"annotations", "objects", "per_split", "encodings_written",
                           "files_written", "shipped_masks", "agreement"}
    assert (tmp_path / "plots" / "agreement.csv").read_text().startswith("image,pixels,")
    assert len((tmp_path / "plots" / "agreement.csv").read_text().splitlines()) == 1
    assert not (tmp_path / "plots" / "agreement.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generated", "metrics", "params.yaml", "plots"]


def test_chosen_encodings_only_and_a_rerun_replaces_the_folder(tmp_path):
    root = tmp_path / "cityscapes"
    write_item(root, "val", "lindau_000000_000019", scene(1))
    assert run(tmp_path, root, encodings=["labelIds", "color"])[0] == 0
    first = sorted(p.name for p in (tmp_path / "generated").rglob("*.png"))
    assert first == ["lindau_000000_000019_gtFine_color.png",
                     "lindau_000000_000019_gtFine_labelIds.png"]
    assert run(tmp_path, root, encodings=["instanceIds"])[0] == 0
    assert [p.name for p in (tmp_path / "generated").rglob("*.png")] == [
        "lindau_000000_000019_gtFine_instanceIds.png"]  # no stale files from the first run


def test_two_workers_write_the_same_files_as_one(tmp_path):
    root = tmp_path / "cityscapes"
    for i in range(6):
        write_item(root, "val", f"munster_{i:06d}_000019", scene(i))
    assert run(tmp_path / "a", root, workers=1)[0] == 0
    assert run(tmp_path / "b", root, workers=2)[0] == 0
    a = sorted((tmp_path / "a" / "generated").rglob("*.png"))
    b = sorted((tmp_path / "b" / "generated").rglob("*.png"))
    assert len(a) == 24 and [p.relative_to(tmp_path / "a") for p in a] == [
        p.relative_to(tmp_path / "b") for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


# --- the agreement report --------------------------------------------------------------------

def ship(root: Path, stem: str, encoding: str, array: np.ndarray) -> None:
    path = root / "gtFine" / "val" / stem.split("_")[0] / f"{stem}_gtFine_{encoding}.png"
    Image.fromarray(array).save(path)


def reference_masks(polygons: Path) -> dict[str, np.ndarray]:
    annotation = CsAnnotation()
    annotation.fromJsonFile(str(polygons))
    return {"labelIds": np.asarray(createLabelImage(annotation, "ids")).copy(),
            "color": np.asarray(createLabelImage(annotation, "color")).copy(),
            "instanceIds": np.asarray(createInstanceImage(annotation, "ids")).astype(np.uint16)}


def test_agreement_report_with_shipped_masks(tmp_path):
    """Shipped masks from cityscapesScripts with known pixels altered: exact numbers."""
    root = tmp_path / "cityscapes"
    stems = [f"frankfurt_{i:06d}_000019" for i in range(3)]
    refs = [reference_masks(write_item(root, "val", s, scene(10 + i))) for i, s in enumerate(stems)]
    # image 0 ships all three, 5 labelIds pixels and 2 color pixels altered
    a = refs[0]
    a["labelIds"][0, :5] = 34 + np.arange(5)
    a["color"][3, 7, 0] ^= 1
    a["color"][4, 9, 3] = 0  # alpha counts too
    for e in ("labelIds", "color", "instanceIds"):
        ship(root, stems[0], e, a[e])
    # image 1 ships labelIds and instanceIds, identical except 3 instance pixels
    b = refs[1]
    b["instanceIds"][-1, -3:] = 26999
    ship(root, stems[1], "labelIds", b["labelIds"])
    ship(root, stems[1], "instanceIds", b["instanceIds"])
    # image 2 ships color as RGB (compared as RGBA with alpha 255), identical
    ship(root, stems[2], "color", refs[2]["color"][..., :3].copy())

    code, report = run(tmp_path, root, worst=2, figure_images=2)
    assert code == 0
    n = H * W
    assert report["shipped_masks"] == 6
    agreement = report["agreement"]
    assert list(agreement) == ["labelIds", "color", "instanceIds"]
    assert agreement["labelIds"] == {
        "images": 2, "pixels": 2 * n, "differing_pixels": 5, "overall": 1 - 5 / (2 * n),
        "mean_per_image": ((1 - 5 / n) + 1.0) / 2, "min_per_image": 1 - 5 / n,
        "images_identical": 1}
    assert agreement["color"]["differing_pixels"] == 2 and agreement["color"]["images"] == 2
    assert agreement["instanceIds"]["differing_pixels"] == 3
    assert agreement["instanceIds"]["overall"] == 1 - 3 / (2 * n)
    worst = json.loads((tmp_path / "plots" / "worst.json").read_text())
    assert [w["image"] for w in worst] == [f"val/{stems[0]}", f"val/{stems[1]}"]
    assert worst[0]["differing_pixels"] == {"labelIds": 5, "color": 2, "instanceIds": 0}
    assert worst[1]["agreement"] == {"labelIds": 1.0, "instanceIds": 1 - 3 / n}
    assert "worst" not in report
    table = (tmp_path / "plots" / "agreement.csv").read_text().splitlines()
    assert table[0] == "image,pixels,labelIds_agreement,labelTrainIds_agreement,color_agreement,instanceIds_agreement"
    assert table[1] == f"val/{stems[0]},{n},{1 - 5 / n!r},,{1 - 2 / n!r},1.0"
    assert len(table) == 4
    with Image.open(tmp_path / "plots" / "agreement.png") as figure:
        assert figure.format == "PNG" and figure.width > 3 * W
    # the shipped files are untouched
    assert np.array_equal(np.asarray(Image.open(
        root / "gtFine" / "val" / "frankfurt" / f"{stems[0]}_gtFine_labelIds.png")), a["labelIds"])


def test_shipped_mask_of_another_size_is_an_error(tmp_path, caplog):
    root = tmp_path / "cityscapes"
    polygons = write_item(root, "val", "lindau_000003_000019", scene(3))
    ship(root, "lindau_000003_000019", "labelIds", np.zeros((H, W + 1), np.uint8))
    code, _ = run(tmp_path, root)
    assert code == 1
    assert f"{polygons.parent}/lindau_000003_000019_gtFine_labelIds.png: size {W + 1}x{H}" in caplog.text


def test_summary_of_no_results_has_no_numbers():
    report = summarize([], ["labelIds"])
    assert report["agreement"] is None and report["shipped_masks"] == 0
    assert worst_report([], 5) == []


# --- never touching shipped files -------------------------------------------------------------

@pytest.mark.parametrize("generated", [".", "gtFine", "gtFine/val", "leftImg8bit/x", ".."],
                         ids=["root", "gtFine", "split", "images", "parent"])
def test_generated_folder_overlapping_the_dataset_is_refused(tmp_path, generated):
    root = tmp_path / "data" / "cityscapes"
    write_item(root, "val", "lindau_000000_000019", scene(0))
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(DataError, match="data.generated|data.root"):
        generate(root, root / generated, ENCODINGS, ["val"], 1)
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_generated_folder_beside_the_shipped_ones_is_fine(tmp_path):
    check_output_root(tmp_path / "root", tmp_path / "root" / "generated")


def test_existing_folder_with_foreign_files_is_not_replaced(tmp_path):
    root = tmp_path / "cityscapes"
    write_item(root, "val", "lindau_000000_000019", scene(0))
    (tmp_path / "generated").mkdir()
    (tmp_path / "generated" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match=r"generated: holds .*thesis\.tex.*refusing"):
        generate(root, tmp_path / "generated", ENCODINGS, ["val"], 1)
    assert (tmp_path / "generated" / "thesis.tex").read_text() == "precious"


# --- bad input --------------------------------------------------------------------------------

GOOD = {"imgHeight": H, "imgWidth": W, "objects": [
    {"label": "road", "polygon": [[0, 10], [47, 10], [47, 23], [0, 23]], "deleted": 0}]}


def with_object(polygon, label="car") -> dict:
    return {**GOOD, "objects": GOOD["objects"] + [{"label": label, "polygon": polygon}]}


BAD = {
    "malformed JSON": ('{"imgHeight": 24, "imgWidth": 48, "objects": [', r"malformed JSON"),
    "no imgWidth": ({"imgHeight": H, "objects": []}, r"'imgWidth' missing"),
    "no imgHeight": ({"imgWidth": W, "objects": []}, r"'imgHeight' missing"),
    "unknown label": (with_object([[0, 0], [5, 0], [5, 5]], label="spaceship"),
                      r"object 1: unknown label 'spaceship'"),
    "non-numeric coordinate": (with_object([[0, 0], ["5", 0], [5, 5]]),
                               r"object 1 \(car\): polygon point \['5', 0\]"),
    "NaN coordinate": ('{"imgHeight": 24, "imgWidth": 48, "objects": [{"label": "car", '
                       '"polygon": [[0, 0], [NaN, 1], [5, 5]]}]}',
                       r"object 0 \(car\): polygon point \[nan, 1\]"),
    "infinite coordinate": ('{"imgHeight": 24, "imgWidth": 48, "objects": [{"label": "car", '
                            '"polygon": [[0, 0], [1, -Infinity], [5, 5]]}]}',
                            r"object 0 \(car\): polygon point \[1, -inf\]"),
    "one-point polygon": (with_object([[3, 3]]), r"object 1 \(car\): polygon has 1 point"),
    "empty polygon": (with_object([]), r"object 1 \(car\): polygon has 0 point"),
}


def assert_failed_cleanly(tmp_path: Path, code: int, caplog, pattern: str) -> None:
    assert code == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage()
    assert re.search(pattern, errors[0].getMessage()), errors[0].getMessage()
    assert not (tmp_path / "generated").exists()
    assert not list(tmp_path.rglob("*.png*")) or all(
        "leftImg8bit" in p.parts for p in tmp_path.rglob("*.png*"))  # only the input images
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name or "old" in p.name]
    assert not (tmp_path / "metrics" / "masks.json").exists()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_annotation_fails_naming_the_file(tmp_path, caplog, case):
    content, message = BAD[case]
    root = tmp_path / "cityscapes"
    for i in range(3):  # good ones first: they are rendered, then must be removed
        write_item(root, "val", f"lindau_{i:06d}_000019", scene(i))
    bad = write_item(root, "val", "lindau_000009_000019", content)
    code, _ = run(tmp_path, root)
    assert_failed_cleanly(tmp_path, code, caplog, f"^{re.escape(str(bad))}: {message}")


def test_bad_annotation_in_a_worker_process_fails_cleanly(tmp_path, caplog):
    root = tmp_path / "cityscapes"
    for i in range(8):
        write_item(root, "val", f"lindau_{i:06d}_000019", scene(i))
    bad = write_item(root, "val", "lindau_000004_000019", with_object([[1, 1]], label="cargroup"))
    code, _ = run(tmp_path, root, workers=2)
    assert_failed_cleanly(tmp_path, code, caplog,
                          f"^{re.escape(str(bad))}: object 1 \\(cargroup\\)")


def test_annotation_without_image_names_both_files(tmp_path, caplog):
    root = tmp_path / "cityscapes"
    write_item(root, "val", "lindau_000000_000019", scene(0))
    polygons = write_item(root, "val", "lindau_000001_000019", scene(1))
    image = root / "leftImg8bit" / "val" / "lindau" / "lindau_000001_000019_leftImg8bit.png"
    image.unlink()
    code, _ = run(tmp_path, root)
    assert_failed_cleanly(tmp_path, code, caplog, "")
    assert f"{polygons}: no matching image {image}" in caplog.text


def test_stage_script_exits_non_zero_with_one_line(tmp_path):
    """The real script in a subprocess: exit status 1 and the file named on stderr."""
    root = tmp_path / "cityscapes"
    bad = write_item(root, "val", "lindau_000000_000019", with_object([[0, 0], [1, 1]], "ufo"))
    params = default_params_dict()
    params["data"] = {"root": str(root), "generated": str(tmp_path / "generated")}
    params["masks"].update(workers=1, splits=["val"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, str(REPO / "stages" / "masks.py"), "--params",
                           str(tmp_path / "params.yaml"), "--metrics", str(tmp_path / "m.json"),
                           "--plots", str(tmp_path / "plots")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"{bad}: object 1: unknown label 'ufo'" in errors[0]
    assert not (tmp_path / "generated").exists() and not (tmp_path / "m.json").exists()
