"""The CUDA policy (fcn.device, fcn.backends) and the CUDA branches of training, inference and
the benchmark, run on this CPU: under recording fakes of torch.cuda that apply torch's own
argument checks (fcn.gpucheck.fakes), and on the meta device, whose tensors cannot be read (so
any host synchronisation in a training step raises). Each finding of issue 19 has a test here
that fails on the code before its fix."""

from __future__ import annotations

import io
import re
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fcn import checkpoint as ckpt
from fcn.backends import flags, inference_mode, math_mode, tf32, tf32_enabled, training_mode
from fcn.device import (event_times, grad_scaler, memory_cap, peak_memory, reset_peak,
                        resolve_device, restore_scaler, set_rng_state, sync_debug,
                        to_model_input)
from fcn.gpucheck.fakes import FakeCuda
from fcn.metrics import ConfusionMatrix, confusion_matrix
from fcn.model import FCN8s
from fcn.params import TrainParams, parse_params, sections_dict
from fcn.predict.predictor import Predictor
from fcn.train import photometric
from fcn.train.distributed import Context
from fcn.train.fit import fit
from fcn.train.loop import TrainStep, build_criterion, build_optimizer, build_scheduler

from helpers.trainset import tiny_params

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")


# --- the fakes apply torch's checks ------------------------------------------------------------

def test_the_fakes_refuse_what_torch_refuses():
    with FakeCuda(devices=1):
        with pytest.raises(ValueError, match="specified index"):  # the gpu_check bug
            torch.cuda.set_per_process_memory_fraction(0.5, torch.device("cuda"))
        with pytest.raises(TypeError, match="must be `float`"):
            torch.cuda.set_per_process_memory_fraction(1, 0)
        with pytest.raises(ValueError, match="Allowed range"):
            torch.cuda.set_per_process_memory_fraction(1.5, 0)
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            torch.cuda.set_device(1)
        with pytest.raises(IndexError):  # a second GPU's generator, with one visible
            torch.cuda.set_rng_state(torch.zeros(16, dtype=torch.uint8), 1)
        with pytest.raises(RuntimeError, match="debug_mode"):
            torch.cuda.set_sync_debug_mode("loud")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with pytest.raises(RuntimeError, match="recorded"):
            start.elapsed_time(end)
        x = torch.ones(2, device=torch.device("cuda", 0))
        assert x.device.type == "cpu"  # remapped: the branch runs, the tensor lives here
    assert not torch.cuda.is_available() or torch.cuda.device_count() > 0  # restored


# --- finding: set_per_process_memory_fraction without a device index --------------------------

def test_memory_cap_passes_an_indexed_device_and_restores_the_fraction():
    with FakeCuda(devices=1, memory_bytes=8 * 2**30) as cuda:
        with memory_cap(torch.device("cuda"), 2 * 2**30) as fraction:
            assert fraction == 0.25 and cuda.fraction == [0.25]
        assert cuda.fraction == [1.0]
        calls = cuda.called("set_per_process_memory_fraction")
        assert [args for args, _ in calls] == [(0.25, torch.device("cuda", 0)),
                                               (1.0, torch.device("cuda", 0))]


def test_every_cuda_helper_accepts_a_device_without_an_index():
    cuda = torch.device("cuda")
    with FakeCuda() as fake:
        assert resolve_device("auto") == torch.device("cuda", 0)
        reset_peak(cuda)
        assert peak_memory(cuda) == {"allocated": 0, "reserved": 0}
        times, out = event_times(cuda, lambda: torch.ones(1, device=cuda), 3)
        assert len(times) == 3 and all(t >= 0 for t in times) and out is not None
        with sync_debug(cuda, "error"):
            assert torch.cuda.get_sync_debug_mode() == 2
        assert torch.cuda.get_sync_debug_mode() == 0
        assert [a for a, _ in fake.called("set_sync_debug_mode")] == [("error",), (0,)]


# --- finding: a scaler saved where fp16 scaling was off ----------------------------------------

def test_a_disabled_scalers_state_resumes_into_an_enabled_one():
    saved = grad_scaler(torch.device("cpu"), "fp16").state_dict()
    assert saved == {}
    with FakeCuda():
        scaler = grad_scaler(torch.device("cuda", 0), "fp16")
        assert scaler.is_enabled()
        with pytest.raises(RuntimeError, match="empty"):  # what fit() did before
            scaler.load_state_dict(saved)
        restore_scaler(scaler, saved)  # starts afresh
        assert scaler.get_scale() == 65536.0
        enabled = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                   "growth_interval": 2000, "_growth_tracker": 3}
        restore_scaler(scaler, enabled)
        assert scaler.get_scale() == 1024.0
    restore_scaler(grad_scaler(torch.device("cpu"), "fp16"), enabled)  # ignored: disabled


