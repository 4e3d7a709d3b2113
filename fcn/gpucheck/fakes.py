"""Recording fakes of the `torch.cuda` calls the project makes, with torch's own argument
checks, and a device remap that keeps "cuda" tensors on the CPU: a machine without a GPU
executes the project's CUDA branches, and an API misuse (e.g. `set_per_process_memory_fraction`
with `torch.device("cuda")`, which has no index) fails there as it would on a GPU.

    with FakeCuda(devices=1) as cuda:
        ...  # code that takes its CUDA branches; tensors "on cuda:0" live on the CPU
    cuda.calls  # [(name, args, kwargs), ...] in order

What the fakes check is what torch checks before it reaches the driver: device arguments go
through `torch.cuda._utils._get_device_index` with the `optional` flag torch uses for that
function, device ordinals against the device count, value types and ranges
(`set_per_process_memory_fraction`, `set_sync_debug_mode`), RNG state tensors, CUDA events
(recorded, created with timing). Figures they return (memory peaks, event times, device
properties) are made up: a dry run reports them as such and judges nothing by them.

What cannot run this way: kernels (everything computes on the CPU in fp32 numerics: autocast
for "cuda" does not touch CPU tensors), NCCL, streams, and onnxruntime's CUDA provider.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from typing import Any

import torch
from torch.cuda._utils import _get_device_index
from torch.overrides import TorchFunctionMode

_STATE_BYTES = 16
"""A CUDA generator's state (seed and offset) is a 16-byte ByteTensor."""


def _cpu(value: Any) -> Any:
    """A device argument pointing at CUDA → the CPU; anything else unchanged."""
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and value.split(":")[0] == "cuda":
        return torch.device("cpu")
    return value


