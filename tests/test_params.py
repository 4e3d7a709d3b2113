"""params.yaml validation: every kind of problem is reported clearly, all at once."""

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from fcn.errors import ParamsError
from fcn.params import (SCHEMA_FILE, Params, default_params_dict, json_schema, load_params,
                        params_hash, parse_params)

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_yaml_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)


def test_defaults_roundtrip():
    assert parse_params(default_params_dict()) == Params()


def _problems(raw) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(raw, "params.yaml")
    return str(info.value)


def _raw(**sections):
    raw = default_params_dict()
    for name, values in sections.items():
        raw[name].update(values)
    return raw


def test_unknown_key():
    msg = _problems(_raw(train={"learning_rate": 0.1}))
    assert "train.learning_rate: unknown parameter" in msg


def test_unknown_section():
    raw = default_params_dict()
    raw["trian"] = {}
    assert "trian: unknown section" in _problems(raw)


def test_missing_section():
    raw = default_params_dict()
    del raw["model"]
    assert "model: section missing" in _problems(raw)


def test_wrong_type():
    msg = _problems(_raw(train={"batch_size": "ten"}))
    assert "train.batch_size: expected an integer, got 'ten'" in msg


def test_bool_is_not_an_integer():
    assert "train.batch_size: expected an integer, got True" in _problems(_raw(train={"batch_size": True}))


def test_wrong_choice():
    msg = _problems(_raw(model={"backbone": "resnet50"}))
    assert "model.backbone: expected one of 'vgg11'" in msg


def test_out_of_range():
    msg = _problems(_raw(train={"lr": -0.1}))
    assert "train.lr: must be > 0, got -0.1" in msg


def test_wrong_list_item():
    msg = _problems(_raw(masks={"encodings": ["labelIds", "depth"]}))
    assert "masks.encodings: expected a list of one of 'labelIds'" in msg


def test_relation_between_fields():
    msg = _problems(_raw(train={"scale": [2.0, 0.5]}))
    assert "train.scale: expected [min, max] with 0 < min <= max" in msg


def test_city_names_must_fit_file_names():
    msg = _problems(_raw(synthesize={"val_cities": ["Frank_furt"]}))
    assert "synthesize.val_cities" in msg and "'Frank_furt'" in msg


def test_every_problem_is_listed_at_once():
    msg = _problems(_raw(train={"epochs": 0, "optimizer": "rmsprop"}, model={"extra": 1}))
    assert "3 invalid parameter(s)" in msg
    assert "train.epochs: must be >= 1, got 0" in msg
    assert "train.optimizer" in msg and "model.extra" in msg


def test_not_a_mapping():
    assert "expected a mapping" in _problems([1, 2])
    assert "train: expected a mapping of parameters" in _problems(_raw() | {"train": 3})


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "missing.yaml")


