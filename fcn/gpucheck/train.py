"""The training steps of the check: each precision's optimizer steps, a window of steps that
must never wait for the GPU, torch.compile against eager, an overfit that becomes the check's
trained checkpoint, the train stage killed and resumed, DDP, and fit() at the Cityscapes
recipe for the loader's data-wait fraction. Every step runs the library's own code
(`fcn.train`) or the train stage itself."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from fcn import checkpoint as ckpt
from fcn.backends import training_mode
from fcn.cityscapes.labels import NUM_CLASSES
from fcn.device import grad_scaler, peak_memory, reset_peak, sync_debug, synchronize
from fcn.gpucheck.data import data, decoded
from fcn.gpucheck.runner import Check, Outcome, Skip
from fcn.metrics import summary
from fcn.model import build_model
from fcn.params import (ModelParams, Params, TrainParams, default_params_dict, parse_params,
                        data_identity)
from fcn.train.data import SegmentationDataset, ShardSampler
from fcn.train.distributed import Context
from fcn.train.fit import fit, make_loaders, seed_everything
from fcn.train.loop import (TrainStep, build_criterion, build_optimizer, build_scheduler,
                            train_one_epoch, validate)

REPO = Path(__file__).resolve().parents[2]
TRAIN_STAGE = REPO / "stages" / "train.py"
RECIPE = REPO / "recipes" / "fcn8s_vgg11bn_512x1024_80k_cityscapes.args"

MIN_DECREASE = 0.9
"""Fixed-batch training: the mean loss of the last quarter of the steps must be below this
fraction of the first quarter's."""
OVERFIT_MIOU = 0.9
RESUME_MIOU_TOL = 0.02
"""CUDA kill/resume: |final val mIoU, resumed - uninterrupted| (cuDNN is not bit-exact)."""
RESUME_LOSS_TOL = 0.05
"""CUDA kill/resume: |final val loss difference| / uninterrupted val loss."""
DDP_MIOU_TOL_CUDA = 1e-3
"""nccl DDP: logged val mIoU against one process re-validating the saved model (CPU: exact)."""


def context(check: Check) -> Context:
    return Context(0, 1, check.device)


def read_recipe(path: Path = RECIPE) -> dict[str, dict[str, Any]]:
    """The named recipe's `-S section.key=value` overrides, as {section: {key: value}}."""
    overrides: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line.startswith("-S "):
            continue
        key, value = line[3:].split("=", 1)
        section, name = key.split(".", 1)
        overrides.setdefault(section, {})[name] = yaml.safe_load(value)
    return overrides


def recipe_batches(check: Check, crop: tuple[int, int], batch: int, count: int
                   ) -> list[list[torch.Tensor]]:
    """`count` batches of the training loader (`fcn.train.fit.make_loaders`, loader side on
    the CPU) at the recipe's augmentation, from the large dataset's train images; pinned for
    CUDA, so the step's copies are asynchronous."""
    key = ("batches", crop, batch, count)
    if key not in check.artifacts:
        root, generated, _ = data(check, "large")
        recipe = read_recipe()["train"]
        t = TrainParams(crop=list(crop), scale=recipe["scale"], flip=recipe["flip"],
                        jitter=recipe["jitter"], batch_size=batch, workers=0)
        loader, _ = make_loaders(root, generated, t, Context(0, 1, torch.device("cpu")))
        batches = []
        for epoch in range(count):
            loader.sampler.set_epoch(epoch)
            batches.append(next(iter(loader)))
        check.artifacts[key] = batches
    batches = check.artifacts[key]
    if check.mode == "cuda":
        return [[t.pin_memory() for t in b] for b in batches]
    return batches


