"""What a research recipe needs from training: gradient accumulation, per-group learning rates,
iterations instead of epochs, early stopping, per-class curves, system metrics, train+val,
class weights from the data, and SyncBN that never crashes a single process."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fcn import checkpoint as ckpt
from fcn.cityscapes.labels import CLASS_NAMES
from fcn.device import grad_scaler
from fcn.errors import FcnError, ParamsError
from fcn.model import FCN8s
from fcn.params import Params, TrainParams, parse_params, sections_dict
from fcn.train import fit as fit_module
from fcn.train.distributed import Context
from fcn.train.fit import fit, schedule
from fcn.train.loop import PassResult, build_optimizer, build_scheduler, train_one_epoch

from helpers.trainset import tiny_params

CPU = Context(0, 1, torch.device("cpu"))


def run_fit(params: Params, live: Path, **kwargs) -> dict:
    return fit(params.model, params.train, params.data.root, params.data.generated, live,
               identity=sections_dict(params, "data", "synthesize"), **kwargs)


# --- gradient accumulation ----------------------------------------------------------------

class NoBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 19, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _train(batch_size: int, accumulate: int) -> tuple[nn.Module, list[float]]:
    torch.manual_seed(1)
    images = torch.rand(16, 3, 8, 8)
    targets = torch.randint(0, 19, (16, 8, 8))  # no ignored pixels: every batch weighs alike
    loader = DataLoader(TensorDataset(images, targets), batch_size=batch_size)
    model = NoBatchNorm()
    params = TrainParams(optimizer="sgd", lr=0.1, weight_decay=0.0, accumulate=accumulate)
    optimizer = build_optimizer(model, params)
    steps_per_epoch, total, epochs = schedule(params, len(loader))
    scheduler = build_scheduler(optimizer, params, total)
    lrs = []
    for epoch in range(2):
        train_one_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, scheduler,
                        grad_scaler(CPU.device, "fp32"), CPU, "fp32", epoch,
                        accumulate=accumulate)
        lrs.append(scheduler.get_last_lr()[0])
    return model, lrs


def test_accumulating_two_batches_of_4_equals_one_batch_of_8():
    big, big_lrs = _train(8, 1)
    small, small_lrs = _train(4, 2)
    assert torch.allclose(big.conv.weight, small.conv.weight, atol=1e-6)
    assert torch.allclose(big.conv.bias, small.conv.bias, atol=1e-6)
    assert big_lrs == small_lrs  # the poly schedule counts optimizer steps, not batches
    unaccumulated, _ = _train(4, 1)
    assert not torch.allclose(unaccumulated.conv.weight, small.conv.weight, atol=1e-4)


def test_an_epoch_of_5_batches_accumulating_2_ends_at_an_optimizer_step():
    """training.md: an epoch ends at an optimizer step (its last group is smaller), so no
    gradient is carried into the next epoch and a resumed run never lands mid-group."""
    torch.manual_seed(1)
    loader = DataLoader(TensorDataset(torch.rand(5, 3, 8, 8), torch.randint(0, 19, (5, 8, 8))),
                        batch_size=1)
    model = NoBatchNorm()
    params = TrainParams(optimizer="sgd", lr=0.1, weight_decay=0.0, accumulate=2)
    optimizer = build_optimizer(model, params)
    scheduler = build_scheduler(optimizer, params, schedule(params, len(loader))[1])
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    train_one_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, scheduler,
                    grad_scaler(CPU.device, "fp32"), CPU, "fp32", 0, accumulate=2)
    assert len(steps) == 3 == scheduler.last_epoch  # groups of 2, 2 and 1
    assert all(p.grad is None for p in model.parameters())  # nothing left half-accumulated


def test_schedule_counts_optimizer_steps_and_iterations():
    assert schedule(TrainParams(epochs=3, accumulate=2), 5) == (3, 9, 3)  # 5 batches: 3 steps
    assert schedule(TrainParams(epochs=None, iterations=10), 4) == (4, 10, 3)


# --- per-group learning rates ---------------------------------------------------------------

def test_head_lr_mult_gives_the_new_layers_a_multiple_of_the_backbone_lr():
    model = FCN8s("vgg11_bn", fc67=True, fc_channels=16)
    params = TrainParams(lr=0.01, head_lr_mult=10.0)
    optimizer = build_optimizer(model, params)
    scheduler = build_scheduler(optimizer, params, 100)
    backbone = {id(p) for m in model.backbone_modules() for p in m.parameters()}
    seen = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    for group in optimizer.param_groups:
        in_backbone = {id(p) in backbone for p in group["params"]}
        assert len(in_backbone) == 1
        assert group["initial_lr"] == (0.01 if in_backbone == {True} else 0.1)
    head_ids = {id(p) for name, p in model.named_parameters()
                if name.startswith(("score", "up_", "head"))}
    assert head_ids == {id(p) for p in model.parameters()} - backbone
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    assert len(lrs) == 2 and math.isclose(lrs[1] / lrs[0], 10.0)


# --- validation of the new parameters -------------------------------------------------------

def test_epochs_and_iterations_are_exclusive(tiny_dataset, masks, tmp_path):
    raw = tiny_params(tiny_dataset, masks, tmp_path / "m", iterations=10)  # epochs still 2
    with pytest.raises(ParamsError, match="set exactly one of them"):
        parse_params(raw)
    raw["train"].update(epochs=None, iterations=None)
    with pytest.raises(ParamsError, match="set exactly one of them"):
        parse_params(raw)
    raw["train"].update(iterations=10, splits=["test"])
    with pytest.raises(ParamsError, match="train.splits"):
        parse_params(raw)


# --- whole runs on the tiny dataset (3 batches of 2 per epoch) -----------------------------

def test_iterations_stop_at_that_optimizer_step(tiny_dataset, masks, tmp_path):
    params = parse_params(tiny_params(tiny_dataset, masks, tmp_path / "models", epochs=None,
                                      iterations=4, monitor_system=False))
    run_fit(params, tmp_path / "live")
    last = ckpt.load(tmp_path / "models" / "last.pt")
    assert last["step"] == 4 and last["epoch"] == 2  # 3 steps, then 1 of the second epoch
    assert last["history"][-1]["lr"] == 0.0  # poly decay reaches 0 at the last iteration


def _scripted_validation(monkeypatch, mious: list[float]) -> None:
    """validate() returns confusion matrices whose mIoU (half of each value: class 0's IoU is
    the value, class 1's 0) rises and falls as `mious` does, epoch by epoch."""
    calls = iter(mious)

    def fake(model, loader, criterion, context, precision):
        miou = next(calls)
        hits = round(1000 * miou)
        confusion = torch.zeros(19, 19, dtype=torch.int64)
        confusion[0, 0], confusion[0, 1] = hits, 1000 - hits
        return PassResult(1.0, confusion)

    monkeypatch.setattr(fit_module, "validate", fake)


def test_early_stopping_stops_at_the_right_epoch_and_keeps_the_best(tiny_dataset, masks,
                                                                    tmp_path, monkeypatch,
                                                                    caplog):
    _scripted_validation(monkeypatch, [0.2, 0.5, 0.4, 0.45, 0.3, 0.9, 0.9, 0.9])
    params = parse_params(tiny_params(tiny_dataset, masks, tmp_path / "models", epochs=8,
                                      patience=3, monitor_system=False))
    with caplog.at_level(logging.INFO, "fcn"):
        record = run_fit(params, tmp_path / "live")
    last = ckpt.load(tmp_path / "models" / "last.pt")
    best = ckpt.load(tmp_path / "models" / "best.pt")
    # best after epoch 2; epochs 3, 4, 5 bring no gain: stop after epoch 5 of 8
    assert last["epoch"] == 5 and best["epoch"] == 2 and record["epoch"] == 4
    assert last["stop_reason"].startswith("stopped early after epoch 5: no val mIoU gain for 3")
    assert record["stopped_early"] == 1 and record["best/epoch"] == 2  # = best.pt's epoch
    assert "stopped early after epoch 5" in caplog.text
    live = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert live["stopped_early"] == 1
    # resuming a stopped run trains nothing more
    _scripted_validation(monkeypatch, [])
    run_fit(params, tmp_path / "live")
    assert ckpt.load(tmp_path / "models" / "last.pt")["epoch"] == 5


def test_val_every_validates_every_nth_and_the_last_epoch(tiny_dataset, masks, tmp_path,
                                                         monkeypatch):
    _scripted_validation(monkeypatch, [0.5, 0.3, 0.4])  # after epochs 2, 4 and 5 (the last)
    params = parse_params(tiny_params(tiny_dataset, masks, tmp_path / "models", epochs=5,
                                      val_every=2, monitor_system=False))
    record = run_fit(params, tmp_path / "live")
    history = ckpt.load(tmp_path / "models" / "last.pt")["history"]
    assert ["val/miou" in r for r in history] == [False, True, False, True, True]
    assert ckpt.load(tmp_path / "models" / "best.pt")["epoch"] == 2  # the best validated one
    assert record["best/epoch"] == 2 and math.isclose(record["best/val_miou"], 0.25)
    val = (tmp_path / "live" / "plots" / "metrics" / "val" / "miou.tsv").read_text()
    assert [line.split("\t")[0] for line in val.splitlines()[1:]] == ["1", "3", "4"]  # step
    train = (tmp_path / "live" / "plots" / "metrics" / "train" / "miou.tsv").read_text()
    assert train.count("\n") == 6  # header + every epoch


def test_training_on_train_and_val_selects_the_last_epoch(tiny_dataset, masks, tmp_path,
                                                          monkeypatch, caplog):
    _scripted_validation(monkeypatch, [0.6, 0.2, 0.1])
    params = parse_params(tiny_params(tiny_dataset, masks, tmp_path / "models", epochs=3,
                                      splits=["train", "val"], monitor_system=False))
    with caplog.at_level(logging.INFO, "fcn"):
        run_fit(params, tmp_path / "live")
    assert ckpt.load(tmp_path / "models" / "best.pt")["epoch"] == 3  # not the best-scoring 1
    assert "best.pt is simply the last epoch" in caplog.text
    assert "6 train images" not in caplog.text and "8 images (train+val)" in caplog.text


def test_per_class_curves_and_system_metrics_are_logged(tiny_dataset, masks, tmp_path):
    params = parse_params(tiny_params(tiny_dataset, masks, tmp_path / "models", epochs=2))
    record = run_fit(params, tmp_path / "live")
    plots = tmp_path / "live" / "plots" / "metrics"
    per_class = []
    for name in CLASS_NAMES:
        rows = (plots / "val" / "iou" / f"{name}.tsv").read_text().splitlines()
        assert len(rows) == 3 and rows[0].split("\t") == ["step", name]  # header + 2 epochs
        per_class.append(float(rows[-1].split("\t")[1]))
    assert math.isclose(float(np.nanmean(per_class)), record["val/miou"], rel_tol=1e-12)
    assert [record[f"val/iou/{n}"] for n in CLASS_NAMES] == pytest.approx(per_class,
                                                                         nan_ok=True)
    timing = tmp_path / "live_timing" / "plots" / "metrics"  # machine figures, apart
    for metric in ("cpu/usage (%).tsv", "ram/usage (%).tsv"):
        assert (timing / "system" / metric).stat().st_size > 0, metric
    assert not (plots / "system").exists() and not (plots / "time").exists()
    _assert_time_figures_per_epoch(timing, 2)


def _assert_time_figures_per_epoch(timing: Path, epochs: int) -> None:
    """training.md: every epoch logs these five figures (always on), finite, and the data
    fraction is data_s / (data_s + compute_s)."""
    figures = {}
    for name in ("data_s", "compute_s", "data_fraction", "samples_per_s", "val_s"):
        rows = (timing / "time" / f"{name}.tsv").read_text().splitlines()
        assert rows[0].split("\t") == ["step", name] and len(rows) == 1 + epochs, name
        figures[name] = [float(r.split("\t")[1]) for r in rows[1:]]
        assert all(math.isfinite(v) and v >= 0 for v in figures[name]), (name, figures[name])
    for data, compute, fraction in zip(figures["data_s"], figures["compute_s"],
                                       figures["data_fraction"]):
        assert fraction == pytest.approx(data / (data + compute))


def test_time_figures_are_logged_without_the_system_monitor(tiny_dataset, masks, tmp_path):
    params = parse_params(tiny_params(tiny_dataset, masks, tmp_path / "models", epochs=1,
                                      monitor_system=False))
    run_fit(params, tmp_path / "live")
    timing = tmp_path / "live_timing" / "plots" / "metrics"
    assert not (timing / "system").exists()
    _assert_time_figures_per_epoch(timing, 1)


def test_named_class_weights_come_from_the_stage_file(tiny_dataset, masks, tmp_path,
                                                      monkeypatch):
    params = parse_params(tiny_params(tiny_dataset, masks, tmp_path / "models", epochs=1,
                                      class_weights="median_frequency", monitor_system=False))
    with pytest.raises(FcnError, match="class_weights stage"):
        run_fit(params, tmp_path / "live")
    weights_file = tmp_path / "w.json"
    weights_file.write_text(json.dumps({"median_frequency": [float(i) for i in range(19)]}))
    seen = {}
    original = fit_module.build_criterion

    def spy(weights, device):
        seen["weights"] = weights
        return original(weights, device)

    monkeypatch.setattr(fit_module, "build_criterion", spy)
    run_fit(params, tmp_path / "live", class_weights_file=weights_file)
    assert seen["weights"] == [float(i) for i in range(19)]


def test_sync_bn_in_one_process_is_plain_batch_norm_with_a_log_line(tiny_dataset, masks,
                                                                   tmp_path, caplog):
    params = parse_params(tiny_params(tiny_dataset, masks, tmp_path / "models", epochs=1,
                                      sync_bn=True, monitor_system=False))
    with caplog.at_level(logging.INFO, "fcn"):
        run_fit(params, tmp_path / "live")
    assert "train.sync_bn: one process, nothing to synchronise: plain BatchNorm" in caplog.text
    assert ckpt.load(tmp_path / "models" / "last.pt")["epoch"] == 1
