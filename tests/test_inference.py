"""fcn.predict.predictor: checkpoints are checked before use, predictions are full-size trainIds,
batching/channels-last/flip TTA behave, and predictions stream with bounded read-ahead."""

from __future__ import annotations

import copy
import math
import threading
import time

import numpy as np
import pytest
import torch

from helpers.eval_data import save_checkpoint
from fcn.errors import DataError, FcnError
from fcn.checkpoint import load_model
from fcn.device import resolve_device
from fcn.predict.predictor import Predictor, predict_stream
from fcn.model import FCN8s
from fcn.params import ModelParams
from fcn.threads import read_ahead


@pytest.fixture(scope="module")
def model() -> FCN8s:
    torch.manual_seed(1)
    net = FCN8s("vgg11_bn", 19).eval()
    for layer in (net.score_pool5, net.score_pool4, net.score_pool3):  # varied predictions
        torch.nn.init.normal_(layer.weight, std=0.5)
    return net


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(2, 37, 50, 3), dtype=np.uint8)  # not a multiple of 32


def test_checkpoint_round_trip(model, tmp_path):
    path = save_checkpoint(tmp_path / "best.pt", model)
    loaded = load_model(path, ModelParams())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_checkpoint(tmp_path):
    with pytest.raises(DataError, match=r"models/best\.pt: checkpoint not found"):
        load_model(tmp_path / "models" / "best.pt", ModelParams())


def test_checkpoint_for_another_backbone(model, tmp_path):
    path = save_checkpoint(tmp_path / "best.pt", model, ModelParams(backbone="vgg16_bn"))
    with pytest.raises(DataError) as info:
        load_model(path, ModelParams())
    assert str(path) in str(info.value)
    assert "model.backbone='vgg16_bn'" in str(info.value) and "'vgg11_bn'" in str(info.value)


def test_checkpoint_for_another_head(model, tmp_path):
    path = save_checkpoint(tmp_path / "best.pt", model, ModelParams(fc67=True))
    with pytest.raises(DataError, match="model.fc67=True"):
        load_model(path, ModelParams())


def test_checkpoint_for_another_class_count(model, tmp_path):
    path = save_checkpoint(tmp_path / "best.pt", model, num_classes=20)
    with pytest.raises(DataError, match=r"best\.pt: checkpoint predicts 20 classes"):
        load_model(path, ModelParams())


def test_checkpoint_with_weights_that_do_not_fit(model, tmp_path):
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("score_pool3")}
    path = tmp_path / "best.pt"
    torch.save({"model": state, "model_params": {"backbone": "vgg11_bn", "fc67": False},
                "num_classes": 19, "epoch": 3}, path)
    with pytest.raises(DataError, match="weights do not fit fcn8s/vgg11_bn") as info:
        load_model(path, ModelParams())
    assert "score_pool3.weight" in str(info.value)


class Pickled:
    """Not a tensor: weights_only=True must refuse to unpickle it."""


