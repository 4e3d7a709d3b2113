"""Issue 15, items 1 and 3: every size read from a file is checked against data.max_pixels
before anything that size is allocated, an annotation must be its image's size, and folder
prediction checks every input before work and replaces its output folder only when complete.

Each finding is reproduced and must now end in one line naming the file(s) and sizes, exit
code 1, and nothing half-written. The 200000x200000 inputs run in subprocesses under an
address-space limit (RLIMIT_AS), so a regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
import re
import resource
import runpy
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fcn.cityscapes import annotations
from fcn.cityscapes.annotations import read_annotation
from fcn.cityscapes.layout import mask_path
from fcn.errors import DataError, ParamsError
from fcn.images import MAX_PIXELS, read_labels, read_rgb, read_size, read_tensor
from fcn.masks.generate import generate
from fcn.params import DataParams, default_params_dict, load_params
from fcn.synthetic import make_scene
from helpers.eval_data import predict_in_process as predict

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages"
MEMORY_LIMIT = 2 * 2**30  # bytes of address space: the masks stage needs < 200 MB of it
HUGE = 200_000
HUGE_WORDS = f"is {HUGE}x{HUGE} ({HUGE * HUGE} pixels), more than the limit of {MAX_PIXELS} pixels"
H, W = 24, 48
STEMS = ("frankfurt_000000_000019", "frankfurt_000001_000019")


# --- helpers ---------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, color: int = 0, idat: bytes = b"") -> bytes:
    """A PNG whose header claims `width` x `height` (8-bit grey, or RGB with color=2) and
    whose image data is `idat` (default: a few bytes, nowhere near that many pixels)."""
    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", idat or zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def jpeg_claiming(path: Path, width: int, height: int) -> None:
    """A real JPEG whose SOF header is patched to claim `width` x `height`."""
    Image.new("RGB", (16, 8), (90, 20, 200)).save(path, quality=90)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))


def write_item(root: Path, stem: str, width: int = W, height: int = H, seed: int = 0
               ) -> tuple[Path, Path]:
    """A val annotation claiming `width` x `height` and its real W x H image."""
    city = stem.split("_")[0]
    scene = make_scene(W, H, np.random.default_rng(seed), seed).to_json()
    scene.update(imgWidth=width, imgHeight=height)
    polygons = root / "gtFine" / "val" / city / f"{stem}_gtFine_polygons.json"
    polygons.parent.mkdir(parents=True, exist_ok=True)
    polygons.write_text(json.dumps(scene))
    image = root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (W, H), (seed, 0, 0)).save(image)
    return polygons, image


def write_params(folder: Path, root: Path, **data) -> Path:
    raw = default_params_dict()
    raw["data"].update(root=str(root), generated=str(folder / "generated"), **data)
    raw["masks"].update(workers=1, splits=["val"])
    raw["train"]["out"] = str(folder / "models")
    raw["evaluate"].update(workers=1, samples=1)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_script(name: str, *args: str, monkeypatch) -> int:
    """A stage script run in-process as `python stages/<name>.py ARGS`; its exit code."""
    monkeypatch.setattr(sys, "argv", [str(STAGES / f"{name}.py"), *args])
    try:
        runpy.run_path(str(STAGES / f"{name}.py"), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders (atomic_path / atomic_dir) left under `folder`."""
    return sorted(p.name for p in folder.rglob(".*"))


# --- the limit is a parameter ----------------------------------------------------------------

def test_the_limit_is_a_validated_data_parameter(tmp_path):
    assert DataParams().max_pixels == MAX_PIXELS == 2**26
    assert load_params(REPO / "params.yaml").data.max_pixels == MAX_PIXELS
    path = write_params(tmp_path, tmp_path, max_pixels=0)
    with pytest.raises(Exception, match=r"data.max_pixels: must be >= 1, got 0"):
        load_params(path)


# --- finding 1: a 200000x200000 annotation -----------------------------------------------------

def test_params_files_are_bounded_and_aliases_refused(tmp_path):
    """A 10-line params.yaml whose aliases expand to 10**9 items is refused before anything is
    expanded; so is a file far larger than any params file; wrong values print shortened."""
    laughs = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(laughs) + "\ndata: {root: *i}\n")
    with pytest.raises(ParamsError, match=r"aliases \(\*name\) are not allowed in params, line 2"):
        load_params(bomb)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 2**20 + "\n")
    with pytest.raises(ParamsError, match="larger than 1048576 bytes"):
        load_params(big)
    raw = default_params_dict()
    raw["data"]["max_pixels"] = list(range(10**5))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as error:
        load_params(wrong)
    assert "data.max_pixels: expected an integer, got [0, 1, 2, 3, 4, 5, ...]" in str(error.value)
    assert len(str(error.value)) < 500


