"""The deploy stage: ONNX with dynamic height and width that onnxruntime runs like PyTorch, a
failing check that writes nothing, and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from helpers.eval_data import eval_data
from fcn import deploy
from fcn.deploy import Agreement, DeployError, deploy_stage, export_onnx, session, to_input
from fcn.errors import DataError, FcnError
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
    path = tmp_path_factory.mktemp("onnx") / "fcn8s.onnx"
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
              "out": str(tmp_path / "deploy" / "fcn8s.onnx"), **changes}
    return DeployParams(**values)


def test_deploy_stage_writes_the_model_and_the_report(data, tmp_path):
    params = _params(tmp_path)
    report = deploy_stage(data.checkpoint, data.root, ModelParams(), params,
                          tmp_path / "deploy.json", latency_file=tmp_path / "latency.json")
    scores = json.loads((tmp_path / "deploy.json").read_text())
    timings = json.loads((tmp_path / "latency.json").read_text())
    assert {**scores, **timings} == report
    assert set(timings) == {"latency_ms", "onnxruntime_speedup", "latency_height",
                            "latency_width"}  # every timing apart from the check's figures
    assert report["agreement"] >= 0.9999 and report["images"] == 6
    assert report["pixels"] == 6 * 64 * 128
    assert 0 <= report["max_abs_logit_diff"] < 1e-3
    assert report["opset"] == 18 and report["file_mb"] > 30
    assert set(report["latency_ms"]) == {"torch", "onnxruntime"}
    assert all(v > 0 for v in report["latency_ms"].values())
    assert math.isclose(report["onnxruntime_speedup"],
                        report["latency_ms"]["torch"] / report["latency_ms"]["onnxruntime"])
    assert all(not isinstance(v, str) for v in report.values())  # numbers: dvc metrics columns


def test_disagreement_fails_in_one_line_and_keeps_the_previous_model(data, tmp_path,
                                                                     monkeypatch):
    params = _params(tmp_path)
    out = tmp_path / "deploy" / "fcn8s.onnx"
    out.parent.mkdir()
    out.write_bytes(b"the previous model")

    def poor(model, sess, images, max_pixels):
        return Agreement(images=1, pixels=100, agreeing=99, max_abs_logit_diff=3.5)

    monkeypatch.setattr(deploy, "check_agreement", poor)
    with pytest.raises(DeployError) as error:
        deploy_stage(data.checkpoint, data.root, ModelParams(), params, tmp_path / "d.json")
    message = str(error.value)
    assert isinstance(error.value, FcnError) and "\n" not in message
    assert "99.000000%" in message and "deploy.min_agreement" in message
    assert out.read_bytes() == b"the previous model"
    assert not (tmp_path / "d.json").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["fcn8s.onnx"]  # no temporary left


def test_val_images_above_data_max_pixels_are_refused_before_the_export(data, tmp_path,
                                                                        monkeypatch):
    def never(*args):
        raise AssertionError("exported before the val images were checked")

    monkeypatch.setattr(deploy, "export_onnx", never)
    first = sorted((data.root / "leftImg8bit" / "val").rglob("*.png"))[0]
    with pytest.raises(DataError) as error:
        deploy_stage(data.checkpoint, data.root, ModelParams(), _params(tmp_path),
                     tmp_path / "d.json", max_pixels=1000)
    assert str(error.value) == (f"{first}: image is 128x64 (8192 pixels), more than the limit "
                                "of 1000 pixels (data.max_pixels)")
    assert not (tmp_path / "d.json").exists() and not (tmp_path / "deploy").exists()
