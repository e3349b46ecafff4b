"""The CUDA measurement flow rehearsed on the CPU, where no GPU is (issue 27: out of the library, no mock.patch in
skrr_export).

Inside ``rehearsal_on_cpu()``: the device memory counter reads 0 (``CpuMemory``: every memory figure is 0 and means
nothing), PyTorch runs on the CPU (``backends.DEVICE``), ONNX Runtime's CPU provider stands in for its CUDA provider
(the ONNX Runtime backends' runner factories make ``runners.OrtRunner``, replaced here), and the commands see a CUDA
device (``skrr-export measure`` and the main job's measure stage run). Timings, FLOPs and parity
are real CPU numbers. A graph the CPU provider has no kernels for (bf16: DESIGN.md section 7) is refused with that
reason, which the measurement records as the backend's one reason. TensorRT engines are really built where
tensorrt-rtx is installed, and recorded as not executed (no CUDA device). Used by tests/test_measure*.py, by
benchmarks/rehearse_forms.py and by benchmarks/gpu_run.py ``--rehearse``.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

from skrr_export import backends, device_memory, measure, pipeline, runners
from skrr_export.errors import ArtifactError

# What the CPU provider lacks and its CUDA provider has: ONNX Runtime says NOT_IMPLEMENTED when it loads the graph.
MISSING_KERNEL = "NOT_IMPLEMENTED"


class CpuOrtRunner(runners.OrtRunner):
    """ONNX Runtime's CPU provider standing in for the CUDA one it is asked for."""

    def __init__(self, path: Path, providers: tuple[str, ...] = ("CPUExecutionProvider",), *args: Any, **kwargs: Any):
        super().__init__(path, ("CPUExecutionProvider",), *args, **kwargs)

    def activate_impl(self) -> None:
        try:
            super().activate_impl()
        except ArtifactError as exc:
            if MISSING_KERNEL not in str(exc):
                raise
            raise ArtifactError(f"skipped in the CPU rehearsal: ONNX Runtime's CPU provider has no kernel for this "
                                f"graph (bf16 has none; its CUDA provider has them): {exc}") from None


class CpuMemory(device_memory.DeviceMemory):
    """The counter on a machine without CUDA: every reading 0, the method says so."""

    def __init__(self) -> None:
        super().__init__()
        self.method = "CPU rehearsal: no device memory is read (every figure 0)"

    def warm(self, dtype: Any) -> None:
        pass

    def settle(self) -> int:
        return 0

    def used(self) -> int:
        return 0

    def allocated(self) -> int:
        return 0

    def reset_allocator_peak(self) -> None:
        pass

    def allocator_peak(self) -> int:
        return 0


def _cuda_stand_ins() -> dict[str, Any]:
    """What the results' head reads of the device (measure._environment)."""
    return {"get_device_name": lambda *a: "cpu (rehearsal)", "get_device_capability": lambda *a: (0, 0),
            "get_device_properties": lambda *a: types.SimpleNamespace(total_memory=1)}


def _blockers() -> dict[str, str | None]:
    """The backends as on a CUDA machine with onnxruntime-gpu: ONNX Runtime's CUDA ones run (on the CPU provider);
    engines keep their real reason (built, not executed)."""
    real = backends.backend_blockers()
    return real | {name: None for name in ("ort-cuda", "ort-cuda-stock", "ort-cuda-fused")}


@contextmanager
def rehearsal_on_cpu() -> Iterator[None]:
    import torch

    blockers = _blockers()
    with ExitStack() as stack:
        for name, value in _cuda_stand_ins().items():
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        stack.enter_context(mock.patch.object(backends, "DEVICE", "cpu"))
        stack.enter_context(mock.patch.object(measure, "DeviceMemory", CpuMemory))
        stack.enter_context(mock.patch.object(runners, "OrtRunner", CpuOrtRunner))
        for module in (backends, measure):
            stack.enter_context(mock.patch.object(module, "backend_blockers", lambda: dict(blockers)))
        stack.enter_context(mock.patch.object(measure, "require_cuda", lambda: None))
        stack.enter_context(mock.patch.object(pipeline, "cuda_available", lambda: True))
        yield
