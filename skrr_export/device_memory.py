"""device_memory: the one counter measure reads every backend's device memory with, and PyTorch's allocator beside it.

The counter is the device memory this process holds: NVML's per-process figure (``nvidia-ml-py``, module ``pynvml``)
where NVML lists this process, else the driver's used memory (total - free), which is this process's only when
nothing else is resident on the device. Both include what every runtime allocates outside PyTorch's allocator (ONNX
Runtime's arena and initializers, TensorRT's engine and context, cuBLAS workspaces) and what PyTorch's caching
allocator holds reserved; a measurement reads it above a clean baseline (``settle`` after ``warm``: the CUDA context
and the matrix libraries' one-time allocations are in the baseline, so the variant measured first does not absorb
them). PyTorch's allocator (bytes allocated, and its high-water mark) is the second figure, for PyTorch backends only.
"""

from __future__ import annotations

import gc
import os
from typing import Any

NVML = "nvml: this process's device memory"
DRIVER = "driver: device total - free (this process's only with nothing else resident)"
INCLUDES = ("everything the process holds on the device above the baseline: weights, the runtime's arena or reserved "
            "cache, workspaces, engine and context memory")
ALLOCATOR = "PyTorch's allocator: bytes allocated (resident) and its high-water mark during the forward (peak)"


class DeviceMemory:
    """``used()``: the process's device bytes by one method for every backend (``method``); ``allocated()`` and
    ``allocator_peak()``: PyTorch's allocator."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self._nvml = _nvml_reader()
        self.method = NVML if self._nvml is not None else DRIVER

    def warm(self, dtype: Any) -> None:
        """The one-time allocations every backend's first forward makes (the CUDA context, cuBLAS's handle and
        workspace for ``dtype``), made before the baseline so that no variant absorbs them."""
        torch = self.torch
        x = torch.ones(64, 64, dtype=dtype, device="cuda")
        (x @ x).sum().item()
        del x

    def settle(self) -> int:
        """Free what can be freed (PyTorch's cached blocks), then return the used bytes: a measurement's baseline."""
        gc.collect()
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()
        return self.used()

    def used(self) -> int:
        self.torch.cuda.synchronize()
        if self._nvml is not None:
            found = self._nvml()
            if found is not None:
                return found
            self._nvml, self.method = None, DRIVER  # NVML does not list this process: one method from here on
        free, total = self.torch.cuda.mem_get_info()
        return int(total - free)

    def allocated(self) -> int:
        return int(self.torch.cuda.memory_allocated())

    def reset_allocator_peak(self) -> None:
        self.torch.cuda.reset_peak_memory_stats()

    def allocator_peak(self) -> int:
        return int(self.torch.cuda.max_memory_allocated())

    def describe(self) -> dict[str, str]:
        """What the report states: the counter, what it includes, and the allocator column."""
        return {"method": self.method, "includes": INCLUDES, "allocator": ALLOCATOR,
                "baseline": "after the CUDA context and the matrix libraries' first call, per variant; PyTorch's cache "
                            "emptied before each reading"}


def _nvml_reader() -> Any:
    """A function returning this process's device bytes on the first visible device by NVML (None where NVML does not
    list this process, e.g. in another PID namespace), or None when NVML is not installed or has no device."""
    try:
        import pynvml  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(_first_visible_device())
    except Exception:  # noqa: BLE001 - pynvml raises NVMLError subclasses per cause; any of them: no NVML here
        return None
    pid = os.getpid()

    def read() -> int | None:
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return None

    return read


def _first_visible_device() -> int:
    """NVML's index of CUDA device 0: the first entry of CUDA_VISIBLE_DEVICES when it is a plain index."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0
