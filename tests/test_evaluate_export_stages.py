"""The evaluate and export stages end to end on a small dataset with a fitted probe checkpoint:
scores agree with the official evaluator, exports are what the server accepts, bad input is
one clear error with exit code 1 and nothing half-written."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers.eval_data import eval_data, official_evaluation, write_ground_truth
from fcn.cityscapes.labels import CLASS_NAMES, TRAINID_TO_ID
from fcn.checkpoint import best_path
from fcn.cityscapes.layout import list_images, stem_of
from fcn.stage import run_stage
from fcn.params import load_params
from fcn.predict.evaluate import ReportPaths, evaluate_stage
from fcn.cityscapes.layout import submission_name
from fcn.predict.export import (ExportPaths, export_stage, gif_images, predict_folder_stage,
                               write_submission_zip)
from fcn.params import default_params_dict

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return eval_data(tmp_path_factory)


def write_params(folder: Path, dataset, **sections) -> Path:
    """params.yaml in `folder` for `dataset` (an EvalData), with `sections` changed."""
    raw = default_params_dict()
    raw["data"] = {"root": str(dataset.root), "generated": str(dataset.generated)}
    raw["train"]["out"] = str(dataset.models)
    raw["evaluate"].update(samples=3, workers=2)
    raw["export"].update(overlays=2, gif_frames=3, gif_width=64, out=str(folder / "predictions"))
    for name, values in sections.items():
        raw[name].update(values)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(stage: str, *args: str, cwd: Path, monkeypatch) -> int:
    """Run a stage's library function as its script calls it (params loaded and validated,
    run_stage's error handling, outputs relative to `cwd`); its exit code. The scripts
    themselves run as DVC runs them in test_stage_script_exit_code_and_message."""
    monkeypatch.chdir(cwd)
    options = dict(zip(args[::2], args[1::2]))
    unknown = set(options) - {"--params", "--predictions", "--split", "--out", "--images"}
    assert not unknown, unknown

    def main() -> None:
        params = load_params(options["--params"])
        checkpoint = best_path(params.train.out)
        if stage == "evaluate":
            evaluate_stage(params.data.root, params.data.generated, params.model,
                           params.evaluate, ReportPaths(Path("metrics/evaluate.json"),
                                                        Path("metrics/evaluate"),
                                                        Path("plots/evaluate")),
                           checkpoint, options.get("--predictions"))
        elif "--images" in options:
            predict_folder_stage(checkpoint, params.model, params.export, options["--images"],
                                 options["--out"])
        else:
            export_stage(checkpoint, params.data.root, params.model, params.export,
                         ExportPaths(Path(options.get("--out", params.export.out)),
                                     options.get("--split", "test")))

    try:
        run_stage(main)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def read_class_table(path: Path) -> dict[str, dict[str, float]]:
    with path.open() as f:
        return {row["class"]: {k: float(v) for k, v in row.items() if k in ("iou", "iiou")}
                for row in csv.DictReader(f)}


def assert_report_agrees(folder: Path, official: dict) -> None:
    metrics = json.loads((folder / "metrics" / "evaluate.json").read_text())
    table = read_class_table(folder / "metrics" / "evaluate_classes.csv")
    for name in CLASS_NAMES:
        assert table[name]["iou"] == pytest.approx(official["classScores"][name], abs=1e-9)
        iiou = official["classInstScores"][name]
        assert (math.isnan(table[name]["iiou"]) and math.isnan(iiou)) or \
            table[name]["iiou"] == pytest.approx(iiou, abs=1e-9)
    with (folder / "metrics" / "evaluate_categories.csv").open() as f:
        for row in csv.DictReader(f):
            assert float(row["iou"]) == pytest.approx(
                official["categoryScores"][row["category"]], abs=1e-9)
            official_iiou = official["categoryInstScores"][row["category"]]
            assert (math.isnan(float(row["iiou"])) and math.isnan(official_iiou)) or \
                float(row["iiou"]) == pytest.approx(official_iiou, abs=1e-9)
    for ours, theirs in (("class_iou_mean", "averageScoreClasses"),
                         ("class_iiou_mean", "averageScoreInstClasses"),
                         ("category_iou_mean", "averageScoreCategories"),
                         ("category_iiou_mean", "averageScoreInstCategories")):
        assert metrics[ours] == pytest.approx(official[theirs], abs=1e-9), ours


def test_exported_val_predictions_score_the_same_in_the_official_evaluator_and_ours(
        data, tmp_path, monkeypatch):
    params = write_params(tmp_path, data)
    assert run("export", "--params", str(params), "--split", "val", "--out",
               str(tmp_path / "val_export"), cwd=tmp_path, monkeypatch=monkeypatch) == 0
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(tmp_path / "val_export" / "val"))
    official = official_evaluation(data.val_labels)  # finds our files as the server would
    assert 0.2 < official["averageScoreClasses"] < 0.9  # a model worth scoring

    # 1) the stage running the model
    assert run("evaluate", "--params", str(params), cwd=tmp_path, monkeypatch=monkeypatch) == 0
    assert_report_agrees(tmp_path, official)
    metrics = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert metrics["images"] == len(data.val_labels)
    assert metrics["compute"] == {  # how the model computed: recorded beside the scores
        "device": "cpu", "precision": "fp16", "autocast": "none", "tf32_matmul": False,
        "tf32_cudnn": False, "deterministic": False, "cudnn_benchmark": False}
    for key in ("mean_dice", "mean_pixel_accuracy", "pixel_accuracy"):
        assert 0 < metrics[key] < 1
    plots = tmp_path / "plots" / "evaluate"
    with (plots / "class_iou.csv").open() as f:
        bars = list(csv.DictReader(f))
    assert [b["class"] for b in bars] == list(CLASS_NAMES)
    for bar in bars:
        official_iou = official["classScores"][bar["class"]]
        assert bar["iou"] == ("" if math.isnan(official_iou) else repr(float(official_iou)))
    assert Image.open(plots / "confusion.png").size[0] > 400
    samples = sorted((plots / "samples").iterdir())
    assert len(samples) == 3
    assert Image.open(samples[0]).size == (3 * 128 + 2 * 4, 64)  # image | truth | prediction
    markdown = (tmp_path / "metrics" / "evaluate_classes.md").read_text()
    assert "| person |" in markdown and "| vehicle |" in markdown

    # 2) the stage scoring the exported files (no model), over the whole export folder
    shutil.rmtree(tmp_path / "metrics")
    assert run("evaluate", "--params", str(params), "--predictions",
               str(tmp_path / "val_export"), cwd=tmp_path, monkeypatch=monkeypatch) == 0
    assert_report_agrees(tmp_path, official)


def test_export_writes_what_the_server_accepts(data, tmp_path, monkeypatch):
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cs

    params = write_params(tmp_path, data)
    assert run("export", "--params", str(params), cwd=tmp_path, monkeypatch=monkeypatch) == 0
    out = tmp_path / "predictions"
    images = list_images(data.root, "test")
    expected = {f"{stem_of(p).split('_')[0]}/{stem_of(p)}_leftImg8bit.png" for p in images}

    with zipfile.ZipFile(out / "cityscapes_test_labelIds.zip") as archive:
        names = archive.namelist()
        assert sorted(names) == sorted(expected)  # one PNG per test image, nothing else
        assert all(not n.endswith("/") for n in names)
        for image in images:
            name = f"{stem_of(image).split('_')[0]}/{stem_of(image)}_leftImg8bit.png"
            with archive.open(name) as f:
                prediction = Image.open(f)
                prediction.load()
            assert prediction.mode == "L" and prediction.size == Image.open(image).size
            assert set(np.unique(np.asarray(prediction))) <= set(TRAINID_TO_ID[:19].tolist())
    files = {p.relative_to(out / "test").as_posix() for p in (out / "test").rglob("*")
             if p.is_file()}
    assert files == expected

    # the official lookup finds exactly our file for every test image, searching the whole
    # export folder (overlays and GIF included)
    write_ground_truth(data.root, tmp_path / "test_gt", "test")
    args = type("Args", (), {"predictionPath": None, "predictionWalk": None})()
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(out))
    for image in images:
        gt = tmp_path / "test_gt" / "gtFine" / "test" / stem_of(image).split("_")[0] / \
            f"{stem_of(image)}_gtFine_labelIds.png"
        found = Path(cs.getPrediction(args, str(gt)))
        assert found == out / "test" / stem_of(image).split("_")[0] / \
            f"{stem_of(image)}_leftImg8bit.png"

    overlays = sorted((out / "overlays").iterdir())
    assert len(overlays) == 2 and all(p.name.startswith("overlay_") for p in overlays)
    assert Image.open(overlays[0]).size == (128, 64)
    gif = Image.open(out / "val_predictions.gif")
    assert gif.n_frames == 3 and gif.size == (64, 32)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_predict_any_folder(data, tmp_path, monkeypatch):
    params = write_params(tmp_path, data)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (33, 70, 3), dtype=np.uint8)).save(
        folder / "sub" / "b.JPG")
    Image.fromarray(rng.integers(0, 256, (33, 70), dtype=np.uint8)).save(folder / "c.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert run("export", "--params", str(params), "--images", str(folder), "--out", str(out),
               cwd=tmp_path, monkeypatch=monkeypatch) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["a_labelIds.png", "c_labelIds.png", "overlay_a.png", "overlay_c.png",
                       "sub/b_labelIds.png", "sub/overlay_b.png"]
    labels = Image.open(out / "sub" / "b_labelIds.png")
    assert labels.mode == "L" and labels.size == (70, 33)
    assert Image.open(out / "overlay_a.png").size == (50, 40)


def test_a_predicted_folder_of_val_images_can_be_scored(data, tmp_path, monkeypatch):
    """fcn-predict's folder (labelIds and overlays side by side) is what `evaluate
    --predictions` and the official evaluator accept: one `<city>_<seq>_<frame>*.png` match
    per image (its overlays used to match too: "several predictions match")."""
    params = write_params(tmp_path, data)
    out = tmp_path / "predicted"
    assert run("export", "--params", str(params), "--images",
               str(data.root / "leftImg8bit" / "val"), "--out", str(out), cwd=tmp_path,
               monkeypatch=monkeypatch) == 0
    assert list(out.rglob("overlay_*.png"))
    assert run("evaluate", "--params", str(params), "--predictions", str(out), cwd=tmp_path,
               monkeypatch=monkeypatch) == 0
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(out))
    official = official_evaluation(data.val_labels)
    assert_report_agrees(tmp_path, official)


def test_the_documented_official_evaluator_command_runs_in_this_environment(data, tmp_path,
                                                                            monkeypatch):
    """docs/pipeline.md's line that scores an export with cityscapesScripts' own evaluator,
    run as written (paths filled in): it used to fail in .venv (numpy 2.4 has no in1d)."""
    text = (ROOT / "docs" / "pipeline.md").read_text()
    block = text.split("<!-- official-evaluator -->", 1)[1].split("```bash\n", 1)[1]
    line = block.split("\n", 1)[0]
    params = write_params(tmp_path, data)
    assert run("export", "--params", str(params), "--split", "val", "--out",
               str(tmp_path / "DIR"), cwd=tmp_path, monkeypatch=monkeypatch) == 0
    line = (line.replace("data/generated", str(data.generated))
            .replace(".venv/bin/python", sys.executable))
    done = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "DIR" / "resultPixelLevelSemanticLabeling.json").read_text())
    assert 0.2 < result["averageScoreClasses"] < 0.9 and result["averageScoreInstClasses"] > 0


