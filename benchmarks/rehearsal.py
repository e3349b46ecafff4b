"""The CUDA measurement flow rehearsed on the CPU, where no GPU is (issue 27: out of the library, no mock.patch in
skrr_export).

Inside ``rehearsal_on_cpu()``: CUDA's memory counters and synchronization are no-ops (every memory figure reads 0 and
means nothing), PyTorch runs on the CPU, ONNX Runtime's CPU provider stands in for its CUDA provider, and the
commands see a CUDA device (``skrr-export measure`` and the main job's measure stage run). Timings, FLOPs and parity
are real CPU numbers. A graph the CPU provider has no kernels for (bf16: DESIGN.md section 7) is refused with that
reason, which the measurement records as the backend's one reason. TensorRT engines are really built where
tensorrt-rtx is installed, and recorded as not executed (no CUDA device). Used by tests/test_measure*.py and by
benchmarks/gpu_part1.py and gpu_part2.py ``--rehearse``.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

from skrr_export import backends, measure, pipeline, runners
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


def _cuda_stand_ins() -> dict[str, Any]:
    stand_ins: dict[str, Any] = {name: (lambda *a, **k: None) for name in ("synchronize", "empty_cache",
                                                                            "reset_peak_memory_stats")}
    return stand_ins | {"memory_allocated": lambda *a, **k: 0, "max_memory_allocated": lambda *a, **k: 0,
                        "mem_get_info": lambda *a: (1, 1), "get_device_name": lambda *a: "cpu (rehearsal)",
                        "get_device_capability": lambda *a: (0, 0),
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
        stack.enter_context(mock.patch.object(measure, "DEVICE", "cpu"))
        stack.enter_context(mock.patch.object(runners, "OrtRunner", CpuOrtRunner))
        for module in (backends, measure):
            stack.enter_context(mock.patch.object(module, "backend_blockers", lambda: dict(blockers)))
        stack.enter_context(mock.patch.object(measure, "require_cuda", lambda: None))
        stack.enter_context(mock.patch.object(pipeline, "cuda_available", lambda: True))
        yield
