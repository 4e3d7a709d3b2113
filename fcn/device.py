"""Which device runs, at which precision, and every call the library makes into `torch.cuda`:
the one place that turns the `device` and `precision` parameters into a torch device, a dtype,
an autocast context and a gradient scaler, and converts uint8 images into model inputs.

Precisions (the same names in training, inference and the benchmark):
- `fp32`: strict IEEE fp32 everywhere, on CUDA too (TF32 off for matmuls and cuDNN
  convolutions: `fcn.backends.math_mode`). It is the reference the others are compared with.
- `tf32`: fp32 storage, TF32 tensor-core math for matmuls and convolutions (CUDA, sm80+).
- `bf16`, `fp16`: autocast to that dtype on CUDA (fp16 training with a gradient scaler).
On a CPU, training and inference compute in fp32 whatever the parameter says (reproducible,
and CPUs without native bf16/fp16 kernels run them tens of times slower); the benchmark times
CPU autocast where the CPU has the kernels (`cuda_only=False`).

Every `torch.cuda` function the library calls is called here, with a device that has an index
(`indexed`): several of them (`set_per_process_memory_fraction`, `set_device`) refuse
`torch.device("cuda")` without one. Tests run these CUDA branches on a CPU with recording
fakes that apply torch's own argument checks (`fcn.gpucheck.fakes`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from fcn.errors import FcnError
from fcn.params import BENCHMARK_PRECISIONS, PRECISIONS

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "tf32": torch.float32,
                                  "bf16": torch.bfloat16, "fp16": torch.float16}
"""Storage/compute dtype per precision name."""
assert tuple(DTYPES) == BENCHMARK_PRECISIONS == PRECISIONS  # one list of names (fcn.params)

LOW_PRECISIONS = ("bf16", "fp16")
"""The precisions that run under autocast."""


# --- devices ---------------------------------------------------------------------------------

def indexed(device: torch.device | str) -> torch.device:
    """`device` with its index: `cuda` becomes `cuda:<current device>` (what torch.cuda's
    functions that take no default need); other devices are returned as they are."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_device(choice: str, local_rank: int = 0, setting: str = "device") -> torch.device:
    """'auto' → CUDA when present (this rank's GPU, with its index), else CPU; 'cuda' without
    a GPU is an input error naming the parameter `setting` (e.g. 'train.device')."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise FcnError(f"{setting} is 'cuda' but CUDA is not available on this machine "
                       f"(set {setting} to 'auto' or 'cpu')")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def set_current(device: torch.device) -> None:
    """Make `device` the current CUDA device of this process (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.set_device(indexed(device))


def cuda_count() -> int:
    """Visible CUDA devices (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_name(device: torch.device) -> str | None:
    """The GPU's name, or None off CUDA."""
    return torch.cuda.get_device_name(indexed(device)) if device.type == "cuda" else None


def capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability (major, minor), or None off CUDA."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(indexed(device))
    return int(major), int(minor)


def properties(device: torch.device) -> dict[str, Any] | None:
    """Name, compute capability and memory of a CUDA device (None off CUDA)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(indexed(device))
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_bytes": int(props.total_memory),
            "multiprocessors": int(props.multi_processor_count)}


def native_bf16(device: torch.device) -> bool:
    """Whether a CUDA device has native bf16 (not emulated); False off CUDA."""
    return device.type == "cuda" and bool(torch.cuda.is_bf16_supported(including_emulation=False))


# --- precision -------------------------------------------------------------------------------

def autocast_dtype(device: torch.device, precision: str, cuda_only: bool = True
                   ) -> torch.dtype | None:
    """The dtype autocast runs `precision` at on `device`, or None for plain fp32/tf32.

    cuda_only (training, inference): a CPU always computes in fp32.
    """
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {list(DTYPES)}, got {precision!r}")
    if precision not in LOW_PRECISIONS or (cuda_only and device.type != "cuda"):
        return None
    return DTYPES[precision]


def autocast(device: torch.device, precision: str, cuda_only: bool = True
             ) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` on `device` (a no-op for fp32/tf32)."""
    dtype = autocast_dtype(device, precision, cuda_only)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def uses_tf32(device: torch.device, precision: str) -> bool:
    """Whether `precision` computes fp32 matmuls and convolutions in TF32 on `device`."""
    return device.type == "cuda" and precision == "tf32"


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The gradient scaler for training at `precision` on `device`: enabled for fp16 on CUDA
    (fp16 gradients underflow without it), a pass-through otherwise. The only place the
    project constructs one."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")