# --- bad input: exit code 1, one line naming the file, nothing (half-)written ----------------


def test_missing_checkpoint(data, tmp_path, monkeypatch, caplog):
    params = write_params(tmp_path, data, train={"out": str(tmp_path / "no_models")})
    for stage in ("evaluate", "export"):
        caplog.clear()
        assert run(stage, "--params", str(params), cwd=tmp_path, monkeypatch=monkeypatch) == 1
        assert f"{tmp_path / 'no_models' / 'best.pt'}: checkpoint not found" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_checkpoint_of_another_backbone(data, tmp_path, monkeypatch, caplog):
    params = write_params(tmp_path, data, model={"backbone": "vgg16_bn"})
    assert run("evaluate", "--params", str(params), cwd=tmp_path, monkeypatch=monkeypatch) == 1
    assert "checkpoint is for model.backbone='vgg11_bn'" in caplog.text
    assert not (tmp_path / "metrics").exists()


def test_missing_ground_truth(data, tmp_path, monkeypatch, caplog):
    generated = tmp_path / "generated"
    shutil.copytree(data.generated, generated)
    missing = generated / "gtFine" / "val" / "lindau" / "lindau_000001_000019_gtFine_instanceIds.png"
    missing.unlink()
    params = write_params(tmp_path, data, data={"root": str(data.root),
                                                "generated": str(generated)})
    assert run("evaluate", "--params", str(params), cwd=tmp_path, monkeypatch=monkeypatch) == 1
    assert f"{missing}: ground-truth file not found" in caplog.text
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "plots").exists()


