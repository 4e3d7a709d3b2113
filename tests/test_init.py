"""Whole-model initialisation (train.init): what matches by name and shape is loaded, the rest
left as built and reported; another backbone or a file that is no checkpoint of ours is one
line; the init file's content is part of the training hash; a run reports what it loaded."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fcn import checkpoint as ckpt
from fcn.errors import DataError
from fcn.model import FCN8s
from fcn.params import ModelParams, TrainParams, parse_params, sections_dict
from fcn.train.fit import fit
from helpers.eval_data import save_checkpoint
from helpers.trainset import tiny_params

SCORE_LAYERS = ("score_pool3", "score_pool4", "score_pool5")


@pytest.fixture(scope="module")
def nineteen(tmp_path_factory):
    """A 19-class checkpoint with recognisable weights, and its model."""
    torch.manual_seed(1)
    model = FCN8s("vgg11_bn", 19)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)  # a variance is positive
            elif tensor.is_floating_point():
                tensor.normal_()
    return save_checkpoint(tmp_path_factory.mktemp("init") / "best.pt", model), model


def test_a_19_class_checkpoint_initialises_a_model_of_another_class_count(nineteen):
    path, source = nineteen
    torch.manual_seed(2)
    target = FCN8s("vgg11_bn", 7)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = ckpt.initialise_from(target, path, ModelParams())
    theirs, after = source.state_dict(), target.state_dict()
    # exactly the tensors whose shape depends on the class count stay as built
    differ = sorted(k for k in after if after[k].shape != theirs[k].shape)
    assert differ and all(k.startswith((*SCORE_LAYERS, "up_")) for k in differ), differ
    assert sorted(report.fresh) == differ == sorted(report.unused)
    assert sorted(report.loaded) == sorted(k for k in after if k not in differ)
    for name in report.loaded:
        assert torch.equal(after[name], theirs[name]), name
    for name in report.fresh:
        assert torch.equal(after[name], before[name]), name
    assert any(k.startswith("to_pool3") for k in report.loaded)  # the backbone came along
    summary = report.summary()
    assert summary["loaded"] == len(report.loaded) and summary["fresh_tensors"] == report.fresh
    json.dumps(summary)  # fit for the metrics file


def test_the_same_class_count_loads_every_tensor(nineteen):
    path, source = nineteen
    target = FCN8s("vgg11_bn", 19)
    report = ckpt.initialise_from(target, path, ModelParams())
    assert report.fresh == [] and report.unused == []
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name


def test_a_checkpoint_with_fc67_initialises_a_model_without_and_says_what_it_left(tmp_path):
    source = FCN8s("vgg11_bn", 19, fc67=True, fc_channels=32)
    path = save_checkpoint(tmp_path / "fc.pt", source,
                           ModelParams(fc67=True, fc_channels=32))
    report = ckpt.initialise_from(FCN8s("vgg11_bn", 19), path, ModelParams())
    # fc6/fc7 (head.*) have no place in the model, and score_pool5 reads 32 channels there,
    # 512 here: another shape, left as built; its bias (19 values) fits and is loaded
    assert report.unused == ["head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias",
                             "score_pool5.weight"]
    assert report.fresh == ["score_pool5.weight"] and "score_pool5.bias" in report.loaded


@pytest.mark.parametrize(("source_arch", "target_arch", "fresh"), [
    ("fcn32s", "fcn16s", ["score_pool4.weight", "score_pool4.bias", "up_pool5.weight",
                          "up_final.weight"]),
    ("fcn16s", "fcn8s", ["score_pool3.weight", "score_pool3.bias", "up_pool4.weight",
                         "up_final.weight"]),
])
def test_staged_initialisation_loads_the_coarser_arch_and_leaves_the_new_skip_fresh(
        tmp_path, source_arch, target_arch, fresh):
    """The paper's staged training (32s -> 16s -> 8s): everything of the coarser model loads
    but its last upsampling (another kernel: x32 -> x16 -> x8); the new skip's score layer
    stays zero and its upsampling bilinear, so the new model's first scores are the coarser
    one's own (upsampled by bilinear kernels instead of its learnt one)."""
    torch.manual_seed(3)
    source = FCN8s("vgg11_bn", 19, arch=source_arch)
    with torch.no_grad():
        for name, tensor in source.state_dict().items():
            if tensor.is_floating_point() and not name.endswith("running_var"):
                tensor.normal_()
    path = save_checkpoint(tmp_path / "last.pt", source, ModelParams(arch=source_arch))
    target = FCN8s("vgg11_bn", 19, arch=target_arch)
    built = {k: v.clone() for k, v in target.state_dict().items()}
    report = ckpt.initialise_from(target, path, ModelParams(arch=target_arch))
    assert sorted(report.fresh) == sorted(fresh)
    assert report.unused == ["up_final.weight"]
    assert sorted(report.loaded) == sorted(k for k in source.state_dict() if k != "up_final.weight")
    after, theirs = target.state_dict(), source.state_dict()
    assert all(torch.equal(after[k], theirs[k]) for k in report.loaded)
    assert all(torch.equal(after[k], built[k]) for k in report.fresh)
    new_score = next(k for k in fresh if k.startswith("score") and k.endswith("weight"))
    assert torch.count_nonzero(after[new_score]) == 0


