"""The train stage: resume bit for bit after SIGKILL, refusal of foreign checkpoints, 2-process
DDP, NaN guard, an overfit run, and the checkpoint format other stages rely on."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from fcn import checkpoint as ckpt
from fcn.train.augment import Recipe
from fcn.train.data import SeededSampler, SegmentationDataset, ShardSampler
from fcn.train.distributed import Context
from fcn.train.loop import (NonFiniteLossError, _progress, build_criterion, build_optimizer,
                             build_scheduler, train_one_epoch, validate)
from fcn.metrics import summary
from fcn.model import FCN8s
from fcn.device import grad_scaler
from fcn.params import Params, TrainParams, parse_params, sections_dict
from fcn.train.fit import fit

from helpers.trainset import state_folder, tiny_params, train_command, write_params

CPU = Context(0, 1, torch.device("cpu"))


def fit_stage(params: Params, live_dir: Path) -> dict:
    """What stages/train.py calls, for one process."""
    return fit(params.model, params.train, params.data.root, params.data.generated, live_dir,
               identity=sections_dict(params, "data", "synthesize"))


def _run(params: dict, cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    write_params(cwd / "params.yaml", params)
    done = subprocess.run(train_command(cwd), cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _live_files(live: Path) -> dict[str, bytes]:
    """Every file of a DVCLive folder, as bytes."""
    return {str(p.relative_to(live)): p.read_bytes() for p in sorted(live.rglob("*"))
            if p.is_file()}


def _assert_same_state(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{where}: {key} differs"
        elif isinstance(a[key], dict):
            _assert_same_state(a[key], b[key], f"{where}.{key}")
        else:  # via JSON, where NaN (a class absent from val) equals NaN
            assert json.dumps(a[key], sort_keys=True, default=repr) == json.dumps(
                b[key], sort_keys=True, default=repr), f"{where}: {key} differs"


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(tiny_dataset, masks,
                                                                      tmp_path):
    def params(run: str) -> dict:
        # no system monitor: its samples (times, loads) differ between any two runs
        # accumulate 2 over 3 batches per epoch: groups of 2 and 1, so the epoch (and the
        # checkpoint a kill resumes from) ends at an optimizer step (training.md)
        return tiny_params(tiny_dataset, masks, tmp_path / run / "models", epochs=3,
                           accumulate=2, monitor_system=False)

    _run(params("whole"), tmp_path / "whole")

    cut = tmp_path / "cut"
    cut.mkdir()
    write_params(cut / "params.yaml", params("cut"))
    process = subprocess.Popen(train_command(cut), cwd=cut, stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True)
    lines = []
    for line in process.stderr:  # the log line comes after epoch 1's checkpoint is written
        lines.append(line)
        if "epoch 1/3" in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(lines)[-2000:]
    state = state_folder(cut / "resume")  # the run's state folder, outside train.out
    assert ckpt.load(state / "last.pt")["epoch"] == 1
    assert not (cut / "models").exists()  # train.out is written only when the run ends

    resumed = _run(params("cut"), cut)
    assert "resuming from" in resumed.stderr and "after epoch 1 of 3" in resumed.stderr
    assert not state.exists()  # published to train.out and removed

    for name in ("last.pt", "best.pt"):
        a = ckpt.load(tmp_path / "whole" / "models" / name)
        b = ckpt.load(cut / "models" / name)
        assert a["epoch"] == b["epoch"]
        _assert_same_state(a["model"], b["model"], f"{name} model")
        if name == "last.pt":
            assert a["epoch"] == 3 and a["step"] == b["step"] == 6  # 2 steps per epoch
            _assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
            assert a["scheduler"] == b["scheduler"]
            assert json.dumps(a["history"]) == json.dumps(b["history"])  # NaN == NaN here
            assert not any(k.startswith("time/") for r in a["history"] for k in r)
        assert (tmp_path / "whole" / "models" / name).read_bytes() == \
            (cut / "models" / name).read_bytes()  # the same file, resumed or not
    # the scores' log: byte for byte the same files (wall-clock figures live apart)
    whole, again = _live_files(tmp_path / "whole" / "live"), _live_files(cut / "live")
    assert "metrics.json" in whole and "plots/metrics/val/miou.tsv" in whole
    assert whole == again  # the logged history continues exactly where it stopped
    assert "time" not in json.loads(whole["metrics.json"])
    assert whole["plots/metrics/val/miou.tsv"].decode().count("\n") == 4  # header + 3 epochs
    timing = _live_files(tmp_path / "whole" / "live_timing")  # the resumed run's: all epochs
    for run in (tmp_path / "whole", cut):
        steps = (run / "live_timing" / "plots" / "metrics" / "time" / "data_s.tsv").read_text()
        assert [line.split("\t")[0] for line in steps.splitlines()[1:]] == ["0", "1", "2"]
    assert "time" in json.loads(timing["metrics.json"])


@pytest.mark.slow
def test_changed_params_refuse_the_old_checkpoint(tiny_dataset, masks, tmp_path):
    base = tiny_params(tiny_dataset, masks, tmp_path / "models", epochs=1)
    _run(base, tmp_path)
    first = ckpt.load(tmp_path / "models" / "last.pt")

    base["train"]["workers"] = 1  # where/how fast, not what: still resumable
    again = _run(base, tmp_path)
    assert "resuming from" in again.stderr and "nothing to do" in again.stderr
    assert not list((tmp_path / "resume").iterdir())  # no state folder left behind

    base["train"]["lr"] = 0.004
    changed = _run(base, tmp_path)
    assert "trained with other parameters" in changed.stderr
    assert "starting fresh" in changed.stderr and "train.lr: 0.002 -> 0.004" in changed.stderr
    second = ckpt.load(tmp_path / "models" / "last.pt")
    assert second["epoch"] == 1 and second["params_hash"] != first["params_hash"]
    assert second["hashed_params"]["train"]["lr"] == 0.004


@pytest.mark.slow
def test_two_process_ddp_logs_the_val_miou_of_the_saved_model(tiny_dataset, masks,
                                                              two_process_run):
    """conftest's two-process run: with accumulation (DDP's no_sync on the first of each pair)
    and sync_bn asked for on a CPU."""
    run = two_process_run
    stderr = (run / "stderr.txt").read_text(encoding="utf-8")
    assert "x2" in stderr  # trained by 2 ranks
    assert "SyncBatchNorm runs on CUDA only: plain BatchNorm per process" in stderr
    logged = ckpt.load(run / "models" / "last.pt")["metrics"]

    model = ckpt.load_model(run / "models" / "last.pt")
    val = SegmentationDataset(tiny_dataset, masks, "val")
    loader = DataLoader(val, batch_size=1, sampler=ShardSampler(len(val)))
    result = validate(model, loader, build_criterion(None, CPU.device), CPU, "fp32")
    scores = summary(result.confusion)
    assert scores["miou"] == logged["val/miou"]
    assert scores["mean_dice"] == logged["val/mean_dice"]
    assert math.isclose(result.loss, logged["val/loss"], rel_tol=1e-6)
    live = json.loads((run / "live" / "metrics.json").read_text())
    assert live["val"]["miou"] == logged["val/miou"]


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dataset, masks, tmp_path,
                                                           monkeypatch):
    raw = tiny_params(tiny_dataset, masks, tmp_path / "models", epochs=3)
    params = parse_params(raw)
    forward = FCN8s.forward
    calls = {"train": 0}

    def poisoned(self, x):
        out = forward(self, x)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 5:  # epoch 2 (3 iterations per epoch), iteration 2
                return out * math.nan
        return out

    monkeypatch.setattr(FCN8s, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="epoch 2, iteration 2"):
        fit_stage(params, tmp_path / "live")
    state = state_folder(tmp_path / "resume")  # kept for a resume; train.out never written
    last = ckpt.load(state / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert (state / "best.pt").exists() and not (tmp_path / "models").exists()
    assert (tmp_path / "live" / "plots" / "metrics" / "val" / "miou.tsv").read_text().count(
        "\n") == 2  # header + the one completed epoch


def test_best_checkpoint_loads_weights_only_and_rebuilds_the_model(tiny_dataset, masks,
                                                                   tmp_path):
    params = parse_params(tiny_params(tiny_dataset, masks, tmp_path / "models", epochs=1,
                                      batch_size=6))
    record = fit_stage(params, tmp_path / "live")
    best = torch.load(tmp_path / "models" / "best.pt", weights_only=True)
    assert {"model", "model_params", "num_classes", "epoch"} <= best.keys()
    assert best["model_params"] == {"arch": "fcn8s", "backbone": "vgg11_bn", "weights": "none",
                                    "fc67": False, "fc_channels": 4096}
    assert best["num_classes"] == 19 and best["epoch"] == 1
    assert best["metrics"]["val/miou"] == record["val/miou"]
    last = torch.load(tmp_path / "models" / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "rng", "params_hash", "history"} <= last.keys()
    model = ckpt.load_model(tmp_path / "models" / "best.pt")
    assert isinstance(model, FCN8s) and not model.training


@pytest.mark.slow
def test_a_few_images_overfit_to_miou_above_0_9(tiny_dataset, masks):
    torch.manual_seed(0)
    train = SegmentationDataset(tiny_dataset, masks, "train",
                                Recipe.of([64, 128], [1.0, 1.0], False, 0.0))
    train.pairs = train.pairs[:2]
    loader = DataLoader(train, batch_size=2, sampler=SeededSampler(train, seed=0))
    params = TrainParams(lr=2e-3, epochs=80, weight_decay=0.0)  # 1 step per epoch
    model = FCN8s("vgg11_bn")
    optimizer = build_optimizer(model, params)
    scheduler = build_scheduler(optimizer, params, params.epochs * len(loader))
    criterion = build_criterion(params.class_weights, CPU.device)
    scaler = grad_scaler(CPU.device, "fp32")
    for epoch in range(params.epochs):
        train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, CPU, "fp32",
                        epoch)
    plain = Subset(SegmentationDataset(tiny_dataset, masks, "train"), [0, 1])
    result = validate(model, DataLoader(plain, batch_size=1), criterion, CPU, "fp32")
    assert summary(result.confusion)["miou"] > 0.9


def _bars_hidden() -> list[bool]:
    """Whether rank 0's and rank 1's batch bars are hidden; each bar still yields every batch."""
    bars = [_progress(range(3), Context(rank, 2, torch.device("cpu")), "train", 3)
            for rank in (0, 1)]
    hidden = [bar.disable for bar in bars]  # before iterating: a finished bar is closed
    assert all(list(bar) == [0, 1, 2] for bar in bars)
    return hidden


@pytest.mark.skipif("TQDM_DISABLE" in os.environ, reason="TQDM_DISABLE is set for this run")
def test_batch_bars_show_on_rank_0_only():
    assert _bars_hidden() == [False, True]


def test_batch_bars_obey_tqdm_disable():
    """tqdm reads TQDM_* when it is imported, into defaults that an explicit argument would
    override: hence a fresh process with the variable set."""
    code = "from test_train import _bars_hidden; print(_bars_hidden())"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TQDM_DISABLE": "1"},
                          cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[True, True]"


@pytest.mark.slow
def test_compiled_training_trains_like_eager(tiny_dataset, masks, tmp_path, caplog):
    """train.compile: the training model compiled (validation eager); the same run's losses
    within float rounding of eager's, and a log line saying so."""
    records = {}
    for compiled in (False, True):
        params = parse_params(tiny_params(tiny_dataset, masks, tmp_path / str(compiled),
                                          epochs=1, compile=compiled))
        with caplog.at_level("INFO", "fcn"):
            records[compiled] = fit(params.model, params.train, params.data.root,
                                    params.data.generated, None,
                                    identity=sections_dict(params, "data", "synthesize"))
    assert "train.compile: compiling the training model" in caplog.text
    assert records[True]["train/loss"] == pytest.approx(records[False]["train/loss"], rel=1e-3)
    assert records[True]["val/miou"] == pytest.approx(records[False]["val/miou"], abs=0.02)