def restore_scaler(scaler: torch.amp.GradScaler, state: Mapping[str, Any]) -> None:
    """Load a checkpoint's scaler state into `scaler`, whichever device saved it.

    A disabled scaler (CPU, or a precision other than fp16) saves `{}`, which torch refuses to
    load into an enabled one: a run started on a CPU and resumed on CUDA in fp16 then starts
    its scale afresh (logged). An enabled scaler's state loaded into a disabled one is ignored.
    """
    if not scaler.is_enabled():
        return
    if not state:
        log.info("the checkpoint has no gradient-scaler state (saved where fp16 scaling was "
                 "off): the fp16 loss scale starts afresh at %g", scaler.get_scale())
        return
    scaler.load_state_dict(dict(state))


# --- inputs ----------------------------------------------------------------------------------

def to_model_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images → float32 (N, 3, H, W) in [0, 1], what `FCN8s` takes, on the images' own
    device: the one conversion of the project (training batches, inference, the benchmark,
    the ONNX check). `images` is (N, H, W, 3) (decoded files) or (N, 3, H, W) (the training
    loader's crops); floats pass through unchanged apart from the layout."""
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (4 dimensions), got shape "
                         f"{tuple(images.shape)}")
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    x = images.float().div_(255) if images.dtype == torch.uint8 else images
    return x.contiguous(memory_format=torch.channels_last if channels_last
                        else torch.contiguous_format)


# --- time and memory -------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU): call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(indexed(device))


def event_times(device: torch.device, call: Callable[[], Any], iters: int
                ) -> tuple[list[float], Any]:
    """Seconds of each of `iters` calls of `call` on a CUDA device, timed by CUDA events on
    the current stream: the host queues every call without waiting and reads the events once
    at the end. Also returns the last call's result (the others are freed as they end)."""
    if device.type != "cuda":
        raise ValueError(f"event timing needs a CUDA device, got {device}")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    out = None
    for i, (begin, end) in enumerate(events):
        begin.record()
        out = call()
        end.record()
        if i < iters - 1:
            out = None  # one output alive at a time: the peak is that of one call
    synchronize(device)
    return [begin.elapsed_time(end) / 1e3 for begin, end in events], out


def empty_cache(device: torch.device) -> None:
    """Give the caching allocator's unused blocks back (CUDA; a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory measurement (CUDA; a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(indexed(device))


def peak_memory(device: torch.device) -> dict[str, int] | None:
    """{'allocated', 'reserved'}: the caching allocator's peaks in bytes since `reset_peak`;
    None off CUDA (a CPU process's peak is `fcn.benchmark.worker.PeakRss`)."""
    if device.type != "cuda":
        return None
    index = indexed(device)
    return {"allocated": int(torch.cuda.max_memory_allocated(index)),
            "reserved": int(torch.cuda.max_memory_reserved(index))}


@contextlib.contextmanager
def memory_cap(device: torch.device, limit_bytes: float) -> Iterator[float]:
    """Cap the caching allocator of a CUDA `device` at `limit_bytes` (a fraction of its
    memory) while the block runs, so that more raises torch.OutOfMemoryError; the fraction
    is yielded and reset to 1 afterwards."""
    if device.type != "cuda":
        raise ValueError(f"memory_cap needs a CUDA device, got {device}")
    index = indexed(device)
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = float(min(1.0, max(0.0, limit_bytes / total)))
    empty_cache(index)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    try:
        yield fraction
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        empty_cache(index)


@contextlib.contextmanager
def sync_debug(device: torch.device, mode: str = "error") -> Iterator[None]:
    """Make every synchronising CUDA call raise ('error') or warn ('warn') while the block
    runs (`torch.cuda.set_sync_debug_mode`), then restore the previous mode; a no-op off CUDA.
    Used to prove that the training step never waits for the GPU."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# --- random state ----------------------------------------------------------------------------

def rng_state(device: torch.device) -> torch.Tensor | None:
    """The CUDA generator state of `device` (this process's GPU only, so a checkpoint resumes
    wherever fewer GPUs are visible); None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_rng_state(indexed(device))


def set_rng_state(state: torch.Tensor | list[torch.Tensor] | None, device: torch.device) -> None:
    """Restore `device`'s CUDA generator from `rng_state` (a no-op off CUDA or without one).
    A list (the every-GPU format of older checkpoints) restores its first entry: the state of
    the GPU the saving process ran on when it was alone."""
    if device.type != "cuda" or state is None:
        return
    if isinstance(state, (list, tuple)):
        if not state:
            return
        state = state[0]
    torch.cuda.set_rng_state(state, indexed(device))
