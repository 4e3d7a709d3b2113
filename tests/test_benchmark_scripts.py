"""Every script in benchmarks/ runs its `--smoke` mode as a user runs the script (a subprocess
from the repository root) and prints its figures, so a script that rots fails here instead of
at its next real run. Each run gets its own empty TMPDIR, which must be empty again afterwards
(temporary folders removed), and must write nothing into docs/measured/ or the repository's
top level (no `--out` is given)."""

from __future__ import annotations

import getpass
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
N = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"  # a printed figure
TIMEOUT_S = 180


@dataclass(frozen=True)
class Smoke:
    """One smoke run: the script, its arguments, regexes that must each match (re.MULTILINE)
    in its stdout, and a further check of the stdout."""

    script: str
    args: tuple[str, ...] = ("--smoke",)
    patterns: tuple[str, ...] = ()
    check: Callable[[str], None] | None = None
    slow: bool = False
    timeout_s: int = TIMEOUT_S


def _last_json(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert lines, "printed nothing"
    return json.loads(lines[-1])


def _positive_figures(values: dict, keys: set[str]) -> None:
    assert set(values) == keys
    for key, value in values.items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)


def _loader_headline(stdout: str) -> None:
    """`--json` ends with one line: exactly the headline figures."""
    _positive_figures(_last_json(stdout),
                      {"samples_per_s_per_core", "old_samples_per_s_per_core", "ratio"})


def _rehearsal_timings(stdout: str) -> None:
    """The last line: the train stage's last-epoch timings."""
    _positive_figures(_last_json(stdout), {"data_s", "compute_s", "val_s", "samples_per_s"})


def _cython_where_buildable(stdout: str) -> None:
    """Where Cython and a C compiler are present, cityscapesScripts ran its Cython form (a
    broken build must not quietly time the slow pure-Python form)."""
    form = re.search(r"^cityscapesScripts form: (.*)$", stdout, re.MULTILINE).group(1)
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if importlib.util.find_spec("Cython") and shutil.which(compiler):
        assert form.startswith("Cython extension ("), form
    else:
        assert form.startswith("pure Python (Cython not available") or \
            form.startswith("pure Python (no C compiler"), form


def _inference_rows(stdout: str) -> None:
    rows = re.findall(rf"^.+ class IoU {N}  category IoU {N} +{N} ms/image$", stdout,
                      re.MULTILINE)
    assert len(rows) == 7, stdout  # whole, flip, 3 scales (+ flip), 6 scales + flip, slide (+ flip)
    assert "wrote " not in stdout  # no JSON without --out


def _precision_rows(stdout: str) -> None:
    rows = re.findall(rf"^  (?:tf32|bf16|fp16): agreement {N}% -> (?:keeps|changes) "
                      rf"predictions \[.+, {N} s\]$", stdout, re.MULTILINE)
    assert len(rows) >= 4, stdout  # bf16 and fp16 (and tf32 on CUDA) for both models


def _train_rows(compiled: bool) -> Callable[[str], None]:
    def check(stdout: str) -> None:
        names = re.findall(rf"^(before|after|compiled) +{N} ms/step \(best of 1 rounds of 1; "
                           rf"median {N}\), {N} images/s, {N} GFLOP/s = {N}% of matmul; "
                           rf"warm-up {N} s$", stdout, re.MULTILINE)
        assert names == ["before", "after"] + (["compiled"] if compiled else []), stdout
        assert ("compiled / eager" in stdout) == compiled
    return check


def _stage_lines(stages: tuple[str, ...], again: tuple[str, ...]) -> tuple[str, ...]:
    first = tuple(rf"^{s} +{N} s  peak +{N} MB  disk +{N} MB  repeat +{N} s$" for s in stages)
    more = tuple(rf"^{s} +x2 images +{N} s: {N} s and {N} MB per image$" for s in again)
    return first + more