def test_ground_truth_of_another_size(data, tmp_path, monkeypatch, caplog):
    generated = tmp_path / "generated"
    shutil.copytree(data.generated, generated)
    labels = generated / "gtFine" / "val" / "frankfurt" / "frankfurt_000001_000019_gtFine_labelIds.png"
    Image.fromarray(np.asarray(Image.open(labels))[:, :100]).save(labels)
    params = write_params(tmp_path, data, data={"root": str(data.root),
                                                "generated": str(generated)})
    assert run("evaluate", "--params", str(params), cwd=tmp_path, monkeypatch=monkeypatch) == 1
    assert "frankfurt_000001_000019_leftImg8bit.png: prediction is 128x64" in caplog.text
    assert f"{labels} is 100x64" in caplog.text
    assert not (tmp_path / "metrics").exists()


@pytest.fixture(scope="module")
def exported_val(data, tmp_path_factory):
    """Valid val predictions written once (by the export stage's library code)."""
    from fcn.predict.export import ExportPaths, export_split
    from fcn.checkpoint import load_model
    from fcn.predict.predictor import Predictor
    from fcn.params import ExportParams, ModelParams

    out = tmp_path_factory.mktemp("exported")
    predictor = Predictor(load_model(data.checkpoint, ModelParams()))
    export_split(predictor, data.root, ExportPaths(out, "val"), ExportParams(overlays=0))
    return out / "val"