def quarter_means(values: list[float]) -> tuple[float, float]:
    """(mean of the first quarter, mean of the last quarter) of a sequence (≥ 1 each)."""
    k = max(1, len(values) // 4)
    return statistics.fmean(values[:k]), statistics.fmean(values[-k:])


def _fresh(check: Check, precision: str, steps: int, **train: Any) -> tuple[Any, ...]:
    """A seeded FCN8s on the step's device with the optimizer, schedule, scaler and loss fit()
    would build for `precision` (AdamW, constant LR)."""
    seed_everything(0)
    model = build_model(ModelParams(), NUM_CLASSES).to(check.device)
    params = TrainParams(precision=precision, poly_power=0.0, **train)
    optimizer = build_optimizer(model, params)
    scheduler = build_scheduler(optimizer, params, steps)
    return (model, optimizer, scheduler, grad_scaler(check.device, precision),
            build_criterion(None, check.device))


def step_precision(check: Check, precision: str) -> Outcome:
    """`steps` optimizer steps of `train_one_epoch` on one fixed batch at `precision`."""
    s = check.sizes
    batch = recipe_batches(check, s.steps_crop, s.steps_batch, 1)[0]
    model, optimizer, scheduler, scaler, criterion = _fresh(check, precision, s.steps)
    losses: list[float] = []
    seconds: list[float] = []
    scales: list[float] = []
    initial_scale = float(scaler.get_scale()) if scaler.is_enabled() else None
    reset_peak(check.device)
    with training_mode(check.device, precision):  # as fit() trains
        for step in range(s.steps):
            synchronize(check.device)
            start = time.perf_counter()
            result = train_one_epoch(model, [batch], criterion, optimizer, scheduler, scaler,
                                     context(check), precision, step)
            synchronize(check.device)
            seconds.append(time.perf_counter() - start)
            losses.append(result.loss)
            if scaler.is_enabled():
                scales.append(float(scaler.get_scale()))
    first, last = quarter_means(losses)
    finite = all(math.isfinite(v) for v in losses)
    decreasing = finite and last < MIN_DECREASE * first
    step_s = statistics.median(seconds[1:] or seconds)
    peaks = peak_memory(check.device)
    figures: dict[str, Any] = {
        "precision": precision, "batch": list(batch[0].shape), "steps": s.steps,
        "losses": losses, "loss_first_quarter": first, "loss_last_quarter": last,
        "finite": finite, "decreasing": decreasing, "step_ms_median": 1e3 * step_s,
        "samples_per_s": len(batch[0]) / step_s,
        "peak_allocated_mb": None if peaks is None else peaks["allocated"] / 2**20,
        "optimizer_fused": bool(optimizer.defaults.get("fused"))}
    if scales:  # a halved scale is a step the scaler skipped (inf/NaN gradients)
        figures["grad_scaler"] = {"scales": scales, "final_scale": scales[-1],
                                  "skipped_steps": sum(b < a for a, b in
                                                       zip([initial_scale, *scales], scales))}
    reference = check.artifacts.get("losses_fp32")
    if reference is not None and precision != "fp32":
        figures["max_abs_loss_diff_vs_fp32"] = max(abs(a - b) for a, b in zip(losses, reference))
    if precision == "fp32":
        check.artifacts["losses_fp32"] = losses
    problem = "" if decreasing else (
        f"loss not finite: {losses}" if not finite else
        f"loss not decreasing: last-quarter mean {last:.4f} >= {MIN_DECREASE} x first "
        f"{first:.4f}")
    head = f"loss {first:.3f} -> {last:.3f}, {1e3 * step_s:.0f} ms/step"
    if scales:
        head += f", scaler skipped {figures['grad_scaler']['skipped_steps']}"
    return Outcome(decreasing, figures, head, problem)


def _window(check: Check, precision: str, batches: list, mode: str) -> dict[str, Any]:
    """Warm-up steps, then a window of `TrainStep` calls under `sync_debug(mode)`; the
    figures read once after it."""
    model, optimizer, scheduler, scaler, criterion = _fresh(check, precision, len(batches) + 2)
    model.train()
    step = TrainStep(model, criterion, optimizer, scheduler, scaler, context(check), precision)
    for batch in batches[:2]:  # warm-up: cuDNN autotuning, optimizer state, allocator
        step(batch)
    synchronize(check.device)
    caught: list[str] = []
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        with sync_debug(check.device, mode):
            for batch in batches[2:]:
                step(batch)
            queued = time.perf_counter() - start
        caught = [str(w.message).splitlines()[0] for w in recorded
                  if "synchroniz" in str(w.message)]
    synchronize(check.device)
    elapsed = time.perf_counter() - start
    figures = {"precision": precision, "steps": len(batches) - 2, "sync_debug_mode": mode,
               "host_queued_s": queued, "elapsed_s": elapsed,
               "step_ms": 1e3 * elapsed / max(1, len(batches) - 2),
               "synchronising_calls": len(caught), "first_synchronising_call": caught[:1],
               "optimizer_fused": bool(optimizer.defaults.get("fused"))}
    if check.device.type != "meta":
        step.check(0)  # the figures, read once (a synchronisation, outside the window)
        figures["mean_loss"] = float(step.loss_sum) / step.passes
    return figures


def step_sync_free(check: Check) -> Outcome:
    """Training steps that never wait for the GPU: bf16 (the default) under
    `torch.cuda.set_sync_debug_mode("error")` (any synchronising call raises), then fp16 with
    its gradient scaler under "warn" (counted). Dry mode runs the same steps on the meta
    device, whose tensors cannot be read at all: any host read in the step raises there."""
    s = check.sizes
    batches = recipe_batches(check, s.window_crop, s.window_batch, s.window_steps + 2)
    with training_mode(check.device, "bf16"):
        bf16 = _window(check, "bf16", batches, "error")
    with training_mode(check.device, "fp16"):
        fp16 = _window(check, "fp16", batches, "warn")
    figures = {"bf16": bf16, "fp16": fp16, "device": str(check.device)}
    head = (f"{bf16['steps']} bf16 steps with no synchronising call; fp16: "
            f"{fp16['synchronising_calls']} in {fp16['steps']} steps")
    if check.real_gpu:
        head += (f" (host queued {bf16['steps']} steps in {bf16['host_queued_s'] * 1e3:.0f} ms, "
                 f"GPU took {bf16['elapsed_s'] * 1e3:.0f} ms)")
    return Outcome(True, figures, head)


def _timed_steps(check: Check, batches: list, precision: str, compiled: bool
                 ) -> dict[str, Any]:
    """A fresh model's first step (the compile, when compiled) and the mean of the rest."""
    model, optimizer, scheduler, scaler, criterion = _fresh(check, precision, len(batches))
    net = torch.compile(model) if compiled else model
    step = TrainStep(net, criterion, optimizer, scheduler, scaler, context(check), precision)
    model.train()
    synchronize(check.device)
    start = time.perf_counter()
    step(batches[0])
    synchronize(check.device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    synchronize(check.device)
    per_step = (time.perf_counter() - start) / (len(batches) - 1)
    step.check(0)
    return {"first_step_s": first, "step_ms": 1e3 * per_step,
            "samples_per_s": len(batches[0][0]) / per_step,
            "mean_loss": float(step.loss_sum) / step.passes}


def step_compile(check: Check) -> Outcome:
    """train.compile: the training model under torch.compile against eager, the same steps
    on the same fixed batch (bf16 at the recipe's crop on a GPU): compile time, step time of
    each, and the loss of both after the same steps."""
    s = check.sizes
    batches = recipe_batches(check, s.compile_crop, s.compile_batch, 1) * (s.compile_steps + 1)
    precision = "bf16"
    runs: dict[str, dict[str, Any]] = {}
    with training_mode(check.device, precision):
        for name in ("eager", "compiled"):
            runs[name] = _timed_steps(check, batches, precision, compiled=name == "compiled")
    speedup = runs["eager"]["step_ms"] / runs["compiled"]["step_ms"]
    loss_diff = abs(runs["eager"]["mean_loss"] - runs["compiled"]["mean_loss"])
    finite = all(math.isfinite(r["mean_loss"]) for r in runs.values())
    figures = {**runs, "speedup": speedup, "compile_s": runs["compiled"]["first_step_s"],
               "mean_loss_abs_diff": loss_diff, "crop": list(s.compile_crop),
               "batch": s.compile_batch, "steps": s.compile_steps, "precision": precision}
    return Outcome(finite, figures, f"compiled {speedup:.2f}x eager "
                   f"({runs['compiled']['step_ms']:.1f} vs {runs['eager']['step_ms']:.1f} ms/step, "
                   f"compile {figures['compile_s']:.0f} s)", "" if finite else "loss not finite")


def step_overfit(check: Check) -> Outcome:
    """The overfit dataset's train images, whole, no augmentation, until their mIoU >= 0.9
    (validated every 10 steps); saved as the check's trained checkpoint."""
    root, generated, synth = data(check, "overfit")
    size = [synth.height, synth.width]
    count = len(synth.train_cities) * synth.train_per_city
    precision = "bf16" if check.on_cuda else "fp32"  # train.precision's default on CUDA
    max_steps = check.sizes.overfit_max_steps
    params = TrainParams(lr=2e-3, epochs=max_steps, weight_decay=0.0, precision=precision,
                         crop=size, scale=[1.0, 1.0], flip=False, jitter=0.0, batch_size=count,
                         workers=0)
    loader, _ = make_loaders(root, generated, params, context(check))  # fit's own loader
    plain = DataLoader(SegmentationDataset(root, generated, "train"), batch_size=1)
    seed_everything(0)
    model_params = ModelParams()
    model = build_model(model_params, NUM_CLASSES).to(check.device)
    optimizer = build_optimizer(model, params)
    scheduler = build_scheduler(optimizer, params, max_steps)
    scaler = grad_scaler(check.device, precision)
    criterion = build_criterion(None, check.device)
    curve: list[tuple[int, float]] = []
    start = time.perf_counter()
    miou, record = math.nan, {}
    with training_mode(check.device, precision):  # as fit() trains
        for step in range(max_steps):
            trained = train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler,
                                      context(check), precision, step)
            if (step + 1) % 10 == 0 or step + 1 == max_steps:
                result = validate(model, plain, criterion, context(check), precision)
                scores = summary(result.confusion)
                miou = scores["miou"]
                curve.append((step + 1, miou))
                record = {"epoch": step, "train/loss": trained.loss, "val/loss": result.loss,
                          **{f"val/{k}": v for k, v in scores.items()}}
                if miou >= OVERFIT_MIOU:
                    break
    seconds = time.perf_counter() - start
    path = check.work / "overfit" / ckpt.BEST
    state = ckpt.training_state(
        model=model, model_params=model_params, epoch=curve[-1][0], step=scheduler.last_epoch,
        optimizer=optimizer, scheduler=scheduler, scaler=scaler, best_miou=miou,
        best_epoch=curve[-1][0] - 1, history=[record],
        hashed=ckpt.hashed_params(model_params, params,
                                  {"synthesize": dataclasses.asdict(synth)}),
        rng=[ckpt.rng_state(check.device)])
    ckpt.save(path, ckpt.best_subset(state))
    check.artifacts["checkpoint"] = path
    passed = miou >= OVERFIT_MIOU
    figures = {"precision": precision, "image_size": size, "images": count,
               "steps": curve[-1][0], "max_steps": max_steps, "val_miou": miou,
               "val_loss": record.get("val/loss"), "train_loss": record.get("train/loss"),
               "curve": curve, "seconds": seconds, "checkpoint": str(path)}
    return Outcome(passed, figures, f"val mIoU {miou:.4f} after {curve[-1][0]} steps "
                   f"({precision})", "" if passed else
                   f"val mIoU {miou:.4f} < {OVERFIT_MIOU} after {max_steps} steps")


# --- the train stage as a subprocess ---------------------------------------------------------

def child_env() -> dict[str, str]:
    """The environment of a stage subprocess: the project importable wherever it runs from
    (the lent machine has no install of it), progress bars off."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("TQDM_DISABLE", "1")
    return env


def stage_params(check: Check, run_dir: Path, **train: Any) -> dict[str, Any]:
    """params.yaml for a short train-stage run on the small dataset, its checkpoints and state
    folder inside `run_dir`."""
    root, generated, synth = data(check, "small")
    params = default_params_dict()
    params["data"].update(root=str(root), generated=str(generated))
    params["synthesize"] = dataclasses.asdict(synth)
    params["train"].update(epochs=check.sizes.resume_epochs,
                           batch_size=check.sizes.resume_batch,
                           crop=list(check.sizes.resume_crop), workers=0, nproc=1,
                           device="cuda" if check.on_cuda else "cpu", monitor_system=False,
                           out=str(run_dir / "models"), resume_dir=str(run_dir / "resume"))
    params["train"].update(train)
    params["decode"].update(enabled=True, out=str(decoded(check, "small")))
    return params


def stage_command(params: dict[str, Any], run_dir: Path) -> list[str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    params_file = run_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return [sys.executable, str(TRAIN_STAGE), "--params", str(params_file), "--no-live"]


def start_stage(params: dict[str, Any], run_dir: Path, stderr: Any = None
                ) -> tuple[subprocess.Popen, Path]:
    """The train stage in the background; its stderr to `<run_dir>/stderr.log` (or a pipe)."""
    command = stage_command(params, run_dir)
    log_file = run_dir / "stderr.log"
    if stderr is subprocess.PIPE:
        return subprocess.Popen(command, cwd=run_dir, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=child_env()), log_file
    with log_file.open("w") as out:
        process = subprocess.Popen(command, cwd=run_dir, stdout=subprocess.DEVNULL,
                                   stderr=out, text=True, env=child_env())
    return process, log_file


def finish_stage(process: subprocess.Popen, log_file: Path, timeout: float) -> str:
    """Wait for a background stage; its stderr; a non-zero exit raises with its tail."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise RuntimeError(f"the train stage ran over {timeout:.0f} s: "
                           f"{log_file.read_text()[-1500:]}") from None
    stderr = log_file.read_text()
    if process.returncode != 0:
        raise RuntimeError(f"the train stage exited with {process.returncode}: {stderr[-1500:]}")
    return stderr