def test_scalars_yaml_recognises_but_cannot_build_are_one_line_errors(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  seed: 0x_\n")  # resolves as an int, int('0x_') fails
    with pytest.raises(ParamsError, match=rf"^{bad}: a value YAML cannot read \(") as info:
        load_params(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("weights", [[0.0] * 19, [1.0] * 18 + [2e6], [1.0] * 18 + [-1.0]])
def test_class_weights_the_loss_cannot_use_are_refused(weights):
    raw = _raw()
    raw["train"]["class_weights"] = weights
    assert "train.class_weights: expected 19 numbers from 0 to 1e6, not all 0" in _problems(raw)


def test_the_params_check_prints_a_header_then_one_line_per_problem(tmp_path):
    """pipeline.md: `python -m fcn.params` (make repro's first step): a header, then one line
    per problem, exit 1."""
    raw = _raw(train={"lr": -1, "epochs": 0, "bogus": 3})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "fcn.params", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    header, *lines = done.stderr.splitlines()
    assert header == f"error: {path}: 3 invalid parameter(s):"
    assert [line.split(":")[0] for line in lines] == ["  - train.bogus", "  - train.epochs",
                                                      "  - train.lr"]


@pytest.mark.parametrize("sections, words", [
    ({"decode": {"out": "data/synthetic"}}, "decode.out: 'data/synthetic' would replace"),
    ({"export": {"out": "data/synthetic/leftImg8bit/x"}}, "export.out: 'data/synthetic/leftImg8bit/x' would"),
    ({"train": {"out": "data"}}, "train.out: 'data' would replace"),  # holds the dataset
    ({"decode": {"out": "data/generated"}}, "data.generated, decode.out: 'data/generated' and "
                                           "'data/generated' overlap"),
    ({"export": {"out": "models/export"}}, "train.out, export.out: 'models' and 'models/export' "
                                          "overlap"),
    ({"deploy": {"out": "models/deploy"}}, "train.out, deploy.out: 'models' and 'models/deploy' "
                                          "overlap"),
])
def test_output_folders_that_would_replace_the_dataset_or_each_other_are_refused(sections,
                                                                                 words):
    """A careless path (decode.out set to the dataset) used to have the stage replace the
    dataset whole; now the params check refuses it before any work."""
    assert words in _problems(_raw(**sections))


def test_output_folders_beside_the_shipped_ones_are_fine():
    parse_params(_raw(train={"out": "data/synthetic/models"},
                      data={"generated": "data/synthetic/generated"}), "params.yaml")


def test_yaml_tags_are_never_executed(tmp_path):
    evil = tmp_path / "params.yaml"
    evil.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(evil)


def test_hash_changes_with_params():
    a = Params()
    b = parse_params(_raw(train={"lr": 0.5}))
    assert params_hash(a.train) == params_hash(Params().train)
    assert params_hash(a.train) != params_hash(b.train)


def test_stage_exits_nonzero_with_one_clear_message_before_any_work(tmp_path):
    raw = _raw(synthesize={"height": 10})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages/synthesize.py"), "--params", "params.yaml",
         "--out", str(out)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1
    assert "synthesize.height: must be >= 32, got 10" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


# --- the JSON Schema editors validate params.yaml with ---------------------------------------

def test_committed_schema_is_generated_from_the_params_classes():
    committed = json.loads((ROOT / SCHEMA_FILE).read_text(encoding="utf-8"))
    assert committed == json_schema(), \
        f"{SCHEMA_FILE} is stale: run python docs/generate.py"


def test_schema_accepts_the_committed_params_and_the_defaults():
    validator = jsonschema.Draft202012Validator(json_schema())
    validator.validate(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))
    validator.validate(default_params_dict())


@pytest.mark.parametrize("section, key, value", [
    ("train", "epochs", 0),                 # below its minimum
    ("train", "epochs", True),              # a boolean is no integer
    ("train", "lr", 0),                     # exclusive minimum
    ("train", "optimizer", "adam"),         # not one of the choices
    ("train", "nosuchkey", 1),              # unknown key
    ("masks", "encodings", ["depth"]),      # list items checked
    ("train", "class_weights", "heavy"),    # neither a list nor null
    ("model", "backbone", "resnet50"),      # derived from fcn.params.BACKBONES
    ("deploy", "int8_calibration", "val"),  # the split the int8 check scores
    ("deploy", "int8_method", "kl"),        # derived from fcn.params.INT8_METHODS
])
def test_schema_refuses_what_the_loader_refuses(section, key, value):
    raw = default_params_dict()
    raw[section][key] = value
    with pytest.raises(ParamsError, match=f"{section}.{key}"):
        parse_params(raw)
    assert list(jsonschema.Draft202012Validator(json_schema()).iter_errors(raw))


def test_choices_are_declared_once():
    """The Literals params validate against are the tuples the code acts on."""
    from fcn.cityscapes.layout import ENCODINGS, SPLITS
    from fcn.device import DTYPES
    from fcn.model import VGG_CONFIGS

    schema = json_schema()["properties"]
    assert schema["masks"]["properties"]["encodings"]["items"]["enum"] == list(ENCODINGS)
    assert schema["masks"]["properties"]["splits"]["items"]["enum"] == list(SPLITS)
    assert schema["benchmark"]["properties"]["precisions"]["items"]["enum"] == list(DTYPES)
    backbones = schema["model"]["properties"]["backbone"]["enum"]
    assert {b.removesuffix("_bn") for b in backbones} == set(VGG_CONFIGS)