class _Killed(BaseException):
    """Stands in for a SIGKILL right after an epoch's checkpoint."""


def test_a_cpu_started_fp16_run_resumes_on_cuda(tiny_dataset, masks, tmp_path, monkeypatch):
    """fit() on the CPU in fp16 (no scaling there: the scaler's state is {}), stopped after
    epoch 1's checkpoint; then the same run with train.device cuda (the fakes; the device is
    not part of the training hash), which resumes it with an enabled scaler."""
    from fcn.train import fit as fit_module

    raw = tiny_params(tiny_dataset, masks, tmp_path / "models", epochs=2, precision="fp16")
    params = parse_params(raw)
    log_epoch = fit_module._log_epoch

    def killed_after_epoch_1(record, *args):
        log_epoch(record, *args)
        raise _Killed

    monkeypatch.setattr(fit_module, "_log_epoch", killed_after_epoch_1)
    with pytest.raises(_Killed):
        fit(params.model, params.train, params.data.root, params.data.generated, None,
            identity=sections_dict(params, "data", "synthesize"))
    monkeypatch.setattr(fit_module, "_log_epoch", log_epoch)
    raw["train"]["device"] = "cuda"
    params = parse_params(raw)
    with FakeCuda() as cuda:
        record = fit(params.model, params.train, params.data.root, params.data.generated,
                     None, identity=sections_dict(params, "data", "synthesize"))
        names = {n for n, _, _ in cuda.calls}
    assert record["epoch"] == 1 and "get_rng_state" in names
    resumed = ckpt.load(tmp_path / "models" / "last.pt")
    assert resumed["epoch"] == 2 and resumed["scaler"]["scale"] > 0  # scaled on "CUDA"
    assert resumed["rng"][0]["cuda"].dtype == torch.uint8  # this GPU's state, one tensor


# --- finding: RNG states of every visible GPU ---------------------------------------------------

def test_rng_state_saves_this_gpu_only_and_restores_where_fewer_are_visible():
    with FakeCuda(devices=2) as two:
        old_format = {"cuda": torch.cuda.get_rng_state_all()}  # what checkpoints held
        state = ckpt.rng_state(torch.device("cuda", 1))
        assert torch.equal(state["cuda"], two.states[1])
    with FakeCuda(devices=1) as one:
        with pytest.raises(IndexError):  # the old restore: set_rng_state_all
            torch.cuda.set_rng_state_all(old_format["cuda"])
        ckpt.set_rng_state(state, torch.device("cuda", 0))
        assert torch.equal(one.states[0], two.states[1])
        set_rng_state(old_format["cuda"], torch.device("cuda", 0))  # the older list format
        assert torch.equal(one.states[0], two.states[0])


# --- finding: fit() leaves determinism and cuDNN switches on ------------------------------------

def _switches() -> tuple:
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            torch.backends.mkldnn.deterministic, tf32_enabled())


def test_fit_restores_every_switch_it_sets(tiny_dataset, masks, tmp_path):
    before = _switches()
    params = parse_params(tiny_params(tiny_dataset, masks, tmp_path / "cpu", epochs=1))
    seen = {}
    forward = FCN8s.forward

    def spy(self, x):
        seen.setdefault("cpu", _switches())
        return forward(self, x)

    FCN8s.forward = spy
    try:
        fit(params.model, params.train, params.data.root, params.data.generated, None,
            identity=sections_dict(params, "data", "synthesize"))
        assert _switches() == before
        assert seen["cpu"][0] and seen["cpu"][2]  # deterministic inside, on a CPU
        raw = tiny_params(tiny_dataset, masks, tmp_path / "cuda", epochs=1, device="cuda")
        params = parse_params(raw)
        seen.clear()
        with FakeCuda():
            fit(params.model, params.train, params.data.root, params.data.generated, None,
                identity=sections_dict(params, "data", "synthesize"))
        assert seen["cpu"][:2] == (False, True)  # on CUDA: autotuned, not deterministic
        assert _switches() == before
    finally:
        FCN8s.forward = forward