@pytest.mark.parametrize("content, words", [
    ("garbage", "not a readable PyTorch checkpoint"),
    ("truncated", "truncated or damaged: not a complete PyTorch file"),
    ("not a dict", "not a training checkpoint"),
    ("pickled object", "refused: it holds a pickled Python object (test_inference.Pickled), "
                       "which weights-only loading never runs"),
    ("no model", "not a training checkpoint"),
])
def test_unusable_checkpoint_files_are_refused_in_one_line(tmp_path, model, content, words):
    path = tmp_path / "best.pt"
    if content == "garbage":
        path.write_bytes(b"\x00" * 100)
    elif content == "truncated":
        torch.save({"model": model.state_dict(), "model_params": {}, "num_classes": 19}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "not a dict":
        torch.save(torch.zeros(3), path)
    elif content == "pickled object":
        torch.save({"model": Pickled(), "model_params": {}, "num_classes": 19}, path)
    else:
        torch.save({"epoch": 1}, path)
    with pytest.raises(DataError) as error:
        load_model(path, ModelParams())
    message = str(error.value)
    assert message.startswith(f"{path}: ") and words in message, message
    assert "\n" not in message and "weights_only" not in message and len(message) < 400


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda():
    with pytest.raises(FcnError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_prediction_is_full_size_trainids_equal_to_the_model_argmax(model, images):
    prediction = Predictor(model)(images)
    assert prediction.shape == images.shape[:3] and prediction.dtype == np.uint8
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        expected = model(x).argmax(1).numpy()
    assert np.array_equal(prediction, expected)
    assert len(np.unique(prediction)) > 3  # the test model is not constant


def test_batching_does_not_change_predictions(model, images):
    predictor = Predictor(model)
    one_by_one = np.concatenate([predictor(images[i:i + 1]) for i in range(len(images))])
    assert np.array_equal(predictor(images), one_by_one)


def test_channels_last_agrees(model, images):
    plain = Predictor(model)(images)
    channels_last = Predictor(copy.deepcopy(model), channels_last=True)
    assert (channels_last(images) == plain).mean() >= 0.999


def test_flip_tta_is_flip_equivariant(model, images):
    predictor = Predictor(model, flip_tta=True)
    prediction = predictor(images)
    flipped = predictor(np.ascontiguousarray(images[:, :, ::-1]))
    assert np.array_equal(flipped, prediction[:, :, ::-1])
    assert not np.array_equal(prediction, Predictor(model)(images))  # it does something


def test_stream_keeps_order_and_groups_sizes(model):
    rng = np.random.default_rng(1)
    shapes = [(32, 40), (32, 40), (20, 24), (32, 40), (32, 40), (32, 40)]
    arrays = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]
    predictor = Predictor(model)
    calls: list[int] = []

    class Counting(Predictor):
        def predict(self, batch, keep_scores=False):
            calls.append(len(batch))
            return super().predict(batch, keep_scores)

    counting = Counting(model)
    out = list(predict_stream(counting, list(range(6)), lambda i: (arrays[i], f"p{i}"),
                              batch_size=2, workers=2))
    assert [item for item, *_ in out] == list(range(6))
    assert [payload for _, _, payload, _, _ in out] == [f"p{i}" for i in range(6)]
    assert calls == [2, 1, 2, 1]  # same-size neighbours batched, never mixed sizes
    for i, (_, image, _, prediction, scores) in enumerate(out):
        assert image is arrays[i] and prediction.shape == shapes[i] and scores is None
        assert np.array_equal(prediction, predictor(arrays[i][None])[0])
    kept = list(predict_stream(counting, list(range(6)), lambda i: (arrays[i], f"p{i}"),
                               batch_size=2, workers=2, keep_scores=True))
    for i, (_, _, _, prediction, scores) in enumerate(kept):  # each image's own logits
        expected = predictor.scores(torch.from_numpy(arrays[i][None]))[0]
        assert scores.dtype == torch.float32 and torch.allclose(scores, expected, atol=1e-5)
        assert np.array_equal(prediction, scores.argmax(0).numpy())


def test_read_ahead_is_bounded():
    """Streaming: never more than `depth` items loaded and not yet consumed."""
    lock, state = threading.Lock(), {"loaded": 0, "consumed": 0, "max_ahead": 0}

    def load(i: int) -> int:
        with lock:
            state["loaded"] += 1
            state["max_ahead"] = max(state["max_ahead"], state["loaded"] - state["consumed"])
        return i

    for i, value in read_ahead(load, range(50), workers=3, depth=4):
        assert value == i
        time.sleep(0.001)
        with lock:
            state["consumed"] += 1
    assert state["loaded"] == 50 and state["max_ahead"] <= 4 + 1


def test_read_ahead_raises_at_the_failing_item():
    def load(i: int) -> int:
        if i == 3:
            raise DataError(f"item {i} is bad")
        return i

    seen = []
    with pytest.raises(DataError, match="item 3 is bad"):
        for i, _ in read_ahead(load, range(10), workers=2):
            seen.append(i)
    assert seen == [0, 1, 2]


# --- checkpoints a hostile or careless user brings (issue 20) --------------------------------

def test_checkpoint_architecture_is_bounded_before_anything_is_built(model, tmp_path):
    """fc_channels 32768 used to build an 8 GB model before 'weights do not fit': the fields
    are checked against params.yaml's ranges first, in one line."""
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "model_params": {
        "backbone": "vgg11_bn", "fc67": True, "fc_channels": 32768}, "num_classes": 19}, path)
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"model_params\.fc_channels: must be <= 16384, "
                                        r"got 32768") as error:
        load_model(path)
    assert time.perf_counter() - start < 5 and "\n" not in str(error.value)
    torch.save({"model": model.state_dict(), "model_params": {"backbone": "resnet50"},
                "num_classes": 19}, path)
    with pytest.raises(DataError, match="model_params.backbone: expected one of"):
        load_model(path)


