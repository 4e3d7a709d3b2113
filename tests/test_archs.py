"""Every stage works with every arch of the family (issue 24): a checkpoint rebuilds its own
arch and refuses another in one line, the ONNX export runs like PyTorch, `fcn-predict` and the
benchmark's model take the arch from the checkpoint or the params."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcn.benchmark.inputs import trained_like_model
from fcn.cityscapes.labels import TRAINID_TO_ID
from fcn.checkpoint import load_model
from fcn.deploy import Agreement, export_onnx, session, to_input
from fcn.errors import DataError
from fcn.model import FCN, score_layers
from fcn.params import ModelParams
from fcn.predict.predictor import Predictor
from fcn.quantize import quantize_int8
from helpers.eval_data import save_checkpoint

COARSER = ("fcn32s", "fcn16s")  # FCN-8s: every other test of the suite


def _checkpoint(arch: str, folder: Path) -> tuple[str, Path, FCN]:
    """A checkpoint of `arch` whose score layers say something."""
    torch.manual_seed(0)
    model = FCN("vgg11_bn", arch=arch).eval()
    with torch.no_grad():
        for layer in score_layers(model):
            layer.weight.normal_(0, 0.05)
    return arch, save_checkpoint(folder / "best.pt", model, ModelParams(arch=arch)), model


@pytest.fixture(scope="module", params=COARSER)
def checkpoint(request, tmp_path_factory) -> tuple[str, Path, FCN]:
    return _checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def test_a_checkpoint_rebuilds_its_arch_and_refuses_params_for_another(checkpoint):
    arch, path, model = checkpoint
    loaded = load_model(path)
    assert loaded.arch == arch
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert load_model(path, ModelParams(arch=arch)).arch == arch
    with pytest.raises(DataError) as error:
        load_model(path, ModelParams(arch="fcn8s"))
    assert str(error.value) == (f"{path}: checkpoint is for model.arch={arch!r} but "
                                "params.yaml says model.arch='fcn8s'")


def test_the_onnx_export_and_int8_model_of_each_arch_run_like_pytorch(checkpoint, tmp_path):
    _, _, model = checkpoint
    path = tmp_path / "model.onnx"
    export_onnx(model, path, 18)
    images = np.random.default_rng(1).integers(0, 256, (1, 70, 100, 3), dtype=np.uint8)
    x = to_input(images)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    exported = session(path, threads=1).run(["logits"], {"images": x})[0]
    assert exported.shape == reference.shape == (1, 19, 70, 100)
    agreement = Agreement()
    agreement.add(reference, exported)
    assert agreement.max_abs_logit_diff < 1e-4 and agreement.fraction >= 0.9999
    # and its int8 model (per-channel weights of the x32/x16 transposed convolutions too)
    rng = np.random.default_rng(2)
    calibration = [to_input(rng.integers(0, 256, (1, 64, 96, 3), dtype=np.uint8))
                   for _ in range(2)]
    quantize_int8(path, tmp_path / "model_int8.onnx", calibration)
    int8 = session(tmp_path / "model_int8.onnx", threads=1).run(["logits"], {"images": x})[0]
    assert int8.shape == reference.shape
    quantised = Agreement()
    quantised.add(reference, int8)
    assert quantised.fraction >= 0.9, quantised  # random weights: small margins, yet close


def test_fcn_predict_rebuilds_the_arch_from_the_checkpoint(tmp_path):
    """Through the installed command, FCN-32s (the other archs load by the same load_model)."""
    _, path, _ = _checkpoint("fcn32s", tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(image).save(photos / "a.png")
    command = Path(sys.executable).parent / "fcn-predict"
    done = subprocess.run([str(command), "--checkpoint", str(path), str(photos),
                           str(tmp_path / "out"), "--device", "cpu", "--workers", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = TRAINID_TO_ID[Predictor(load_model(path))(image[None])[0]]
    written = np.asarray(Image.open(tmp_path / "out" / "a_labelIds.png"))
    assert np.array_equal(written, expected)
    assert len(np.unique(expected)) > 1  # a prediction worth comparing


def test_the_benchmarks_trained_like_model_is_of_the_arch_asked_for(checkpoint):
    arch = checkpoint[0]
    image = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    model = trained_like_model(ModelParams(arch=arch), image, seed=0)
    assert model.arch == arch and len(score_layers(model)) == {"fcn32s": 1, "fcn16s": 2}[arch]
    with torch.no_grad():
        labels = model(torch.from_numpy(to_input(image[None]))).argmax(1)
    assert len(labels.unique()) > 1  # random score layers: predictions vary