def test_huge_annotation_is_refused_before_rendering_under_a_memory_limit(tmp_path):
    """Before: the masks stage allocated 40 G pixels and the OOM killer ended it (exit 137).
    Under a 2 GiB address-space limit a regression fails here with a MemoryError traceback."""
    root = tmp_path / "data"
    polygons, _ = write_item(root, STEMS[0], width=HUGE, height=HUGE)
    params = write_params(tmp_path, root)
    done = subprocess.run(
        [sys.executable, str(STAGES / "masks.py"), "--params", str(params),
         "--metrics", str(tmp_path / "metrics" / "masks.json"),
         "--plots", str(tmp_path / "plots")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, preexec_fn=limit_memory)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{polygons}: annotation {HUGE_WORDS} (data.max_pixels)" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]


def test_data_max_pixels_reaches_the_masks_stage(tmp_path, monkeypatch, caplog):
    root = tmp_path / "data"
    polygons, _ = write_item(root, STEMS[0])
    params = write_params(tmp_path, root, max_pixels=1000)
    assert run_script("masks", "--params", str(params), "--metrics", str(tmp_path / "m.json"),
                      "--plots", str(tmp_path / "plots"), monkeypatch=monkeypatch) == 1
    assert error_lines(caplog) == [f"{polygons}: annotation is {W}x{H} ({W * H} pixels), more "
                                   "than the limit of 1000 pixels (data.max_pixels)"]
    assert not (tmp_path / "generated").exists() and not (tmp_path / "m.json").exists()


def test_data_max_pixels_reaches_the_class_weights_stage(tmp_path, monkeypatch, caplog):
    """Before: the stage read every mask with the default limit, whatever the parameter said."""
    mask = mask_path(tmp_path / "generated", "train", STEMS[0], "labelTrainIds")
    mask.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(mask)
    params = write_params(tmp_path, tmp_path / "data", max_pixels=1000)
    out = tmp_path / "w.json"
    assert run_script("class_weights", "--params", str(params), "--out", str(out),
                      monkeypatch=monkeypatch) == 1
    assert error_lines(caplog) == [f"{mask}: labelTrainIds mask is {W}x{H} ({W * H} pixels), "
                                   "more than the limit of 1000 pixels (data.max_pixels)"]
    assert not out.exists()


# --- finding 2: an annotation of another size than its image ---------------------------------

def test_annotation_of_another_size_than_its_image(tmp_path, monkeypatch, caplog):
    """Before: rendered at the JSON's size without a word; only training noticed. Now the
    masks stage stops with one line naming both files and both sizes, and the previous
    generated masks stay as they were (the mismatch is in the second, last, annotation)."""
    root = tmp_path / "data"
    write_item(root, STEMS[0], seed=1)
    polygons, image = write_item(root, STEMS[1], seed=2)
    params = write_params(tmp_path, root)
    args = ("--params", str(params), "--metrics", str(tmp_path / "metrics" / "masks.json"),
            "--plots", str(tmp_path / "plots"))
    assert run_script("masks", *args, monkeypatch=monkeypatch) == 0
    before = snapshot(tmp_path / "generated")
    metrics = (tmp_path / "metrics" / "masks.json").read_text()
    assert len(before) == 2 * 4
    write_item(root, STEMS[1], width=W - 8, seed=2)  # the JSON now claims 40x24
    caplog.clear()
    assert run_script("masks", *args, monkeypatch=monkeypatch) == 1
    assert error_lines(caplog) == [f"{polygons}: annotation is {W - 8}x{H} but its image "
                                   f"{image} is {W}x{H} (width x height)"]
    assert snapshot(tmp_path / "generated") == before
    assert (tmp_path / "metrics" / "masks.json").read_text() == metrics
    assert leftovers(tmp_path) == []


# --- every reader: headers claiming 200000x200000, under a memory limit ----------------------

READERS = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import torch  # before the limit: importing it maps ~3.5 GB of address space
    from fcn.cityscapes.scoring import EvalFiles, evaluate_files
    from fcn.errors import DataError, ParamsError
    from fcn.images import read_labels, read_rgb, read_rgba, read_size, read_tensor
    from fcn.masks.agreement import read_shipped

    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * 2**30, vm + 2 * 2**30))
    folder = Path(sys.argv[1])
    grey, rgb, jpeg, small = (folder / n for n in ("grey.png", "rgb.png", "huge.jpg", "ok.png"))
    calls = {
        "read_labels": lambda: read_labels(grey, "ground-truth labelIds"),
        "read_shipped": lambda: read_shipped(grey, "instanceIds"),
        "read_shipped color": lambda: read_shipped(rgb, "color"),
        "read_rgb": lambda: read_rgb(rgb),
        "read_rgba": lambda: read_rgba(rgb, "color mask"),
        "read_size": lambda: read_size(rgb),
        "read_tensor": lambda: read_tensor(rgb, 3),
        "read_tensor mask": lambda: read_tensor(grey, 1, "mask"),
        "read_rgb jpeg": lambda: read_rgb(jpeg),
        "evaluate_files": lambda: evaluate_files([EvalFiles(grey, small, small)], workers=1),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = "no error"
        except DataError as exc:
            out[name] = str(exc)
    print(json.dumps(out))
""")


def test_every_reader_checks_the_header_before_decoding_under_a_memory_limit(tmp_path):
    """Label PNGs (fast reader and PIL), photos, color masks, training tensors, JPEGs and the
    evaluator's predictions: each refused from its header, in one line naming the file."""
    (tmp_path / "grey.png").write_bytes(png_claiming(HUGE, HUGE))
    (tmp_path / "rgb.png").write_bytes(png_claiming(HUGE, HUGE, color=2))
    jpeg_claiming(tmp_path / "huge.jpg", 60_000, 60_000)
    Image.new("L", (8, 8)).save(tmp_path / "ok.png")
    done = subprocess.run([sys.executable, "-c", READERS, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for name, message in results.items():
        assert "\n" not in message, name
        if name == "read_rgb jpeg":  # PIL's own guard (~179 M pixels) refuses it first
            assert message.startswith(f"{tmp_path / 'huge.jpg'}: cannot read image")
            assert "3600000000 pixels" in message
            continue
        file = tmp_path / ("rgb.png" if "rgb" in name or "color" in name
                           or name in ("read_size", "read_tensor") else "grey.png")
        assert message.startswith(f"{file}: "), (name, message)
        assert HUGE_WORDS in message, (name, message)
    assert results["evaluate_files"].startswith(f"{tmp_path / 'grey.png'}: prediction is")


def test_a_lower_limit_applies_to_jpeg_and_png_alike(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    Image.new("L", (40, 30)).save(tmp_path / "a.png")
    for call, file in ((lambda: read_rgb(tmp_path / "a.jpg", max_pixels=1199), "a.jpg"),
                       (lambda: read_size(tmp_path / "a.jpg", max_pixels=1199), "a.jpg"),
                       (lambda: read_labels(tmp_path / "a.png", "mask", 1199), "a.png"),
                       (lambda: read_tensor(tmp_path / "a.png", 1, "mask", 1199), "a.png")):
        with pytest.raises(DataError, match=re.escape(
                f"{tmp_path / file}: ") + r".* is 40x30 \(1200 pixels\), more than the limit "
                r"of 1199 pixels"):
            call()
    assert read_labels(tmp_path / "a.png", "mask", 1200).shape == (30, 40)


def test_png_data_inflating_past_its_header_is_refused_without_inflating_it(tmp_path):
    """A zip bomb: a 100x100 header over image data that inflates to 64 MB. The fast label
    reader inflates at most the header's size (+1 byte)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(100, 100, idat=zlib.compress(b"\0" * 2**26, 9)))
    assert path.stat().st_size < 2**17
    with pytest.raises(DataError, match="image data inflates to more than the 100x101 bytes"):
        read_labels(path, "prediction")


def test_annotation_files_are_bounded_and_parsed_safely(tmp_path, monkeypatch):
    polygons, _ = write_item(tmp_path, STEMS[0])
    monkeypatch.setattr(annotations, "MAX_ANNOTATION_BYTES", 100)
    with pytest.raises(DataError, match=r"annotation file is larger than 100 bytes"):
        read_annotation(polygons)
    monkeypatch.undo()
    polygons.write_text("[" * 100_000)
    with pytest.raises(DataError, match=r"malformed JSON: nested too deeply"):
        read_annotation(polygons)
    polygons.write_text('{"imgHeight": ' + "9" * 5000 + "}")  # int() refuses 4300+ digits
    with pytest.raises(DataError, match=rf"^{polygons}: malformed JSON: "):
        read_annotation(polygons)


# --- the evaluator: predictions above the limit ----------------------------------------------

@pytest.fixture(scope="module")
def scored(tiny_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """Ground truth of the tiny dataset's val split, and predictions equal to it."""
    base = tmp_path_factory.mktemp("scored")
    generate(tiny_dataset, base / "generated", ["labelIds", "instanceIds"], ["val"], 1)
    predictions = base / "predictions"
    for labels in sorted((base / "generated").rglob("*_labelIds.png")):
        target = predictions / labels.name.replace("_gtFine_labelIds", "_leftImg8bit")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(labels, target)
    return base / "generated", predictions


@pytest.mark.parametrize("case", ["huge header", "data.max_pixels"])
def test_evaluator_refuses_predictions_above_the_limit(tiny_dataset, scored, tmp_path,
                                                       monkeypatch, caplog, case):
    generated, good = scored
    predictions = tmp_path / "predictions"
    shutil.copytree(good, predictions)
    target = sorted(predictions.iterdir())[-1]  # the last one read
    extra = {}
    if case == "huge header":
        target.write_bytes(png_claiming(HUGE, HUGE))
        words = f"{target}: prediction {HUGE_WORDS}"
    else:
        extra = {"max_pixels": 1000}
        # the first file read is refused: the first val image (checked against its truth)
        first = sorted((tiny_dataset / "leftImg8bit" / "val").rglob("*.png"))[0]
        words = f"{first}: image is 128x64 (8192 pixels), more than the limit of 1000"
    params = write_params(tmp_path, tiny_dataset, **extra)
    raw = yaml.safe_load(params.read_text())
    raw["data"]["generated"] = str(generated)
    params.write_text(yaml.safe_dump(raw))
    previous = tmp_path / "metrics" / "evaluate.json"
    previous.parent.mkdir()
    previous.write_text('{"class_iou_mean": 0.5}\n')
    monkeypatch.chdir(tmp_path)
    assert run_script("evaluate", "--params", str(params), "--predictions", str(predictions),
                      monkeypatch=monkeypatch) == 1
    assert len(error_lines(caplog)) == 1 and words in error_lines(caplog)[0]
    assert previous.read_text() == '{"class_iou_mean": 0.5}\n'
    assert not (tmp_path / "plots").exists() and leftovers(tmp_path) == []


# --- finding 3: folder prediction, check before work ------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random (untrained) FCN8s checkpoint: what it predicts does not matter here."""
    import torch

    from helpers.eval_data import save_checkpoint
    from fcn.model import FCN8s

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "best.pt",
                           FCN8s("vgg11_bn", 19).eval())


@pytest.fixture()
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
        folder / "sub" / "b.jpg")
    return folder


@pytest.fixture()
def previous(tmp_path) -> Path:
    """An output folder holding an earlier run's predictions."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old_labelIds.png").write_bytes(b"an earlier prediction")
    (out / "overlay_old.png").write_bytes(b"its overlay")
    return out


@pytest.mark.parametrize("damage", ["unreadable", "huge header", "truncated data"])
def test_a_bad_file_late_in_the_folder_leaves_the_previous_outputs(
        checkpoint, photos, previous, tmp_path, caplog, damage):
    """Before: the earlier images' outputs were written, then the run failed: a half-done
    folder. Now every image's header is checked before work (unreadable, huge: nothing runs),
    and a failure found only while decoding (truncated data) discards the new folder."""
    bad = photos / "zz.png"  # sorted last
    if damage == "unreadable":
        bad.write_bytes(b"not an image at all")
        words = f"{bad}: cannot read image ("
    elif damage == "huge header":
        bad.write_bytes(png_claiming(HUGE, HUGE, color=2))
        words = f"{bad}: image {HUGE_WORDS}"
    else:
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:-200])  # a valid header, the pixel data cut short
        words = f"{bad}: cannot read image (image file is truncated"
    before = snapshot(previous)
    assert predict(checkpoint, str(photos), str(previous)) == 1
    assert len(error_lines(caplog)) == 1 and words in error_lines(caplog)[0], caplog.text
    assert snapshot(previous) == before
    assert leftovers(tmp_path) == []


def test_a_good_run_replaces_the_previous_outputs_whole(checkpoint, photos, previous,
                                                          tmp_path):
    assert predict(checkpoint, str(photos), str(previous)) == 0
    assert sorted(snapshot(previous)) == ["a_labelIds.png", "overlay_a.png",
                                          "sub/b_labelIds.png", "sub/overlay_b.png"]
    assert Image.open(previous / "sub" / "b_labelIds.png").size == (40, 40)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["foreign file", "same output name", "nested", "limit"])
def test_folder_refusals_come_before_any_work(checkpoint, photos, previous, tmp_path, caplog,
                                              case):
    args = [str(photos), str(previous)]
    if case == "foreign file":
        (previous / "notes.txt").write_text("not ours")
        words = (f"{previous}: holds {previous / 'notes.txt'}, which predicting a folder does "
                 "not write; refusing to replace the folder")
    elif case == "same output name":
        Image.new("RGB", (8, 8)).save(photos / "a.jpg")
        words = (f"{photos / 'a.png'}: its predictions would overwrite those of "
                 f"{photos / 'a.jpg'}")
    elif case == "nested":
        args = [str(photos / "sub"), str(photos)]
        words = f"{photos / 'sub'}: the image folder must not lie inside the output folder"
    else:
        args += ["--max-pixels", "1599"]
        words = f"{photos / 'sub' / 'b.jpg'}: image is 40x40 (1600 pixels), more than the limit"
    before, inputs = snapshot(previous), snapshot(photos)
    assert predict(checkpoint, *args) == 1
    assert len(error_lines(caplog)) == 1 and words in error_lines(caplog)[0], caplog.text
    assert snapshot(previous) == before and snapshot(photos) == inputs
    assert leftovers(tmp_path) == []


def test_export_images_takes_the_limit_from_params(checkpoint, photos, previous, tmp_path,
                                                   monkeypatch, caplog):
    params = write_params(tmp_path, tmp_path, max_pixels=1599)
    before = snapshot(previous)
    monkeypatch.chdir(tmp_path)
    assert run_script("export", "--params", str(params), "--checkpoint", str(checkpoint),
                      "--images", str(photos), "--out", str(previous), "--device", "cpu",
                      monkeypatch=monkeypatch) == 1
    assert error_lines(caplog) == [f"{photos / 'sub' / 'b.jpg'}: image is 40x40 (1600 pixels), "
                                   "more than the limit of 1599 pixels (data.max_pixels)"]
    assert snapshot(previous) == before and leftovers(tmp_path) == []


# --- issue 20 item 7: what the project does before DVC parses params.yaml ---------------------

def _bomb(path):
    laughs = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
    path.write_text("\n".join(laughs) + "\ndata: {root: *i}\n")
    return path


def test_the_params_check_refuses_a_billion_laughs_file_in_one_line_and_make_repro_runs_it(
        tmp_path):
    """DVC parses params.yaml with a loader that expands aliases (`dvc status` ran out of
    memory); `python -m fcn.params` refuses it in a second, and `make repro` runs that check
    before `dvc repro`."""
    import time

    bomb = _bomb(tmp_path / "params.yaml")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fcn.params", str(bomb)], capture_output=True,
                          text=True, timeout=60)
    assert time.perf_counter() - start < 30
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: {bomb}: not valid YAML: aliases (*name) are not "
                                  "allowed in params, line 2")
    ok = subprocess.run([sys.executable, "-m", "fcn.params", "params.yaml"], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    plan = subprocess.run(["make", "-n", "repro"], cwd=REPO, capture_output=True, text=True,
                          timeout=60).stdout
    assert "-m fcn.params params.yaml" in plan and "dvc repro" in plan
    assert plan.index("-m fcn.params params.yaml") < plan.index("dvc repro")


def test_the_pre_commit_hook_refuses_a_params_file_the_stages_would_refuse(tmp_path):
    import os

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(REPO / ".githooks", repo / ".githooks")
    env = {**os.environ, "FCN_PYTHON": sys.executable, "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost"}
    env.pop("GIT_DIR", None)
    env.pop("GIT_INDEX_FILE", None)

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True)

    git("init", "-q")
    git("config", "core.hooksPath", ".githooks")  # what `make hooks` sets
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    git("add", "params.yaml")
    assert git("commit", "-q", "-m", "good").returncode == 0
    _bomb(repo / "params.yaml")
    git("add", "params.yaml")
    refused = git("commit", "-q", "-m", "bomb")
    assert refused.returncode == 1
    assert "aliases (*name) are not allowed" in refused.stderr
    assert "pre-commit: params.yaml refused" in refused.stderr
