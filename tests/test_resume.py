"""The state folder of a training run (fcn.train.resume): where it lives, its lock, publishing
the final checkpoints, and what it leaves behind."""

from __future__ import annotations

import json

import pytest
import torch

from fcn import checkpoint as ckpt
from fcn.errors import FcnError
from fcn.train import resume

HASHED = {"train": {"lr": 0.002}, "model": {"backbone": "vgg11_bn"}}


def test_the_state_folder_is_keyed_by_the_hash_under_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = resume.state_dir(None, HASHED)
    assert folder.parent == tmp_path / "xdg" / "fcn-cityscapes" / "resume"
    assert resume.state_dir(tmp_path / "mine", HASHED).parent == tmp_path / "mine"
    other = resume.state_dir(None, {**HASHED, "train": {"lr": 0.004}})
    assert other.parent == folder.parent and other.name != folder.name


def test_a_second_run_of_the_same_parameters_is_refused_and_harms_nothing(tmp_path):
    folder = resume.state_dir(tmp_path, HASHED)
    with resume.locked(folder, HASHED):
        (folder / "last.pt").write_bytes(b"checkpoint")
        with pytest.raises(FcnError, match="another training run with the same parameters"):
            with resume.locked(folder, HASHED):
                pass  # never reached
        assert (folder / "last.pt").read_bytes() == b"checkpoint"  # the holder's files stay
        assert json.loads((folder / resume.PARAMS).read_text()) == HASHED
    assert (folder / "last.pt").exists()  # a checkpoint to resume from: kept


def test_a_checkpoint_holding_equal_but_distinct_strings_is_the_same_file(tmp_path):
    """A resumed run's optimizer state holds the key 'step' unpickled from last.pt (a string
    object of its own), an uninterrupted run's the interned literal it shares with the
    checkpoint's own 'step': pickle wrote them differently, so last.pt differed by resuming."""
    fresh = {"step": 3, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}}}
    unpickled = "".join(["st", "ep"])  # equal to 'step', another object
    literal = "step"
    assert unpickled == literal and unpickled is not literal  # the point of the test
    resumed = {"step": 3, "optimizer": {"state": {0: {unpickled: torch.tensor(3.0)}}}}
    ckpt.save(tmp_path / "a.pt", fresh)
    ckpt.save(tmp_path / "b.pt", resumed)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_a_folder_left_without_a_checkpoint_is_removed(tmp_path):
    folder = resume.state_dir(tmp_path, HASHED)
    with resume.locked(folder, HASHED):
        assert folder.is_dir()
    assert not folder.exists()


def test_equal_checkpoints_are_equal_files(tmp_path):
    state = {"model": {"w": torch.arange(6.0)}, "epoch": 3}
    ckpt.save(tmp_path / "a" / "best.pt", state)
    ckpt.save(tmp_path / "b" / "best.pt", state)  # other temporary names, same bytes
    assert (tmp_path / "a" / "best.pt").read_bytes() == (tmp_path / "b" / "best.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a" / "best.pt", weights_only=True)["model"]["w"],
                       torch.arange(6.0))


def test_publish_replaces_the_output_folder_and_removes_the_state(tmp_path):
    folder = resume.state_dir(tmp_path / "state", HASHED)
    out = tmp_path / "models"
    out.mkdir()
    (out / "stale.pt").write_bytes(b"old")
    with resume.locked(folder, HASHED):
        (folder / "best.pt").write_bytes(b"best")
        (folder / "last.pt").write_bytes(b"last")
        resume.publish(folder, out)
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt"]
    assert (out / "last.pt").read_bytes() == b"last" and not folder.exists()


# --- the training code is part of what a resumed run must share (issue 20) --------------------

