"""fcn.quantize: static int8 QDQ quantisation that gives the same bytes every time, per-channel
int8 weights and uint8 activations, calibration that reads one image at a time, and clear
refusals. A two-convolution model keeps every test under a second; the deploy stage's tests
quantise the real FCN8s and measure its agreement and mIoU."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fcn.params import INT8_METHODS
from fcn.quantize import quantize_int8

CHANNELS = 8


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    """images (1, 3, H, W) → Conv 3x3 (8 filters of different scales) → Relu → Conv 1x1 (4)
    → logits, dynamic height and width, as the deploy stage's files name their ends."""
    rng = np.random.default_rng(0)
    w1 = (rng.normal(size=(CHANNELS, 3, 3, 3)) * np.logspace(-1, 0, CHANNELS)[:, None, None, None])
    w2 = rng.normal(size=(4, CHANNELS, 1, 1))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w1", "b1"], ["conv1"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv1"], ["relu1"]),
         helper.make_node("Conv", ["relu1", "w2", "b2"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, "height", "width"])],
        [numpy_helper.from_array(w1.astype(np.float32), "w1"),
         numpy_helper.from_array(np.zeros(CHANNELS, np.float32), "b1"),
         numpy_helper.from_array(w2.astype(np.float32), "w2"),
         numpy_helper.from_array(np.zeros(4, np.float32), "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    onnx.save(model, path)
    return path


def _images(count: int = 3, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((1, 3, 16 + 8 * i, 24), dtype=np.float32) for i in range(count)]


@pytest.mark.parametrize("method", INT8_METHODS)
def test_the_same_model_and_images_give_the_same_bytes(tiny_onnx, tmp_path, method):
    quantize_int8(tiny_onnx, tmp_path / "a.onnx", _images(), method)
    quantize_int8(tiny_onnx, tmp_path / "b.onnx", _images(), method)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # no temporaries


def test_the_calibration_decides_the_ranges(tiny_onnx, tmp_path):
    quantize_int8(tiny_onnx, tmp_path / "minmax.onnx", _images(), "minmax")
    quantize_int8(tiny_onnx, tmp_path / "percentile.onnx", _images(), "percentile")
    quantize_int8(tiny_onnx, tmp_path / "other.onnx", _images(seed=2), "minmax")
    data = {p.stem: p.read_bytes() for p in tmp_path.iterdir()}
    assert len(set(data.values())) == 3


def test_weights_are_int8_per_channel_and_activations_uint8_in_qdq(tiny_onnx, tmp_path):
    out = tmp_path / "int8.onnx"
    quantize_int8(tiny_onnx, out, _images())
    model = onnx.load(out)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dequantized = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    for conv, channels in zip(convs, (CHANNELS, 4)):
        data, weight = (dequantized[name] for name in conv.input[:2])  # both come quantised
        assert inits[weight.input[0]].dtype == np.int8  # int8 weights, stored as int8
        assert inits[weight.input[1]].shape == (channels,)  # one scale per output channel
        assert not inits[weight.input[2]].any()  # symmetric
        assert inits[data.input[2]].dtype == np.uint8  # uint8 activations
    # and onnxruntime runs it close to the fp32 model (on an image it was not calibrated on,
    # where the few logits beyond the calibrated range are clipped)
    x = _images(1, seed=5)[0]
    run = lambda path: ort.InferenceSession(  # noqa: E731
        str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"images": x})[0]
    fp32, int8 = run(tiny_onnx), run(out)
    assert int8.shape == fp32.shape
    assert np.percentile(np.abs(int8 - fp32), 99) < 0.02 * np.abs(fp32).max()
    assert (int8.argmax(1) == fp32.argmax(1)).mean() > 0.95


class _Recording:
    """A lazy sequence of calibration images that records each read and which earlier images
    are still alive when the next is read."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images
        self.reads: list[int] = []
        self.alive_at_read: list[int] = []
        self.handed: list[weakref.ref] = []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        gc.collect()
        self.alive_at_read.append(sum(ref() is not None for ref in self.handed))
        self.reads.append(index)
        image = self.images[index].copy()
        self.handed.append(weakref.ref(image))
        return image


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_calibration_reads_each_image_once_in_order_and_keeps_none(tiny_onnx, tmp_path, method,
                                                                   monkeypatch):
    """Each of onnxruntime's collection passes sees one image (a histogram method keeps every
    activation of the images of one pass until it ends), and no image outlives its pass."""
    from onnxruntime.quantization import calibrate

    images = _Recording(_images(4))
    passes = []
    calibrator = {"minmax": calibrate.MinMaxCalibrater,
                  "entropy": calibrate.HistogramCalibrater}[method]
    collect = calibrator.collect_data

    def counted(self, reader):
        passes.append(reader.end - reader.next)
        return collect(self, reader)

    monkeypatch.setattr(calibrator, "collect_data", counted)
    quantize_int8(tiny_onnx, tmp_path / "int8.onnx", images, method)
    assert images.reads == [0, 1, 2, 3] and passes == [1, 1, 1, 1]
    assert images.alive_at_read == [0, 0, 0, 0]  # one image in memory at a time


def test_bad_calls_are_refused_and_write_nothing(tiny_onnx, tmp_path):
    out = tmp_path / "int8.onnx"
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_int8(tiny_onnx, out, _images(), "kl")
    with pytest.raises(ValueError, match="at least one calibration image"):
        quantize_int8(tiny_onnx, out, [])
    wrong = [*_images(1), np.zeros((1, 3, 16, 24), np.float64)]
    with pytest.raises(ValueError, match=r"calibration image 1: expected float32 \(1, 3, H, W\), "
                                         r"got float64 \(1, 3, 16, 24\)"):
        quantize_int8(tiny_onnx, out, wrong)
    assert list(tmp_path.iterdir()) == []