def test_math_mode_restores_the_flags_exactly_as_they_were():
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    with tf32(True) as inside:
        assert inside == (True, True)
        with math_mode(torch.device("cuda", 0), "fp32"):
            assert tf32_enabled() == (False, False)
        assert tf32_enabled() == (True, True)
    assert (torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cudnn.conv.fp32_precision) == before


# --- the fp32 contract: strict on CUDA, TF32 only when asked for --------------------------------

class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 19, 1)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tf32_enabled())
        return self.conv(x)


@pytest.mark.parametrize("precision, expected", [("fp32", (False, False)),
                                                 ("tf32", (True, True)),
                                                 ("fp16", (False, False))])
def test_the_predictor_runs_fp32_strict_and_tf32_only_when_asked(precision, expected):
    before = tf32_enabled()
    model = _Recorder()
    images = np.zeros((1, 32, 64, 3), np.uint8)
    with FakeCuda() as cuda:
        Predictor(model, torch.device("cuda", 0), precision, channels_last=True)(images)
        assert cuda.called("empty_cache") == []  # no out-of-memory: nothing freed
    assert model.seen == [expected] and tf32_enabled() == before


def test_the_predictor_says_how_it_computes_on_cuda():
    with FakeCuda():
        flags_ = Predictor(_Recorder(), torch.device("cuda", 0), "fp16").flags()
    assert flags_ == {"device": "cuda", "precision": "fp16", "autocast": "float16",
                      "tf32_matmul": False, "tf32_cudnn": False,
                      "deterministic": torch.are_deterministic_algorithms_enabled(),
                      "cudnn_benchmark": True}


def test_flags_say_what_a_run_computes_with():
    with FakeCuda(), training_mode(torch.device("cuda", 0), "tf32"):
        assert flags(torch.device("cuda", 0), "tf32") == {
            "device": "cuda", "precision": "tf32", "autocast": "none", "tf32_matmul": True,
            "tf32_cudnn": True, "deterministic": False, "cudnn_benchmark": True}
    with inference_mode(torch.device("cpu"), "bf16"):
        assert flags(torch.device("cpu"), "bf16")["autocast"] == "none"  # a CPU runs fp32


# --- finding: host synchronisation in every training step ---------------------------------------

def _meta_step(precision: str = "bf16") -> TrainStep:
    model = FCN8s("vgg11_bn").to(META)
    params = TrainParams()
    optimizer = build_optimizer(model, params)
    return TrainStep(model, build_criterion(None, META), optimizer,
                     build_scheduler(optimizer, params, 10), grad_scaler(META, precision),
                     Context(0, 1, META), precision)


def _batch(jitter: bool = True) -> list[torch.Tensor]:
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    targets = torch.randint(0, 19, (2, 64, 64), dtype=torch.uint8)
    params = torch.tensor([[0, 1, 2, 3, 1.1, 0.9, 1.0, 0.01], [3, 2, 1, 0, 1.0, 1.0, 1.1, -0.02]])
    return [images, targets, params] if jitter else [images, targets]


def test_a_training_step_never_reads_the_device():
    """On the meta device any read (`.item()`, `bool()`, a boolean mask, `.tolist()`) raises:
    three steps with jitter pass, and only the interval check reads."""
    step = _meta_step()
    for _ in range(3):
        step(_batch())
    assert step.passes == 3 and step.optimizer_steps == 3
    with pytest.raises(RuntimeError, match="meta"):
        step.check(0)


def test_what_the_old_step_did_reads_the_device():
    """The meta device catches each of the old per-step reads, so the test above can fail."""
    loss = torch.ones((), device=META)
    with pytest.raises(RuntimeError):
        bool(torch.isfinite(loss))  # the old finiteness check
    target = torch.zeros(4, dtype=torch.int64, device=META)
    with pytest.raises(Exception):
        target[target != 255]  # the old confusion matrix's mask
    with pytest.raises(Exception):
        int(target.max())  # and its range check