def test_a_nan_is_caught_at_the_next_interval_naming_its_iteration(tiny_dataset, masks,
                                                                   monkeypatch):
    """The host reads the finiteness flag every `check_every` passes: a NaN at pass 2 stops
    the epoch at pass 3 (check_every 3) with pass 2 named, before the epoch's end."""
    from fcn.train import loop

    train = SegmentationDataset(tiny_dataset, masks, "train",
                                Recipe.of([64, 64], [1.0, 1.0], False, 0.0))
    loader = DataLoader(train, batch_size=1, sampler=SeededSampler(train, seed=0))
    model = FCN8s("vgg11_bn")
    params = TrainParams()
    optimizer = build_optimizer(model, params)
    scheduler = build_scheduler(optimizer, params, 100)
    forward, seen = FCN8s.forward, []

    def poisoned(self, x):
        seen.append(1)
        out = forward(self, x)
        return out * math.nan if len(seen) == 2 else out

    monkeypatch.setattr(FCN8s, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="epoch 1, iteration 2 "):
        loop.train_one_epoch(model, loader, build_criterion(None, CPU.device), optimizer,
                             scheduler, grad_scaler(CPU.device, "fp32"), CPU, "fp32", 0,
                             check_every=3)
    assert len(seen) == 3 and len(loader) == 6  # stopped at the check, not the epoch's end


