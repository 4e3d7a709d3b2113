"""The named Cityscapes recipe (recipes/fcn8s_vgg11bn_512x1024_80k_cityscapes.args, the
`-S` overrides docs/training.md gives to `dvc exp run`) runs as written: its exact parameters,
validated, for 2 iterations at full 1024×2048 on synthetic data, with a saved state dict in
place of the ImageNet weights (nothing downloads here)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from fcn import checkpoint as ckpt
from fcn.model import vgg_features
from fcn.params import SynthesizeParams, default_params_dict, parse_params, sections_dict
from fcn.synthetic import synthesize
from fcn.decode import decode_stage
from fcn.train.fit import fit

from helpers.trainset import write_masks

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "fcn8s_vgg11bn_512x1024_80k_cityscapes.args"


def recipe(path: Path = RECIPE) -> dict[str, dict]:
    """The overrides of a recipe file as params sections (values read as DVC's -S reads them:
    YAML)."""
    sections: dict[str, dict] = {}
    for dotted, value in re.findall(r"^-S (\S+?)=(\S+)$", path.read_text(), re.MULTILINE):
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = yaml.safe_load(value)
    return sections


def test_the_recipe_is_the_published_fcn_schedule():
    r = recipe()["train"]
    assert (r["optimizer"], r["lr"], r["momentum"], r["weight_decay"], r["poly_power"]) == (
        "sgd", 0.01, 0.9, 0.0005, 0.9)
    assert (r["iterations"], r["epochs"], r["batch_size"] * r["accumulate"]) == (80000, None, 8)
    assert (r["crop"], r["scale"], r["flip"]) == ([512, 1024], [0.5, 2.0], True)
    assert recipe()["model"] == {"backbone": "vgg11_bn", "weights": "imagenet"}
    raw = default_params_dict()
    for section, values in recipe().items():
        raw[section].update(values)
    parse_params(raw)  # every override is a valid parameter


def test_the_rehearsal_runs_every_stage_at_full_resolution_on_a_few_images():
    """recipes/rehearsal_1024x2048.args (docs/performance.md; benchmarks/rehearsal.py applies
    the same file): valid, 1024x2048, a few images per split, the recipe's augmentation."""
    overrides = recipe(ROOT / "recipes" / "rehearsal_1024x2048.args")
    raw = default_params_dict()
    for section, values in overrides.items():
        raw[section].update(values)
    params = parse_params(raw)
    s = params.synthesize
    assert (s.height, s.width) == (1024, 2048)
    assert s.train_per_city * len(s.train_cities) <= 4 and s.test_per_city <= 2
    assert (params.train.crop, params.train.scale) == ([512, 1024], [0.5, 2.0])
    assert params.decode.enabled and params.train.iterations is not None


@pytest.mark.slow
def test_the_recipe_trains_two_iterations_at_full_resolution(tmp_path):
    data = SynthesizeParams(seed=5, height=1024, width=2048, train_cities=["aachen"],
                            val_cities=["frankfurt"], test_cities=["berlin"], train_per_city=2,
                            val_per_city=1, test_per_city=1, train_extra_cities=[])
    root, generated = tmp_path / "cityscapes", tmp_path / "generated"
    synthesize(root, data)
    write_masks(root, generated)
    weights = tmp_path / "vgg11_bn_features.pth"  # torchvision's key layout: features.N.*
    torch.manual_seed(0)
    features = nn.Sequential(*vgg_features("vgg11_bn"))
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, weights)

    raw = default_params_dict()
    for section, values in recipe().items():
        raw[section].update(values)
    raw["data"] = {**raw["data"], "root": str(root), "generated": str(generated)}
    raw["synthesize"] = {**raw["synthesize"], "height": 1024, "width": 2048}
    raw["model"]["weights"] = str(weights)
    raw["decode"]["out"] = str(tmp_path / "decoded")
    # what differs from the recipe: 2 iterations, this machine (workers auto: 0 on a CPU)
    raw["train"].update(iterations=2, device="cpu", out=str(tmp_path / "models"),
                        resume_dir=str(tmp_path / "resume"), monitor_system=False)
    params = parse_params(raw)
    assert params.decode.enabled and params.train.workers == "auto"
    decode_stage(root, generated, params.decode.out, True, 2)  # the recipe reads the cache
    record = fit(params.model, params.train, params.data.root, params.data.generated,
                 tmp_path / "live", identity=sections_dict(params, "data", "synthesize"),
                 decoded=params.decode.out)
    last = ckpt.load(tmp_path / "models" / "last.pt")
    assert last["step"] == 2 and last["hashed_params"]["train"]["optimizer"] == "sgd"
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["val/loss"])
               for r in last["history"])
    assert record["lr"] == 0.0  # poly decay over the (shortened) schedule
    model = ckpt.load_model(tmp_path / "models" / "best.pt", params.model)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 128)).shape == (1, 19, 64, 128)