def test_the_confusion_matrix_counts_without_reading_and_refuses_bad_values_when_read():
    meta = ConfusionMatrix(3, META)
    meta.update(torch.zeros(5, dtype=torch.int64, device=META),
                torch.zeros(5, dtype=torch.int64, device=META))
    target = torch.tensor([0, 1, 255, 2, 2, 1])
    predicted = torch.tensor([0, 2, 1, 2, 1, 1])
    expected = np.zeros((3, 3), np.int64)
    for t, p in zip(target.tolist(), predicted.tolist()):
        if t != 255:
            expected[t, p] += 1
    assert (confusion_matrix(target, predicted, 3).numpy() == expected).all()
    bad = ConfusionMatrix(3)
    bad.update(torch.tensor([0, 7]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="1 pixel"):
        bad.compute()


def test_jitter_moves_its_parameters_to_the_device_once_per_batch(monkeypatch):
    moved = []
    to = photometric._to

    def counting(tensor, device):
        moved.append(tuple(tensor.shape))
        return to(tensor, device)

    monkeypatch.setattr(photometric, "_to", counting)
    images = torch.rand(4, 3, 8, 8)
    params = torch.tensor([[0, 1, 2, 3, 1.1, 0.9, 1.0, 0.01], [3, 2, 1, 0, 1.0, 1.0, 1.1, -0.02],
                           [0, 1, 2, 3, 1.0, 1.2, 0.9, 0.0], [1, 0, 3, 2, 0.8, 1.0, 1.0, 0.03]])
    photometric.jitter(images.to(META), params)
    assert len(moved) == 2  # the parameters, and every group's rows in one index tensor


def test_ranks_agree_on_finiteness_only_at_checks(monkeypatch):
    from fcn.train import loop

    calls = []
    monkeypatch.setattr(loop, "any_rank", lambda flag, context: calls.append(flag) or flag)
    step = _meta_step()
    monkeypatch.setattr(step, "check", lambda epoch: calls.append("check"))
    for _ in range(4):
        step(_batch(jitter=False))
    assert calls == []


# --- contracts of the package and the code --------------------------------------------------

def test_torch_requirement_has_the_oom_error_the_predictor_catches():
    torch_req = re.search(r'"(torch>=[^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    low = tuple(int(v) for v in re.search(r">=(\d+)\.(\d+)", torch_req).groups())
    assert low >= (2, 5), torch_req  # torch.OutOfMemoryError is new in 2.5
    assert hasattr(torch, "OutOfMemoryError")


POLICY = {  # what only fcn/device.py and fcn/backends.py may do (patterns over tokens)
    "constructs a GradScaler": (r"GradScaler \(", {"fcn/device.py"}),
    "sets cudnn.benchmark": (r"cudnn \. benchmark =(?!=)", {"fcn/backends.py"}),
    "sets TF32 flags": (r"(fp32_precision|allow_tf32) =(?!=)", {"fcn/backends.py"}),
    "converts uint8 images to model inputs": (r"div_? \( 255|/ (np \. float32 \( )?255\b",
                                              {"fcn/device.py"}),
}


@pytest.mark.parametrize("what", sorted(POLICY))
def test_cuda_policy_has_one_owner(what):
    pattern, owners = POLICY[what]
    found = set()
    for folder in ("fcn", "stages", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if re.search(pattern, _code_only(path.read_text(encoding="utf-8"))):
                found.add(path.relative_to(ROOT).as_posix())
    assert found == owners, f"{what}: {sorted(found)}"


def _code_only(source: str) -> str:
    """The source without comments and string literals (docs may name what code may not do)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return " ".join(t.string for t in tokens
                    if t.type not in (tokenize.COMMENT, tokenize.STRING)
                    and not (sys.version_info >= (3, 12) and t.type in (
                        tokenize.FSTRING_START, tokenize.FSTRING_MIDDLE, tokenize.FSTRING_END)))


def test_to_model_input_is_the_old_conversions():
    images = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    expected = images.permute(0, 3, 1, 2).float() / 255
    assert torch.equal(to_model_input(images), expected)
    assert torch.equal(to_model_input(images.permute(0, 3, 1, 2).contiguous()), expected)
    channels_last = to_model_input(images, channels_last=True)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(channels_last, expected)


# --- CUDA branches of the process group and of onnxruntime in the benchmark -----------------

def test_a_cuda_process_group_sets_its_gpu_and_refuses_more_processes_than_gpus(monkeypatch):
    from fcn.errors import FcnError
    from fcn.train import distributed

    backends = []
    monkeypatch.setattr(distributed.dist, "init_process_group", backends.append)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "die_with_parent", lambda *args: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with FakeCuda(devices=2) as cuda:
        context = distributed.setup("auto")
        assert context.device == torch.device("cuda", 1) and backends == ["nccl"]
        assert [args for args, _ in cuda.called("set_device")] == [(torch.device("cuda", 1),)]
    with FakeCuda(devices=1):
        with pytest.raises(FcnError, match="train.nproc 2 exceeds the 1 CUDA device"):
            distributed.setup("cuda")


class _FakeBinding:
    def __init__(self) -> None:
        self.inputs: list[dict] = []
        self.outputs: list[tuple] = []

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        assert isinstance(name, str) and device_type in ("cuda", "cpu")
        assert type(device_id) is int and type(buffer_ptr) is int and buffer_ptr != 0
        assert isinstance(shape, tuple) and all(type(n) is int for n in shape)
        assert element_type is np.float32
        self.inputs.append({"name": name, "device": device_type, "id": device_id,
                            "shape": shape})

    def bind_output(self, name, device_type="cpu", device_id=0):
        assert type(device_id) is int
        self.outputs.append((name, device_type, device_id))

    def copy_outputs_to_cpu(self):
        return [np.zeros((1, 19, 4, 8), np.float32)]


class _FakeSession:
    def __init__(self, providers: list[str]) -> None:
        self.providers, self.binding, self.runs = providers, _FakeBinding(), 0

    def get_providers(self) -> list[str]:
        return self.providers

    def io_binding(self) -> _FakeBinding:
        return self.binding

    def run_with_iobinding(self, binding: _FakeBinding) -> None:
        self.runs += 1


def _ort_job():
    from fcn.benchmark.plan import Config, Protocol
    from fcn.benchmark.worker import Job
    from fcn.params import ModelParams

    protocol = Protocol("quick", "cuda", 4, 8, 1, 2, 0, True, 1, 64, (4, 8), (4, 8))
    return Job((Config("fp32", False, False, 1, runtime="onnxruntime"),), protocol,
               ModelParams(), "state.pt", "images.npy", "model.onnx")


def test_onnxruntime_on_cuda_is_timed_with_its_data_on_the_gpu_and_its_provider_checked(
        monkeypatch):
    from fcn import deploy
    from fcn.benchmark import worker

    sessions = []

    def session(path, threads=0, cuda=False):
        sessions.append(_FakeSession(["CUDAExecutionProvider", "CPUExecutionProvider"]))
        return sessions[-1]

    monkeypatch.setattr(deploy, "session", session)
    with FakeCuda():
        x = torch.rand(1, 3, 4, 8, device=torch.device("cuda", 0))
        call, classes, timer = worker._onnxruntime(_ort_job(), x)
        out = call()
        assert timer == "host clock" and classes(out).shape == (4, 8)
    binding = sessions[0].binding
    assert binding.inputs == [{"name": deploy.INPUT, "device": "cuda", "id": 0,
                               "shape": (1, 3, 4, 8)}]
    assert binding.outputs == [(deploy.OUTPUT, "cuda", 0)] and sessions[0].runs == 1

    monkeypatch.setattr(deploy, "session", lambda *a, **k: _FakeSession(["CPUExecutionProvider"]))
    with FakeCuda(), pytest.raises(RuntimeError, match="CPUExecutionProvider, not CUDA"):
        worker._onnxruntime(_ort_job(), torch.rand(1, 3, 4, 8,
                                                   device=torch.device("cuda", 0)))


@pytest.mark.parametrize("precision", ["bf16", "fp16", "tf32"])
def test_training_and_prediction_on_a_cpu_compute_in_fp32_whatever_the_precision(precision):
    """training.md: on a CPU, training, evaluate and export compute in fp32 whatever the
    precision (only the benchmark runs CPU autocast): the same weights, loss and logits."""
    cpu = torch.device("cpu")

    def train(precision: str) -> tuple[dict, float]:
        torch.manual_seed(0)
        model = FCN8s("vgg11_bn", fc_channels=16)
        params = TrainParams(optimizer="sgd", lr=0.01)
        optimizer = build_optimizer(model, params)
        step = TrainStep(model, build_criterion(None, cpu), optimizer,
                         build_scheduler(optimizer, params, 10), grad_scaler(cpu, precision),
                         Context(0, 1, cpu), precision)
        torch.manual_seed(1)
        for _ in range(2):
            step(_batch()[:2])
        return model.state_dict(), float(step.loss_sum)

    (reference, reference_loss), (weights, loss) = train("fp32"), train(precision)
    assert loss == reference_loss
    assert all(torch.equal(reference[k], weights[k]) for k in reference)
    torch.manual_seed(0)
    model = FCN8s("vgg11_bn", fc_channels=16).eval()
    images = torch.randint(0, 255, (1, 64, 64, 3), dtype=torch.uint8).numpy()
    assert np.array_equal(Predictor(model, cpu, "fp32")(images),
                          Predictor(model, cpu, precision)(images))