def run_stage(params: dict[str, Any], run_dir: Path, timeout: float = 600) -> str:
    process, log_file = start_stage(params, run_dir)
    try:
        return finish_stage(process, log_file, timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def state_folder(params: dict[str, Any]) -> Path:
    """Where the train stage keeps this run's checkpoints until it ends."""
    from fcn.train import resume

    parsed = parse_params(params)
    hashed = ckpt.hashed_params(parsed.model, parsed.train, data_identity(parsed))
    return resume.state_dir(parsed.train.resume_dir, hashed)


def revalidate(check: Check, checkpoint: Path, precision: str,
               device: torch.device) -> dict[str, float]:
    """Scores of a saved model on the small dataset's val split, in this one process."""
    root, generated, _ = data(check, "small")
    model = ckpt.load_model(checkpoint).to(device)
    val = SegmentationDataset(root, generated, "val")
    loader = DataLoader(val, batch_size=1, sampler=ShardSampler(len(val)))
    result = validate(model, loader, build_criterion(None, device), Context(0, 1, device),
                      precision)
    return {"loss": result.loss, **summary(result.confusion)}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """(bit-identical, largest absolute difference) of two state dicts."""
    identical, largest = a.keys() == b.keys(), 0.0
    for key in a.keys() & b.keys():
        x, y = a[key], b[key]
        identical &= torch.equal(x, y)
        if x.is_floating_point():
            largest = max(largest, float((x.double() - y.double()).abs().max()))
    return identical, largest


def _untimed(history: list[dict[str, Any]]) -> str:
    return json.dumps([{k: v for k, v in r.items() if not k.startswith("time/")}
                       for r in history])


def step_kill_resume(check: Check) -> Outcome:
    """The train stage SIGKILLed after epoch 1 and run again, against an uninterrupted run:
    bit-identical on a CPU, within the stated tolerance on CUDA. On CUDA in fp16, so the
    gradient scaler's state and the GPU's RNG state are saved and restored too."""
    epochs = check.sizes.resume_epochs
    precision = "fp16" if check.on_cuda else "fp32"
    base = check.work / "kill-resume"
    whole_params = stage_params(check, base / "whole", precision=precision)
    cut_params = stage_params(check, base / "cut", precision=precision)
    start = time.perf_counter()
    whole, whole_log = start_stage(whole_params, base / "whole")  # alongside the cut run
    process, _ = start_stage(cut_params, base / "cut", stderr=subprocess.PIPE)
    watchdog = threading.Timer(600, process.kill)
    watchdog.start()
    try:
        lines: list[str] = []
        for line in process.stderr:  # logged after epoch 1's checkpoint is written
            lines.append(line)
            if f"epoch 1/{epochs}" in line:
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=120)
        watchdog.cancel()
        if process.returncode != -signal.SIGKILL:
            return Outcome(False, {"returncode": process.returncode}, "not killed",
                           f"the run ended ({process.returncode}) before epoch 1 was logged: "
                           f"{''.join(lines)[-1500:]}")
        state = state_folder(cut_params)
        left = ckpt.load(state / ckpt.LAST)["epoch"] if (state / ckpt.LAST).exists() else None
        out_absent = not Path(cut_params["train"]["out"]).exists()
        resumed = run_stage(cut_params, base / "cut")
        finish_stage(whole, whole_log, 600)
    finally:
        watchdog.cancel()
        for running in (process, whole):
            if running.poll() is None:
                running.kill()
                running.wait()
    seconds = time.perf_counter() - start
    a = ckpt.load(Path(whole_params["train"]["out"]) / ckpt.LAST)
    b = ckpt.load(Path(cut_params["train"]["out"]) / ckpt.LAST)
    identical, max_diff = _same_weights(a["model"], b["model"])
    final_a, final_b = a["history"][-1], b["history"][-1]
    miou_diff = abs(final_a["val/miou"] - final_b["val/miou"])
    loss_rel = abs(final_a["val/loss"] - final_b["val/loss"]) / abs(final_a["val/loss"])
    if not check.on_cuda:
        criterion = "bit-identical weights and history"
        equal = identical and _untimed(a["history"]) == _untimed(b["history"])
    else:
        criterion = (f"|val mIoU diff| <= {RESUME_MIOU_TOL} and |val loss diff| <= "
                     f"{RESUME_LOSS_TOL:.0%} (cuDNN is not bit-exact)")
        equal = miou_diff <= RESUME_MIOU_TOL and loss_rel <= RESUME_LOSS_TOL
    scaler_state = b["scaler"]
    checks = {  # each True when as expected
        "killed after epoch 1, state folder holding epoch 1": left == 1,
        "train.out not written before the run ended": out_absent,
        f"the rerun resumed after epoch 1 of {epochs}":
            "resuming from" in resumed and f"after epoch 1 of {epochs}" in resumed,
        "state folder removed once published": not state.exists(),
        f"both runs ended after epoch {epochs}, same optimizer step":
            a["epoch"] == b["epoch"] == epochs and a["step"] == b["step"],
        criterion: equal}
    if check.on_cuda:
        checks["the GPU's RNG state and the fp16 scaler's state are in the checkpoint"] = (
            all("cuda" in r for r in b["rng"]) and bool(scaler_state))
    ok = all(checks.values())
    figures = {"device": "cuda" if check.on_cuda else "cpu", "precision": precision,
               "epochs": epochs, "checks": checks, "state_epoch_after_kill": left,
               "bit_identical_weights": identical, "max_abs_weight_diff": max_diff,
               "final_val_miou": {"uninterrupted": final_a["val/miou"],
                                  "resumed": final_b["val/miou"]},
               "final_val_loss": {"uninterrupted": final_a["val/loss"],
                                  "resumed": final_b["val/loss"]},
               "val_miou_diff": miou_diff, "val_loss_rel_diff": loss_rel,
               "scaler_state": {k: float(v) if isinstance(v, (int, float)) else str(v)
                                for k, v in scaler_state.items()}, "seconds": seconds}
    return Outcome(ok, figures, f"resumed after epoch 1; weights "
                   f"{'bit-identical' if identical else f'max diff {max_diff:.2e}'}, "
                   f"val mIoU diff {miou_diff:.2e}",
                   "" if ok else "not as expected: " + "; ".join(
                       k for k, v in checks.items() if not v))


