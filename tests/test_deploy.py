"""The deploy stage: ONNX with dynamic height and width that onnxruntime runs like PyTorch, its
int8 copy with its agreement and val mIoU measured (the official scores, recomputed here), a
floor that fails in one line and writes nothing, and the report."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from helpers.eval_data import eval_data, official_evaluation
from fcn import deploy
from fcn import quantize
from fcn.checkpoint import load_model
from fcn.cityscapes.labels import TRAINID_TO_ID
from fcn.cityscapes.layout import list_images, mask_path, stem_of
from fcn.deploy import (ORT, ORT_INT8, TORCH, Agreement, Check, DeployError, ModelInputs,
                        calibration_images, deploy_stage, export_onnx, session, to_input)
from fcn.errors import DataError, FcnError
from fcn.images import read_rgb
from fcn.model import FCN8s
from fcn.params import DeployParams, ModelParams


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return eval_data(tmp_path_factory)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    torch.manual_seed(0)
    model = FCN8s("vgg11_bn").eval()
    with torch.no_grad():  # score layers start at zero: give the logits something to say
        for layer in (model.score_pool3, model.score_pool4, model.score_pool5):
            layer.weight.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, path, 18)
    return model, path


@pytest.mark.parametrize("shape", [(1, 64, 128), (2, 100, 150), (1, 33, 47)])
def test_onnx_runs_any_size_like_pytorch(onnx_model, shape):
    model, path = onnx_model
    images = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    x = to_input(images)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    exported = session(path, threads=1).run(["logits"], {"images": x})[0]
    assert exported.shape == reference.shape == (shape[0], 19, shape[1], shape[2])
    assert np.abs(exported - reference).max() < 1e-4
    agreement = Agreement()
    agreement.add(reference, exported)
    assert agreement.fraction >= 0.9999 and agreement.images == shape[0]


def test_onnx_file_is_self_contained(onnx_model):
    _, path = onnx_model
    assert not list(path.parent.glob("*.data"))  # weights inside, no external data file
    inputs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()
    assert [i.name for i in inputs] == ["images"] and inputs[0].shape[1] == 3
    assert all(isinstance(d, str) for d in (inputs[0].shape[0], *inputs[0].shape[2:]))  # dynamic


def test_the_onnx_file_is_the_same_bytes_from_any_checkout(onnx_model, tmp_path):
    """No source path in the file (the exporter's stack traces are dropped), and the same
    model exported again gives the same bytes (issue 21)."""
    import fcn

    model, path = onnx_model
    data = path.read_bytes()
    assert str(Path(fcn.__file__).parent).encode() not in data
    assert b"model.py" not in data
    export_onnx(model, tmp_path / "again.onnx", 18)
    assert (tmp_path / "again.onnx").read_bytes() == data


def _params(tmp_path, **changes) -> DeployParams:
    values = {"height": 64, "width": 128, "warmup": 0, "iters": 1, "threads": 1,
              "int8_calibration_images": 2, "out": str(tmp_path / "deploy"), **changes}
    return DeployParams(**values)


@pytest.fixture(scope="module")
def deployed(data, tmp_path_factory):
    """The stage run once on the probe checkpoint (int8 on, the default), and its outputs. The
    probe's random backbone is harder on int8 than a trained one (88% agreement; the default
    pipeline's model: 99%), hence its own floor."""
    tmp_path = tmp_path_factory.mktemp("deployed")
    report = deploy_stage(data.checkpoint, data.root, data.generated, ModelParams(),
                          _params(tmp_path, int8_min_agreement=0.8), tmp_path / "deploy.json",
                          latency_file=tmp_path / "latency.json")
    return tmp_path, report


def test_deploy_stage_writes_both_models_and_the_report(deployed):
    tmp_path, report = deployed
    scores = json.loads((tmp_path / "deploy.json").read_text())
    timings = json.loads((tmp_path / "latency.json").read_text())
    assert {**scores, **timings} == report
    assert set(timings) == {"latency_ms", "onnxruntime_speedup", "int8_speedup",
                            "latency_height", "latency_width"}  # every timing apart
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy", "deploy.json",
                                                          "latency.json"]  # no temporaries
    folder = tmp_path / "deploy"
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model_int8.onnx"]
    assert report["agreement"] >= 0.9999 and report["images"] == 6
    assert report["pixels"] == 6 * 64 * 128
    assert 0 <= report["max_abs_logit_diff"] < 1e-3
    assert report["opset"] == 18
    assert report["file_mb"] == (folder / "model.onnx").stat().st_size / 2**20 > 30
    int8 = report["int8"]
    assert int8["file_mb"] == (folder / "model_int8.onnx").stat().st_size / 2**20
    assert int8["file_mb"] < report["file_mb"] / 3  # int8 weights
    assert int8["calibration_images"] == 2
    assert int8["miou_drop"] == report["miou"][TORCH] - report["miou"][ORT_INT8]
    assert set(report["latency_ms"]) == set(report["miou"]) == {TORCH, ORT, ORT_INT8}
    assert all(v > 0 for v in report["latency_ms"].values())
    ms = report["latency_ms"]
    assert math.isclose(report["onnxruntime_speedup"], ms[TORCH] / ms[ORT])
    assert math.isclose(report["int8_speedup"], ms[ORT] / ms[ORT_INT8])

    def leaves(value):
        return [x for v in value.values() for x in leaves(v)] if isinstance(value, dict) \
            else [value]
    assert all(not isinstance(v, str) for v in leaves(report))  # numbers: dvc metrics columns