class DeviceRemap(TorchFunctionMode):
    """Every tensor created on or moved to a CUDA device lands on the CPU instead; pinning
    is a no-op (pinned host memory needs a driver)."""

    def __torch_function__(self, func: Callable, types_: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "pin_memory":
            return args[0]
        if name == "is_pinned":
            return False
        if name == "cuda":
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if name == "to":
            args = tuple(_cpu(a) for a in args)
        return func(*args, **kwargs)


class FakeEvent:
    """torch.cuda.Event: `record`, `synchronize`, `elapsed_time` (host clock, milliseconds),
    with torch's two checks on `elapsed_time`."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False) -> None:
        self.enable_timing = enable_timing
        self.time: float | None = None

    def record(self, stream: Any = None) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: FakeEvent) -> float:
        if not (self.enable_timing and end.enable_timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if self.time is None or end.time is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        return (end.time - self.time) * 1e3


class FakeStream:
    """A CUDA stream that never captures a graph and has nothing pending."""

    def is_capturing(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class FakeCuda:
    """Patches `torch.cuda` (and pushes `DeviceRemap`) while active; records every call."""

    NAMES = ("is_available", "device_count", "current_device", "set_device", "synchronize",
             "empty_cache", "reset_peak_memory_stats", "max_memory_allocated",
             "max_memory_reserved", "memory_allocated", "set_per_process_memory_fraction",
             "get_device_properties", "get_device_capability", "get_device_name",
             "is_bf16_supported", "get_rng_state", "set_rng_state", "get_rng_state_all",
             "set_rng_state_all", "get_sync_debug_mode", "set_sync_debug_mode", "mem_get_info",
             "Event", "current_stream")
    ACCELERATOR = ("current_stream", "current_device_index", "set_device_index")
    """torch.accelerator's, which the optimizers and the loader's pinning thread call when
    CUDA is available."""

    def __init__(self, devices: int = 1, memory_bytes: int = 80 * 2**30,
                 name: str = "Fake H100 (a CPU)", capability: tuple[int, int] = (9, 0)) -> None:
        self.devices, self.memory_bytes = devices, memory_bytes
        self.name, self.capability = name, capability
        self.calls: list[tuple[str, tuple, dict]] = []
        self.current = 0
        self.fraction = [1.0] * devices
        self.sync_mode = 0
        self.states = [torch.arange(_STATE_BYTES, dtype=torch.uint8) + i for i in range(devices)]
        self._saved: dict[str, Any] = {}
        self._remap: DeviceRemap | None = None

    # --- checks torch makes ------------------------------------------------------------
    def _index(self, device: Any, optional: bool) -> int:
        index = _get_device_index(device, optional=optional)
        if not 0 <= index < self.devices:
            raise RuntimeError(f"CUDA error: invalid device ordinal (device {index} of "
                               f"{self.devices})")
        return index

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))

    def called(self, name: str) -> list[tuple[tuple, dict]]:
        """The (args, kwargs) of every call of `name`, in order."""
        return [(a, k) for n, a, k in self.calls if n == name]

    # --- the fakes -----------------------------------------------------------------------
    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.devices

    def current_device(self) -> int:
        return self.current

    def set_device(self, device: Any) -> None:
        self._record("set_device", device)
        index = _get_device_index(device)
        if index >= 0:
            self.current = self._index(index, False)

    def synchronize(self, device: Any = None) -> None:
        self._record("synchronize", device)
        self._index(device, True)

    def empty_cache(self) -> None:
        self._record("empty_cache")

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self._record("reset_peak_memory_stats", device)
        self._index(device, True)

    def max_memory_allocated(self, device: Any = None) -> int:
        self._record("max_memory_allocated", device)
        self._index(device, True)
        return 0

    def max_memory_reserved(self, device: Any = None) -> int:
        self._record("max_memory_reserved", device)
        self._index(device, True)
        return 0

    def memory_allocated(self, device: Any = None) -> int:
        self._index(device, True)
        return 0

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        self._index(device, True)
        return self.memory_bytes, self.memory_bytes

    def set_per_process_memory_fraction(self, fraction: Any, device: Any = None) -> None:
        self._record("set_per_process_memory_fraction", fraction, device)
        if device is None:
            device = self.current
        index = self._index(_get_device_index(device), False)
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if fraction < 0 or fraction > 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        self.fraction[index] = fraction

    def get_device_properties(self, device: Any = None) -> Any:
        index = _get_device_index(device, optional=True)
        if index < 0 or index >= self.devices:
            raise AssertionError("Invalid device id")
        return types.SimpleNamespace(name=self.name, major=self.capability[0],
                                     minor=self.capability[1], total_memory=self.memory_bytes,
                                     multi_processor_count=132)

    def get_device_capability(self, device: Any = None) -> tuple[int, int]:
        props = self.get_device_properties(device)
        return props.major, props.minor

    def get_device_name(self, device: Any = None) -> str:
        return self.get_device_properties(device).name

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return self.capability >= (8, 0)

    def _generator_index(self, device: Any) -> int:
        if isinstance(device, str):
            device = torch.device(device)
        elif isinstance(device, int):
            device = torch.device("cuda", device)
        index = device.index if device.index is not None else self.current
        if index >= self.devices:  # torch.cuda.default_generators[index]
            raise IndexError("tuple index out of range")
        return index

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        self._record("get_rng_state", device)
        return self.states[self._generator_index(device)].clone()

    def set_rng_state(self, new_state: torch.Tensor, device: Any = "cuda") -> None:
        self._record("set_rng_state", new_state, device)
        new_state = new_state.clone(memory_format=torch.contiguous_format)
        index = self._generator_index(device)
        if new_state.dtype != torch.uint8:
            raise TypeError("expected a torch.ByteTensor, but got " + str(new_state.dtype))
        if new_state.numel() != _STATE_BYTES:
            raise RuntimeError("RNG state is wrong size")
        self.states[index] = new_state

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [self.get_rng_state(i) for i in range(self.devices)]

    def set_rng_state_all(self, new_states: Any) -> None:
        for i, state in enumerate(new_states):
            self.set_rng_state(state, i)

    def get_sync_debug_mode(self) -> int:
        return self.sync_mode

    def set_sync_debug_mode(self, debug_mode: int | str) -> None:
        self._record("set_sync_debug_mode", debug_mode)
        if isinstance(debug_mode, str):
            modes = {"default": 0, "warn": 1, "error": 2}
            if debug_mode not in modes:
                raise RuntimeError("invalid value of debug_mode, expected one of `default`, "
                                   "`warn`, `error`")
            debug_mode = modes[debug_mode]
        self.sync_mode = int(debug_mode)

    def Event(self, *args: Any, **kwargs: Any) -> FakeEvent:  # noqa: N802 - torch's name
        self._record("Event", *args, **kwargs)
        return FakeEvent(*args, **kwargs)

    def current_stream(self, device: Any = None) -> FakeStream:
        self._index(device, True)
        return FakeStream()

    def current_device_index(self) -> int:
        return self.current

    def set_device_index(self, device: Any) -> None:
        self.set_device(device)

    # --- activation ----------------------------------------------------------------------
    def __enter__(self) -> FakeCuda:
        for name in self.NAMES:
            self._saved[name] = getattr(torch.cuda, name)
            setattr(torch.cuda, name, getattr(self, name))
        # pinning needs a driver: a no-op here, in every thread (the loader pins in its own)
        self._saved["Tensor.pin_memory"] = torch.Tensor.pin_memory
        torch.Tensor.pin_memory = lambda tensor, *args, **kwargs: tensor
        accelerator = getattr(torch, "accelerator", None)
        for name in self.ACCELERATOR if accelerator is not None else ():
            if hasattr(accelerator, name):
                self._saved[f"accelerator.{name}"] = getattr(accelerator, name)
                setattr(accelerator, name, getattr(self, name))
        self._remap = DeviceRemap()
        self._remap.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._remap is not None
        self._remap.__exit__(*exc)
        for name, value in self._saved.items():
            if name == "Tensor.pin_memory":
                torch.Tensor.pin_memory = value
            elif name.startswith("accelerator."):
                setattr(torch.accelerator, name.removeprefix("accelerator."), value)
            else:
                setattr(torch.cuda, name, value)
        self._saved.clear()