def test_checkpoint_shapes_are_checked_against_the_architecture_in_one_line(model, tmp_path,
                                                                            monkeypatch):
    from fcn import model as model_module

    state = dict(model.state_dict())
    state["score_pool4.weight"] = torch.zeros(19, 256, 1, 1)
    path = save_checkpoint(tmp_path / "best.pt", model)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"] = state
    torch.save(checkpoint, path)
    built = []
    monkeypatch.setattr(model_module.FCN8s, "__init__", _recording(model_module.FCN8s.__init__,
                                                                    built))
    with pytest.raises(DataError) as error:
        load_model(path)
    message = str(error.value)
    assert message == (f"{path}: weights do not fit fcn8s/vgg11_bn: 1 tensor(s) of "
                       "another shape, e.g. score_pool4.weight is [19, 256, 1, 1] in the file, "
                       "[19, 512, 1, 1] in the model")
    assert all(device == "meta" for device in built)  # nothing real was allocated


def _recording(init, built):
    def wrapped(self, *args, **kwargs):
        built.append(torch.get_default_device().type)
        return init(self, *args, **kwargs)
    return wrapped


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_non_finite_checkpoint_tensors_are_refused_in_one_line(model, tmp_path, where):
    from fcn.checkpoint import load

    path = save_checkpoint(tmp_path / "last.pt", model)
    checkpoint = torch.load(path, weights_only=True)
    if where == "model":
        checkpoint["model"]["score_pool5.bias"] = torch.full((19,), math.nan)
        name = "model.score_pool5.bias"
    else:
        checkpoint["optimizer"] = {"state": {0: {"exp_avg": torch.tensor([1.0, math.inf])}}}
        name = "optimizer.state.0.exp_avg"
    torch.save(checkpoint, path)
    with pytest.raises(DataError) as error:
        load(path)
    assert str(error.value) == (f"{path}: tensor {name} holds "
                                f"{19 if where == 'model' else 1} NaN or infinite value(s) of "
                                f"{19 if where == 'model' else 2}; the weights diverged (use an "
                                "earlier checkpoint)")
    if where == "model":
        with pytest.raises(DataError, match="NaN or infinite"):  # what deploy and evaluate load
            load_model(path)


@pytest.mark.parametrize("damage, words", [
    ("negative variance", "to_pool3.1.running_var holds a negative variance"),
    ("float64 weight", "1 tensor(s) of another dtype, e.g. to_pool3.0.weight is float64 in "
                       "the file, float32 in the model"),
    ("complex weight", "tensor model.to_pool3.0.weight holds 1 NaN or infinite value(s)"),
    ("meta tensor", "tensor model.to_pool3.0.weight is not a plain dense tensor (meta)"),
    ("sparse tensor", "tensor model.to_pool3.0.weight is not a plain dense tensor (sparse_coo)"),
])
def test_weights_that_would_predict_nan_are_refused_however_they_hide(model, tmp_path, damage,
                                                                      words):
    """Each passed the finiteness check and made every prediction 'road' (issue 20)."""
    path = save_checkpoint(tmp_path / "best.pt", model)
    checkpoint = torch.load(path, weights_only=True)
    weights = checkpoint["model"]
    if damage == "negative variance":
        weights["to_pool3.1.running_var"][0] = -1.0
    elif damage == "float64 weight":
        weights["to_pool3.0.weight"] = weights["to_pool3.0.weight"].double()
        weights["to_pool3.0.weight"][0, 0, 0, 0] = 1e300
    elif damage == "complex weight":
        complex_ = weights["to_pool3.0.weight"].to(torch.complex64)
        complex_[0, 0, 0, 0] = complex(math.nan, 0)
        weights["to_pool3.0.weight"] = complex_
    elif damage == "meta tensor":
        weights["to_pool3.0.weight"] = weights["to_pool3.0.weight"].to("meta")
    else:
        weights["to_pool3.0.weight"] = weights["to_pool3.0.weight"].to_sparse()
    torch.save(checkpoint, path)
    with pytest.raises(DataError) as error:
        load_model(path)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_the_predictor_refuses_to_argmax_non_finite_logits():
    from fcn.predict.predictor import Predictor

    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 19, *x.shape[2:]), math.nan)

    with pytest.raises(FcnError, match="outputs hold NaN or infinite values"):
        Predictor(Broken())(np.zeros((1, 8, 8, 3), np.uint8))