def test_another_backbone_is_refused_in_one_line(tmp_path):
    path = save_checkpoint(tmp_path / "vgg13.pt", FCN8s("vgg13", 19),
                           ModelParams(backbone="vgg13"))
    with pytest.raises(DataError) as error:
        ckpt.initialise_from(FCN8s("vgg11_bn", 19), path, ModelParams())
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path))
    assert "fcn8s/vgg13" in message and "vgg11_bn" in message


def test_a_file_that_is_no_checkpoint_of_ours_is_refused_in_one_line(tmp_path):
    path = tmp_path / "torchvision.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)  # another architecture
    with pytest.raises(DataError) as error:
        ckpt.initialise_from(FCN8s("vgg11_bn", 19), path, ModelParams())
    assert "\n" not in str(error.value) and "not a training checkpoint" in str(error.value)


def test_a_run_starts_from_the_init_weights_reports_them_and_hashes_the_file(
        nineteen, tiny_dataset, masks, tmp_path):
    path, source = nineteen
    raw = tiny_params(tiny_dataset, masks, tmp_path / "models", epochs=1, init=str(path),
                      lr=1e-12, warmup_iters=0)
    params = parse_params(raw, "test")
    record = fit(params.model, params.train, params.data.root, params.data.generated,
                 tmp_path / "live", identity=sections_dict(params, "data", "synthesize"))
    assert record["epoch"] == 0
    trained = ckpt.load(tmp_path / "models" / "last.pt")["model"]
    for name in ("to_pool3.0.weight", "score_pool3.weight"):  # lr ~ 0: still the init's
        assert torch.allclose(trained[name], source.state_dict()[name], atol=1e-6), name
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert metrics["init"]["loaded"] == len(source.state_dict())
    assert metrics["init"]["fresh"] == 0 and metrics["init"]["checkpoint"] == str(path)
    # the training hash covers the init file's content, not only its path
    hashed = ckpt.hashed_params(params.model, params.train, {"init": {"sha256": "a"}})
    other = ckpt.hashed_params(params.model, params.train, {"init": {"sha256": "b"}})
    assert ckpt.training_hash(hashed) != ckpt.training_hash(other)
    no_init = dataclasses.replace(params.train, init=None)
    assert ckpt.training_hash(ckpt.hashed_params(params.model, no_init, {})) != \
        ckpt.training_hash(ckpt.hashed_params(params.model, params.train, {}))


def test_a_missing_init_file_is_refused_before_any_work(tiny_dataset, masks, tmp_path):
    raw = tiny_params(tiny_dataset, masks, tmp_path / "models", init=str(tmp_path / "no.pt"))
    params = parse_params(raw, "test")
    with pytest.raises(DataError, match=r"no\.pt: train\.init: checkpoint not found"):
        fit(params.model, params.train, params.data.root, params.data.generated, None)
    assert not (tmp_path / "models").exists()
    assert TrainParams().init is None  # off by default