def test_the_code_fingerprint_changes_with_any_edit_of_a_training_file(tmp_path):
    import shutil

    from fcn import sources

    copy = tmp_path / "copy"
    shutil.copytree(sources.PACKAGE_ROOT / "fcn", copy / "fcn")
    before = sources.fingerprint(ckpt.TRAINING_CODE, copy)
    assert "fcn/train/loop.py" in before and "fcn/benchmark/run.py" not in before
    loop = copy / "fcn" / "train" / "loop.py"
    loop.write_text(loop.read_text() + "# a comment is enough\n")
    sources.fingerprint.cache_clear()
    after = sources.fingerprint(ckpt.TRAINING_CODE, copy)
    assert {k for k in before if before[k] != after[k]} == {"fcn/train/loop.py"}
    (copy / "fcn" / "benchmark" / "run.py").write_text("# not training code\n")
    sources.fingerprint.cache_clear()
    assert sources.fingerprint(ckpt.TRAINING_CODE, copy) == after


class _Killed(BaseException):
    """Stands in for a SIGKILL right after an epoch's checkpoint."""


def test_a_run_killed_before_a_code_edit_starts_afresh_after_it(tiny_dataset, masks, tmp_path,
                                                                monkeypatch, caplog):
    from fcn.params import parse_params, sections_dict
    from fcn.train import fit as fit_module
    from fcn import sources

    from helpers.trainset import state_folder, tiny_params

    params = parse_params(tiny_params(tiny_dataset, masks, tmp_path / "models", epochs=2))
    log_epoch = fit_module._log_epoch

    def killed(record, *args):
        log_epoch(record, *args)
        raise _Killed

    monkeypatch.setattr(fit_module, "_log_epoch", killed)
    with pytest.raises(_Killed):
        fit_module.fit(params.model, params.train, params.data.root, params.data.generated,
                       None, identity=sections_dict(params, "data", "synthesize"))
    old = state_folder(tmp_path / "resume")
    monkeypatch.setattr(fit_module, "_log_epoch", log_epoch)
    edited = {**sources.fingerprint(ckpt.TRAINING_CODE), "fcn/train/loop.py": "0" * 16}
    monkeypatch.setattr(sources, "fingerprint", lambda module, root=None: edited)
    with caplog.at_level("INFO", "fcn"):
        record = fit_module.fit(params.model, params.train, params.data.root,
                                params.data.generated, None,
                                identity=sections_dict(params, "data", "synthesize"))
    assert "resuming" not in caplog.text and record["epoch"] == 1
    assert (f"{old} holds a run of these parameters under other training code (changed: "
            "fcn/train/loop.py): not resumed, training starts afresh") in caplog.text
    assert old.exists()  # the old run's state stays where it was, for the old code
    last = ckpt.load(tmp_path / "models" / "last.pt")
    assert last["hashed_params"]["code"]["fcn/train/loop.py"] == "0" * 16
    assert len(last["history"]) == 2  # both epochs trained under the new code


def _another(value):
    """A different value of the same kind (hashing does not validate)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, (list, tuple)):
        return [*value, 1]
    return "x"  # None


def test_exactly_the_documented_train_keys_are_left_out_of_the_hash():
    """multi-gpu.md and training.md promise that changing these keys (max_restarts, workers,
    ...) resumes a run instead of starting it afresh; every other key starts afresh."""
    import dataclasses
    import re
    from pathlib import Path

    from fcn.params import ModelParams, TrainParams

    identity = {"data": {"root": "r"}}

    def digest(train: TrainParams) -> str:
        return ckpt.training_hash(ckpt.hashed_params(ModelParams(), train, identity))

    base = TrainParams()
    reference = digest(base)
    for field in dataclasses.fields(TrainParams):
        changed = dataclasses.replace(base, **{field.name: _another(getattr(base, field.name))})
        same = digest(changed) == reference
        assert same == (field.name in ckpt.UNHASHED_TRAIN), field.name
    doc = (Path(__file__).resolve().parents[1] / "docs" / "multi-gpu.md").read_text()
    listed = re.search(r"<!-- unhashed -->(.*?)<!-- /unhashed -->", doc).group(1)
    assert re.findall(r"`(\w+)`", listed) == list(ckpt.UNHASHED_TRAIN)