@pytest.mark.parametrize("damage, words", [
    ("missing", "no prediction file lindau_000002_000019*.png"),
    ("rgb", "prediction has 3 channels"),
    ("out of table", "ids outside the Cityscapes label table"),
    ("size", "prediction is 128x63 but its ground truth"),
])
def test_bad_prediction_files(data, exported_val, tmp_path, monkeypatch, caplog, damage, words):
    predictions = tmp_path / "val"
    shutil.copytree(exported_val, predictions)
    target = predictions / "lindau" / "lindau_000002_000019_leftImg8bit.png"
    ids = np.asarray(Image.open(target))
    if damage == "missing":
        target.unlink()
    elif damage == "rgb":
        Image.fromarray(np.stack([ids] * 3, axis=-1)).save(target)
    elif damage == "out of table":
        Image.fromarray(np.where(ids == 7, 200, ids).astype(np.uint8)).save(target)
    else:
        Image.fromarray(ids[:-1]).save(target)
    params = write_params(tmp_path, data)
    previous = tmp_path / "metrics" / "evaluate.json"
    previous.parent.mkdir()
    previous.write_text('{"class_iou_mean": 0.5}\n')
    assert run("evaluate", "--params", str(params), "--predictions", str(predictions),
               cwd=tmp_path, monkeypatch=monkeypatch) == 1
    assert words in caplog.text
    assert damage == "missing" or str(target) in caplog.text  # the file is named
    assert previous.read_text() == '{"class_iou_mean": 0.5}\n'  # the old report is intact
    assert sorted(p.name for p in previous.parent.iterdir()) == ["evaluate.json"]
    assert not (tmp_path / "plots").exists()


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["test image header", "test image data",
                                    "GIF val image data"])