def step_ddp(check: Check, nproc: int) -> Outcome:
    """The train stage under torchrun with `nproc` processes (gloo on a CPU, nccl on CUDA),
    sync_bn on; the logged val mIoU against one process re-validating the saved model."""
    device = "cuda" if check.on_cuda else "cpu"
    if check.fakes is not None:
        raise Skip("torchrun's processes cannot share this process's CUDA fakes")
    run_dir = check.work / f"ddp-{device}"
    params = stage_params(check, run_dir, epochs=1, nproc=nproc, device=device, sync_bn=True,
                          batch_size=2)
    start = time.perf_counter()
    stderr = run_stage(params, run_dir)
    seconds = time.perf_counter() - start
    out = Path(params["train"]["out"]) / ckpt.LAST
    logged = ckpt.load(out)["metrics"]
    again = revalidate(check, out, params["train"]["precision"], torch.device(device, 0)
                       if device == "cuda" else torch.device("cpu"))
    diff = abs(logged["val/miou"] - again["miou"])
    tolerance = 0.0 if device == "cpu" else DDP_MIOU_TOL_CUDA
    ranks = f" x{nproc}: " in stderr  # "training <backbone> on <device> x<n>: ..."
    sync_line = next((line.split(" INFO ", 1)[-1] for line in stderr.splitlines()
                      if "SyncBatchNorm" in line), None)
    sync_ok = device == "cpu" or (sync_line is not None
                                  and f"over {nproc} processes" in sync_line)
    passed = ranks and sync_ok and diff <= tolerance
    figures = {"processes": nproc, "backend": "gloo" if device == "cpu" else "nccl",
               "logged_val_miou": logged["val/miou"], "revalidated_val_miou": again["miou"],
               "val_miou_diff": diff, "tolerance": tolerance, "sync_bn": sync_line,
               "seconds": seconds}
    problems = ([] if ranks else [f"the log does not show {nproc} processes"]) + (
        [] if sync_ok else [f"no SyncBatchNorm over {nproc} processes in the log"]) + (
        [] if diff <= tolerance else [f"val mIoU differs by {diff:.3g} > {tolerance}"])
    return Outcome(passed, figures, f"{figures['backend']} x{nproc}: logged val mIoU "
                   f"{logged['val/miou']:.4f}, re-validated diff {diff:.1e}", "; ".join(problems))