def test_agreement_and_val_miou_of_each_runtime_are_the_official_scores(data, deployed,
                                                                       tmp_path):
    """Recomputed here from the written files: each runtime's val predictions written as
    label-id PNGs and scored by cityscapesScripts itself; int8's agreement with PyTorch fp32
    counted pixel by pixel."""
    from PIL import Image

    out, report = deployed
    model = load_model(data.checkpoint)
    sessions = {ORT: session(out / "deploy" / "model.onnx", threads=1),
                ORT_INT8: session(out / "deploy" / "model_int8.onnx", threads=1)}
    agreeing, pixels = 0, 0
    predictions: dict[str, list[Path]] = {name: [] for name in (TORCH, *sessions)}
    for image in list_images(data.root, "val"):
        x = to_input(read_rgb(image)[None])
        with torch.no_grad():
            classes = {TORCH: model(torch.from_numpy(x)).numpy()[0].argmax(0)}
        for name, sess in sessions.items():
            classes[name] = sess.run(["logits"], {"images": x})[0][0].argmax(0)
        agreeing += int((classes[ORT_INT8] == classes[TORCH]).sum())
        pixels += classes[TORCH].size
        for name, train_ids in classes.items():
            path = tmp_path / name / f"{stem_of(image)}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(TRAINID_TO_ID[train_ids].astype(np.uint8)).save(path)
            predictions[name].append(path)
    assert report["int8"]["agreement"] == agreeing / pixels
    assert 0.8 < report["int8"]["agreement"] < 1  # int8 differs, a little
    for name, files in predictions.items():
        official = official_evaluation(data.val_labels, files)
        assert report["miou"][name] == pytest.approx(official["averageScoreClasses"], abs=1e-9)
    assert report["miou"][ORT] == report["miou"][TORCH]  # fp32 export: the same argmax


def test_the_int8_model_is_the_test_split_spread_quantised(data, deployed, tmp_path):
    """model_int8.onnx is fcn.quantize of model.onnx on deploy.int8_calibration_images test
    images spread over the split (first and last): byte for byte."""
    out, _ = deployed
    chosen = calibration_images(data.root, "test", 2)
    test = list_images(data.root, "test")
    assert chosen == [test[0], test[-1]] and len(test) == 4
    quantize.quantize_int8(out / "deploy" / "model.onnx", tmp_path / "again.onnx",
                           ModelInputs(chosen), "minmax")
    assert (tmp_path / "again.onnx").read_bytes() == \
        (out / "deploy" / "model_int8.onnx").read_bytes()


def _fast_stage(monkeypatch, onnx_model) -> None:
    """The stage without its slow parts: the fixture's model stands for the checkpoint's and
    its export is copied; int8 'quantisation' copies the fp32 file."""
    model, path = onnx_model
    monkeypatch.setattr(deploy, "load_model", lambda *args: model)
    monkeypatch.setattr(deploy, "export_onnx",
                        lambda net, out, opset: shutil.copyfile(path, out))
    monkeypatch.setattr(quantize, "quantize_int8",
                        lambda fp32, out, images, method: shutil.copyfile(fp32, out))


def test_without_int8_only_the_fp32_model_is_written_and_reported(data, onnx_model, tmp_path,
                                                                  monkeypatch):
    _fast_stage(monkeypatch, onnx_model)
    monkeypatch.setattr(quantize, "quantize_int8", None)  # never called
    report = deploy_stage(data.checkpoint, data.root, data.generated, ModelParams(),
                          _params(tmp_path, int8=False), tmp_path / "d.json")
    assert sorted(p.name for p in (tmp_path / "deploy").iterdir()) == ["model.onnx"]
    assert "int8" not in report and "int8_speedup" not in report
    assert set(report["miou"]) == set(report["latency_ms"]) == {TORCH, ORT}
    assert report["agreement"] >= 0.9999