def test_a_failed_export_leaves_the_previous_export_whole(data, tmp_path, monkeypatch, caplog,
                                                          damage):
    """A bad header fails before any work; bad data found only while decoding (a test image,
    or a val image of the GIF, which used to be made after the new predictions, zip and
    overlays were in place) leaves every previous output as it was."""
    root = tmp_path / "dataset"
    shutil.copytree(data.root / "leftImg8bit", root / "leftImg8bit")
    params = write_params(tmp_path, data, data={"root": str(root),
                                                "generated": str(data.generated)})
    assert run("export", "--params", str(params), cwd=tmp_path, monkeypatch=monkeypatch) == 0
    out = tmp_path / "predictions"
    for folder in ("test", "overlays", "test_confidence", "video"):  # the previous export,
        (out / folder / "previous.txt").write_text("previous export")  # told from a new one
    for name in ("cityscapes_test_labelIds.zip", "val_predictions.gif"):
        (out / name).write_bytes(b"previous " + name.encode())
    before = _tree(out)
    if damage.startswith("test"):
        bad = sorted((root / "leftImg8bit" / "test").rglob("*.png"))[-1]
    else:
        bad = gif_images(root, 3)[-1]
    if damage == "test image header":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    else:  # the header intact, the pixel data cut short
        bad.write_bytes(bad.read_bytes()[:200])
    caplog.clear()
    assert run("export", "--params", str(params), cwd=tmp_path, monkeypatch=monkeypatch) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"{bad}: cannot read image")
    assert _tree(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["test", "overlays", "test_confidence", "video", "cityscapes_test_labelIds.zip",
         "val_predictions.gif"])


@pytest.mark.parametrize("bad_split", ["test", "val"])
def test_a_failed_first_export_leaves_nothing(data, tmp_path, monkeypatch, caplog, bad_split):
    """With no previous export, a failure found while decoding (a test image, or a val image
    of the GIF) leaves no export at all: no folder, zip, GIF or temporary file."""
    root = tmp_path / "dataset"
    shutil.copytree(data.root / "leftImg8bit", root / "leftImg8bit")
    params = write_params(tmp_path, data, data={"root": str(root),
                                                "generated": str(data.generated)})
    bad = (sorted((root / "leftImg8bit" / "test").rglob("*.png"))[-1] if bad_split == "test"
           else gif_images(root, 3)[-1])
    bad.write_bytes(bad.read_bytes()[:200])  # the header intact, the pixel data cut short
    assert run("export", "--params", str(params), cwd=tmp_path, monkeypatch=monkeypatch) == 1
    out = tmp_path / "predictions"
    assert not out.exists() or list(out.iterdir()) == []


def test_the_zip_depends_on_the_predictions_alone(tmp_path):
    """Fixed entry dates and order: the same predictions written at another time give the
    same zip bytes (issue 21)."""
    folder = tmp_path / "test"
    stems = ["bonn_000001_000019", "berlin_000000_000019"]
    for k, stem in enumerate(stems):
        path = folder / submission_name(stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 8), 7 + k, np.uint8)).save(path)
    write_submission_zip(tmp_path / "a.zip", folder, stems)
    for k, path in enumerate(folder.rglob("*.png")):
        os.utime(path, ns=(10**18 + k, 10**18 + k))
    write_submission_zip(tmp_path / "b.zip", folder, list(reversed(stems)))
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.zip") as archive:
        assert archive.namelist() == sorted(submission_name(s) for s in stems)
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


@pytest.mark.slow
def test_stage_script_exit_code_and_message(data, tmp_path):
    """As DVC runs it: a separate process, exit status 1, the error as one line on stderr."""
    params = write_params(tmp_path, data, train={"out": str(tmp_path / "nowhere")})
    result = subprocess.run([sys.executable, str(STAGES / "evaluate.py"), "--params",
                             str(params)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "nowhere/best.pt: checkpoint not found" in errors[0]
    assert not (tmp_path / "metrics").exists()


def test_scoring_files_checks_each_image_against_its_ground_truth_first(data, tmp_path,
                                                                        monkeypatch, caplog):
    """A val image of another size than its ground truth: one line before any scoring (it
    used to crash with a traceback while drawing the sample panels, after scoring)."""
    import shutil as sh

    root = tmp_path / "root"
    sh.copytree(data.root, root)
    image = sorted((root / "leftImg8bit" / "val").rglob("*.png"))[0]
    Image.open(image).resize((64, 32)).save(image)
    params = write_params(tmp_path, data)
    raw = yaml.safe_load(params.read_text())
    raw["data"]["root"] = str(root)
    params.write_text(yaml.safe_dump(raw))
    assert run("export", "--params", str(params), "--split", "val", "--out",
               str(tmp_path / "exported"), cwd=tmp_path, monkeypatch=monkeypatch) == 0
    caplog.clear()
    assert run("evaluate", "--params", str(params), "--predictions",
               str(tmp_path / "exported"), cwd=tmp_path, monkeypatch=monkeypatch) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"{image}: image is 64x32 but its ground "
                                                     "truth"), errors