def step_loader(check: Check) -> Outcome:
    """fit() at the Cityscapes recipe (crop, scale, flip, jitter, batch, precision, workers)
    for `loader_epochs` epochs, reading the decode stage's cache (the default) and the PNGs;
    the last epoch's loader wait (`time/data_fraction`) and samples/s of each. Without a
    DVCLive log (the lent machine has no DVC)."""
    root, generated, synth = data(check, "large")
    recipe = read_recipe()
    s = check.sizes
    raw = default_params_dict()
    raw["data"].update(root=str(root), generated=str(generated))
    raw["synthesize"] = dataclasses.asdict(synth)
    raw["model"].update(recipe.get("model", {}), weights="none")  # no ImageNet file needed
    raw["train"].update(recipe["train"], epochs=s.loader_epochs, iterations=None,
                        device="cuda" if check.on_cuda else "cpu", monitor_system=False,
                        nproc=1)
    if s.loader_crop is not None:  # tiny images: the recipe's proportions
        raw["train"].update(crop=list(s.loader_crop), batch_size=s.loader_batch,
                            workers=s.loader_workers)
    figures: dict[str, Any] = {"image_size": [synth.height, synth.width],
                               "device": str(check.device), "cpu_count": os.cpu_count()}
    problems = []
    keys = ("time/data_s", "time/compute_s", "time/data_fraction")
    t: TrainParams | None = None
    for source, cache in (("decoded", decoded(check, "large")), ("png", None)):
        run_dir = check.work / f"loader-{source}"
        raw["train"].update(out=str(run_dir / "models"), resume_dir=str(run_dir / "resume"))
        params: Params = parse_params(raw, "the loader check's parameters")
        t = params.train
        start = time.perf_counter()
        record = fit(params.model, t, root, generated, None,
                     identity=data_identity(params), decoded=cache)
        missing = [k for k in keys if k not in record]
        if missing:
            problems.append(f"fit()'s record has no {', '.join(missing)}")
            continue
        data_s, compute_s, fraction = (record[k] for k in keys)
        rate = record.get("time/samples_per_s", math.nan)
        figures[source] = {"data_s": data_s, "compute_s": compute_s, "data_fraction": fraction,
                           "samples_per_s": rate, "val_s": record.get("time/val_s"),
                           "train_loss": record["train/loss"],
                           "seconds": time.perf_counter() - start}
        if not (all(math.isfinite(v) for v in (data_s, compute_s, fraction, rate))
                and 0 <= fraction <= 1):
            problems.append(f"{source}: timings are not finite fractions")
    assert t is not None
    figures.update(crop=t.crop, scale=t.scale, flip=t.flip, jitter=t.jitter,
                   batch_size=t.batch_size, precision=t.precision, workers=t.workers,
                   epochs=t.epochs)
    if check.fakes is not None:
        figures["cuda_calls"] = sorted({name for name, _, _ in check.fakes.calls})
    head = "; ".join(f"{source}: data wait {f['data_fraction']:.1%}, {f['samples_per_s']:.1f} "
                     "samples/s" for source, f in figures.items()
                     if source in ("decoded", "png"))
    head += f" (workers {t.workers}, batch {t.batch_size}, crop {t.crop[0]}x{t.crop[1]})"
    return Outcome(not problems, figures, head, "; ".join(problems))