def _evaluate_block(writer: str) -> str:
    return (rf"^PNGs written by {re.escape(writer)}:\n"
            rf"  cityscapesScripts +{N} ms/image\n"
            rf"  ours, 1 worker +{N} ms/image\n"
            rf"  ours, 2 threads +{N} ms/image\n"
            rf"  speed-up: {N}x with 1 worker, {N}x with 2 threads$")


def _inductor_cache() -> str:
    """torch's compile cache where it is without our TMPDIR (torch makes it on import; kept
    warm between runs)."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")


SMOKES = (
    Smoke("masks_speed", patterns=(
        r"^2 annotations, 128x64, \d+ polygons each, encodings: labelIds, labelTrainIds, "
        r"color, instanceIds$",
        r"^pixels identical: all 4 encodings of every image",
        rf"^ +cityscapesScripts: +{N} images/s$",
        rf"^ +ours, 1 worker: +{N} images/s$",
        rf"^ +ours, 2 workers: +{N} images/s$",
        rf"^ours \(1 worker\) / cityscapesScripts: {N}x",
        rf"^rendering \(parse \+ draw the 4 encodings, no PNG\), one process: "
        rf"cityscapesScripts {N} ms/image, ours {N} ms/image \({N}x\)$",
        rf"^PNG encoding of the 4 masks, one process: PIL {N} ms/image, fcn\.png {N} "
        rf"ms/image \({N}x\)$",
        rf"^PNG size of the 4 masks: PIL {N} kB/image, fcn\.png {N} kB/image \(ours {N}x "
        rf"the bytes: [+-]\d+%\)$")),
    Smoke("evaluate_speed", patterns=(
        r"^cityscapesScripts form: (?:Cython extension|pure Python) \(.+\)$",
        rf"^2 images of 64x128, {N} ground-truth instances per image, best of 1 rounds; "
        r"scores agree to 1e-9$",
        _evaluate_block("fcn.png"), _evaluate_block("PIL")),
        check=_cython_where_buildable),
    Smoke("loader_throughput", args=("--smoke", "--json"), patterns=(
        rf"^  old \(PNG decode, whole-image resize, uint8 jitter\): +{N} samples/s$",
        rf"^  new \(decoded cache, crop-only resize, uint8 out\)  : +{N} samples/s \({N}x\)$",
        rf"^  new without the cache \(PNG decode, crop-only\) +: +{N} samples/s$",
        rf"^PNG decoders, one 64x128 RGB image: torchvision\.io {N} ms, PIL {N} ms",
        rf"^Checking the decoded cache .*: {N} s per GB",
        rf"^GPU demand: one 32x64 training sample is {N} GFLOP"),
        check=_loader_headline),
    Smoke("train_throughput", args=("--smoke", "--no-compile"), patterns=(
        rf"^FLOPs per step +{N} GFLOP",
        rf"^fp32 matmul +{N} GFLOP/s",
        rf"^after / before +{N}x the throughput"),
        check=_train_rows(compiled=False)),
    Smoke("train_throughput", patterns=(rf"^compiled / eager +{N}x the throughput",),
          check=_train_rows(compiled=True), slow=True),  # a cold torch.compile: ~30 s
    Smoke("inference_modes", patterns=(
        rf"^whole +class IoU {N}  category IoU {N} +{N} ms/image$",
        rf"^slide 32x64 \+ flip +class IoU {N}  category IoU {N} +{N} ms/image$"),
        check=_inference_rows),
    Smoke("precision_agreement", patterns=(
        r"^1 synthetic images 64x128 on \w+; fast path needs agreement >= 99\.9%$",
        rf"^trained_like: \d+ classes predicted; logit margin quantiles 0\.1% {N}, 1% {N}, "
        rf"median {N}$",
        r"^random checkpoint: \d+ classes predicted; logit margin quantiles"),
        check=_precision_rows),
    Smoke("evaluate_analysis", patterns=(
        r"^2 val images of 64x128, fp32 on the CPU \(\d+ threads\), best of 1 rounds$",
        rf"^official scores only +{N} ms/image$",
        rf"^with the analysis +{N} ms/image  \(\+{N} ms/image, [+-]{N}%\), temperature fit "
        r"not included$",
        rf"^temperature fit +{N} s once \(\d+ pixels\): [+-]{N}% over these 2 images, "
        rf"[+-]{N}% over Cityscapes' 500 val images$",
        rf"^peak Python memory of an analysed run: {N} MB over 2 images, {N} MB over 4$")),
    Smoke("class_sampling", patterns=(
        r"^4 train images of 64x128, 40 crops of 48x48 per setting, one thread, best of 1 "
        r"rounds$",
        rf"^  train +{N} +{N} +{N} +{N}$",
        rf"^before this change +{N} samples/s per core \(1\.00x the loader before this "
        r"change\)$",
        *(rf"^{name} +{N} samples/s per core \({N}x the loader before this change\)$"
          for name in ("random crops", r"class_uniform 0\.5", r"cat_max_ratio 0\.75", "both")))),
    Smoke("worker_start", patterns=(
        r"^1 configuration\(s\), one worker process each, best of 1 round\(s\):$",
        rf"^  forkserver +{N} s  \({N} s per configuration\)$",
        rf"^  spawn +{N} s  \({N} s per configuration\)$",
        rf"^forkserver / spawn: {N}x the time \([+-]?{N} s saved\)$",
        rf"^  fp32-nchw-eager-b1 +median latency: spawn +{N} ms, forkserver +{N} ms$")),
    Smoke("dvc_hashing", patterns=(
        rf"^10 files, {N} GB \(written in {N} s\): first dvc status {N} s \({N} GB/s, page "
        rf"cache (?:warm|dropped)\), second {N} s$",)),
    Smoke("rehearsal", patterns=_stage_lines(
        ("synthesize", "masks", "class_weights", "decode", "train"),
        ("masks", "class_weights", "decode")),
        check=_rehearsal_timings, slow=True, timeout_s=400),  # ~35 s: clone + 8 dvc repro
)


def _case_id(smoke: Smoke) -> str:
    return " ".join((smoke.script, *smoke.args))


def _written(root: Path) -> dict[str, int | None]:
    """Every entry at the repository's top level and in docs/measured/, with its mtime if it is
    a file: where a script's default output would land."""
    paths = [*root.iterdir(), *(root / "docs" / "measured").iterdir()]
    return {str(p.relative_to(root)): p.stat().st_mtime_ns if p.is_file() else None
            for p in paths}