def test_a_batch_with_no_labelled_pixel_is_not_a_divergence():
    """A crop of ego vehicle and out-of-ROI is all 255: its loss used to be NaN, which stopped
    training as "diverged: lower train.lr". Now it counts 0 and gives no gradient; and the
    loss of an ordinary batch is nn.CrossEntropyLoss's, bit for bit."""
    torch.manual_seed(0)
    model = FCN8s("vgg11_bn")
    params = TrainParams()
    optimizer = build_optimizer(model, params)
    criterion = build_criterion(None, CPU.device)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    labelled = torch.randint(0, 19, (2, 32, 32), dtype=torch.uint8)
    ignored = torch.full((2, 32, 32), 255, dtype=torch.uint8)
    batches = [[images, labelled], [images, ignored], [images, labelled]]
    result = train_one_epoch(model, batches, criterion, optimizer,
                             build_scheduler(optimizer, params, 3), grad_scaler(CPU.device, "fp32"),
                             CPU, "fp32", 0)
    assert math.isfinite(result.loss)
    logits = torch.randn(2, 19, 8, 8)
    target = torch.randint(0, 19, (2, 8, 8))
    target[0, :4] = 255
    assert torch.equal(criterion(logits, target),
                       torch.nn.CrossEntropyLoss(ignore_index=255)(logits, target))
    assert criterion(logits, torch.full_like(target, 255)) == 0
