"""The FCN family (32s, 16s, 8s): output size for any input, bilinear-initialised upsampling, zero-initialised scores,
backbone weights from a path, and the clear error for missing ImageNet weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from fcn.errors import DataError
from fcn.model import FCN8s, _upsample, build_model, imagenet_weights_file, split_at_pools
from fcn.params import ModelParams


@pytest.mark.parametrize("backbone", ["vgg11", "vgg11_bn", "vgg13_bn", "vgg16", "vgg16_bn"])
def test_output_has_the_input_size_for_odd_sizes(backbone):
    torch.manual_seed(0)
    model = FCN8s(backbone, num_classes=5).eval()
    with torch.no_grad():
        model.score_pool5.weight.normal_()  # non-zero logits, so the shape is not trivially 0
        for height, width in ((33, 47), (64, 95), (97, 31)):
            out = model(torch.rand(2, 3, height, width))
            assert out.shape == (2, 5, height, width)
            assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_fc67_option_keeps_the_output_size():
    model = FCN8s("vgg11_bn", num_classes=3, fc67=True, fc_channels=16).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 45, 70)).shape == (1, 3, 45, 70)


def test_pool_taps_are_found_from_the_pooling_layers():
    for backbone, strides in (("vgg11_bn", (8, 16, 32)), ("vgg16", (8, 16, 32))):
        features = torchvision.models.get_model(backbone, weights=None).features
        x = torch.rand(1, 3, 64, 64)
        channels = []
        for block, stride in zip(split_at_pools(features), strides):
            x = block(x)
            assert x.shape[-1] == 64 // stride
            channels.append(x.shape[1])
        assert channels == [256, 512, 512]


@pytest.mark.parametrize("factor", [2, 8, 16, 32])
def test_transposed_convolutions_reproduce_bilinear_upsampling_inside(factor):
    torch.manual_seed(0)
    x = torch.rand(1, 4, 9, 13)
    layer = _upsample(4, factor)
    with torch.no_grad():
        ours = layer(x)
        reference = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert ours.shape == reference.shape
    border = factor  # the outermost input pixel's half-kernel: there ours fades to zero
    inner = (..., slice(border, -border), slice(border, -border))
    torch.testing.assert_close(ours[inner], reference[inner], rtol=0, atol=1e-6)


def test_score_layers_start_at_zero_so_the_first_logits_are_zero():
    model = FCN8s("vgg11", num_classes=4).eval()
    with torch.no_grad():
        assert torch.count_nonzero(model(torch.rand(1, 3, 40, 40))) == 0


def test_backbone_weights_load_from_a_path(tmp_path):
    torch.manual_seed(1)
    vgg = torchvision.models.vgg11_bn(weights=None)
    path = tmp_path / "vgg11_bn.pth"
    torch.save(vgg.state_dict(), path)
    model = build_model(ModelParams(backbone="vgg11_bn", weights=str(path)))
    ours = [*model.to_pool3, *model.to_pool4, *model.to_pool5]
    for index, (theirs, mine) in enumerate(zip(vgg.features, ours)):
        for (name, a), (_, b) in zip(theirs.state_dict().items(), mine.state_dict().items()):
            assert torch.equal(a, b), f"features.{index}.{name}"


def test_backbone_weights_with_nan_are_refused_naming_the_tensor(tmp_path):
    """A NaN here used to stop training at its first step as "diverged: lower train.lr"."""
    state = {"features.0.weight": torch.zeros(64, 3, 3, 3),
             "features.0.bias": torch.tensor([0.0, math.nan])}
    path = tmp_path / "vgg11_bn.pth"
    torch.save(state, path)
    with pytest.raises(DataError, match=rf"^{path}: backbone weight features.0.bias holds NaN "
                                        "or infinite values$"):
        build_model(ModelParams(backbone="vgg11_bn", weights=str(path)))


def test_backbone_weights_of_another_vgg_are_refused_naming_the_problem(tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    with pytest.raises(DataError, match="do not fit vgg11_bn"):
        build_model(ModelParams(backbone="vgg11_bn", weights=str(path)))


def test_missing_imagenet_file_gives_the_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path, url = imagenet_weights_file("vgg11_bn")
    assert path.parent == tmp_path / "hub" / "checkpoints"
    with pytest.raises(DataError) as error:
        build_model(ModelParams(backbone="vgg11_bn", weights="imagenet"))
    message = str(error.value)
    assert str(path) in message and url in message and "offline" in message


def test_missing_weights_path_names_the_file(tmp_path):
    with pytest.raises(DataError, match="nowhere.pth"):
        build_model(ModelParams(weights=str(tmp_path / "nowhere.pth")))


class _Code:
    """Not a tensor: weights-only loading must refuse to unpickle it."""


def test_backbone_weights_with_pickled_code_are_refused_in_one_line(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": _Code()}, path)
    with pytest.raises(DataError) as error:
        build_model(ModelParams(weights=str(path)))
    message = str(error.value)
    assert message.startswith(f"{path}: backbone weights: refused: it holds a pickled Python "
                              "object (test_model._Code)")
    assert "\n" not in message and "weights_only" not in message


@pytest.mark.parametrize("arch", ["fcn32s", "fcn16s", "fcn8s"])
@pytest.mark.parametrize("backbone", ["vgg11_bn", "vgg16"])
def test_each_arch_keeps_the_input_size_and_starts_at_zero(arch, backbone):
    """Every arch on every kind of VGG: output of the input's size, zero logits before
    training (zero score layers), and only the skips the paper gives it."""
    torch.manual_seed(0)
    model = FCN8s(backbone, num_classes=5, arch=arch).eval()
    skips = {"fcn32s": [], "fcn16s": ["score_pool4", "up_pool5"],
             "fcn8s": ["score_pool4", "up_pool5", "score_pool3", "up_pool4"]}[arch]
    names = {name.split(".")[0] for name, _ in model.named_children()}
    assert names == {"to_pool3", "to_pool4", "to_pool5", "head", "score_pool5", "up_final",
                     *skips}
    factor = {"fcn32s": 32, "fcn16s": 16, "fcn8s": 8}[arch]
    assert model.up_final.stride == (factor, factor)
    assert model.up_final.kernel_size == (2 * factor, 2 * factor)
    with torch.no_grad():
        assert torch.count_nonzero(model(torch.rand(1, 3, 40, 40))) == 0
        for layer in [model.score_pool5, *(getattr(model, s) for s in skips
                                           if s.startswith("score"))]:
            layer.weight.normal_()
        for height, width in ((33, 47), (97, 31)):
            out = model(torch.rand(2, 3, height, width))
            assert out.shape == (2, 5, height, width) and out.abs().sum() > 0


def test_fcn32s_is_the_stride_32_scores_upsampled_bilinearly():
    """FCN-32s's whole head is score_pool5 then ×32 bilinear (as initialised): the logits are
    the scores at stride 32 upsampled, the paper's baseline."""
    torch.manual_seed(0)
    model = FCN8s("vgg11", num_classes=3, arch="fcn32s").eval()
    with torch.no_grad():
        model.score_pool5.weight.normal_()
        x = torch.rand(1, 3, 128, 192)
        scores = model.score_pool5(model.to_pool5(model.to_pool4(model.to_pool3(
            (x - model.mean) / model.std))))
        assert scores.shape[-2:] == (4, 6)
        reference = F.interpolate(scores, scale_factor=32, mode="bilinear", align_corners=False)
        inner = (..., slice(32, -32), slice(32, -32))  # the border fades, as for ×2 and ×8
        torch.testing.assert_close(model(x)[inner], reference[inner], rtol=0, atol=1e-5)


def test_an_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown arch 'fcn4s'"):
        FCN8s("vgg11", arch="fcn4s")