def _check(fp32: tuple[int, int], int8: tuple[int, int], miou_torch: float,
           miou_int8: float) -> Check:
    return Check({ORT: Agreement(1, fp32[1], fp32[0], 3.5),
                  ORT_INT8: Agreement(1, int8[1], int8[0], 0.5)},
                 {TORCH: miou_torch, ORT: miou_torch, ORT_INT8: miou_int8})


@pytest.mark.parametrize("check, says", [
    (_check((99, 100), (99, 100), 0.7, 0.7),
     "the ONNX export agrees with PyTorch on 99.000000% of 100 val pixels (largest logit "
     "difference 3.5), below deploy.min_agreement 99.9900%"),
    (_check((100, 100), (9700, 10000), 0.65, 0.6),
     "the int8 model agrees with PyTorch fp32 on 97.0000% of 10000 val pixels, 1.0000% short "
     "of deploy.int8_min_agreement 98.0000% (val mIoU 0.6000, fp32 0.6500; calibration "
     "minmax)"),
    (_check((100, 100), (9900, 10000), 0.7, 0.68),
     "the int8 model's val mIoU 0.6800 is 0.0200 below PyTorch fp32's 0.7000, 0.0100 more "
     "than deploy.int8_max_miou_drop 0.0100 (agreement 99.0000%; calibration minmax)"),
], ids=["fp32-agreement", "int8-agreement", "int8-miou-drop"])
def test_a_model_below_its_floor_fails_in_one_line_and_keeps_the_previous_folder(
        data, onnx_model, tmp_path, monkeypatch, check, says):
    params = _params(tmp_path)
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the previous model")
    _fast_stage(monkeypatch, onnx_model)
    monkeypatch.setattr(deploy, "check_runtimes", lambda *args: check)
    with pytest.raises(DeployError) as error:
        deploy_stage(data.checkpoint, data.root, data.generated, ModelParams(), params,
                     tmp_path / "d.json")
    assert isinstance(error.value, FcnError)
    assert str(error.value) == (f"{data.checkpoint}: {says}; nothing was written ({out} is as "
                                "it was)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy"]  # no metrics, no temporary
    assert [p.name for p in out.iterdir()] == ["model.onnx"]
    assert (out / "model.onnx").read_bytes() == b"the previous model"


def _never(*args):
    raise AssertionError("exported before the inputs were checked")


def test_val_images_above_data_max_pixels_are_refused_before_the_export(data, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(deploy, "export_onnx", _never)
    first = sorted((data.root / "leftImg8bit" / "val").rglob("*.png"))[0]
    with pytest.raises(DataError) as error:
        deploy_stage(data.checkpoint, data.root, data.generated, ModelParams(),
                     _params(tmp_path), tmp_path / "d.json", max_pixels=1000)
    assert str(error.value) == (f"{first}: image is 128x64 (8192 pixels), more than the limit "
                                "of 1000 pixels (data.max_pixels)")
    assert not (tmp_path / "d.json").exists() and not (tmp_path / "deploy").exists()


def test_missing_ground_truth_or_calibration_split_is_refused_before_the_export(
        data, tmp_path, monkeypatch):
    monkeypatch.setattr(deploy, "export_onnx", _never)
    stem = stem_of(list_images(data.root, "val")[0])
    with pytest.raises(DataError) as error:
        deploy_stage(data.checkpoint, data.root, tmp_path / "nowhere", ModelParams(),
                     _params(tmp_path), tmp_path / "d.json")
    assert str(error.value) == (f"{mask_path(tmp_path / 'nowhere', 'val', stem, 'labelIds')}: "
                                "ground-truth file not found (and 5 more)")
    with pytest.raises(DataError, match="train_extra"):  # the eval set has no train_extra
        deploy_stage(data.checkpoint, data.root, data.generated, ModelParams(),
                     _params(tmp_path, int8_calibration="train_extra"), tmp_path / "d.json")
    assert not (tmp_path / "d.json").exists() and not (tmp_path / "deploy").exists()


def test_a_deploy_folder_holding_other_files_is_refused_and_kept(data, tmp_path, monkeypatch):
    """deploy.out is replaced whole: a folder with files the stage did not write (a careless
    `deploy.out: metrics`) is refused before any work, and nothing in it is touched."""
    monkeypatch.setattr(deploy, "export_onnx", _never)
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"ours")
    (out / "notes.txt").write_text("not ours")
    with pytest.raises(DataError) as error:
        deploy_stage(data.checkpoint, data.root, data.generated, ModelParams(),
                     _params(tmp_path), tmp_path / "d.json")
    assert str(error.value) == (f"{out}: deploy.out holds 1 file(s) the deploy stage did not "
                                "write (e.g. notes.txt), and the stage replaces the folder "
                                "whole; choose a new or empty folder")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "notes.txt"]
    assert (out / "model.onnx").read_bytes() == b"ours" and not (tmp_path / "d.json").exists()