@pytest.mark.parametrize("smoke", [
    pytest.param(s, id=_case_id(s), marks=[pytest.mark.slow] if s.slow else [])
    for s in SMOKES])
def test_benchmark_script_smoke_run_prints_its_figures(smoke: Smoke) -> None:
    # a short TMPDIR of its own: the benchmark workers' forkserver puts its Unix socket there,
    # and a socket path over 107 bytes (a deep pytest folder) cannot be bound
    tmp = Path(tempfile.mkdtemp(prefix="smoke-"))
    try:
        _smoke_run(smoke, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smoke_run(smoke: Smoke, tmp: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp),
               TORCHINDUCTOR_CACHE_DIR=_inductor_cache())
    before = _written(ROOT)
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{smoke.script}.py"), *smoke.args],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=smoke.timeout_s)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    for pattern in smoke.patterns:
        assert re.search(pattern, done.stdout, re.MULTILINE), \
            f"no line matches {pattern!r} in:\n{done.stdout}"
    if smoke.check is not None:
        smoke.check(done.stdout)
    # temporary folders removed (torch.compile keeps precompiled headers in
    # <TMPDIR>/torchinductor_<user> whatever TORCHINDUCTOR_CACHE_DIR says: torch's cache)
    assert sorted(p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")) == []
    assert _written(ROOT) == before  # nothing written into the repository


def test_every_benchmark_script_has_a_smoke_run() -> None:
    """A new script in benchmarks/ fails here until it has a smoke run in SMOKES."""
    scripts = {p.stem for p in BENCHMARKS.glob("*.py")}
    assert scripts == {s.script for s in SMOKES}
