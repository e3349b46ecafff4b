"""measure's one memory method (issue 27 item 2) and its split along its jobs (item 4), without a device: the counter
reads NVML's figure for this process where NVML lists it and the driver's total - free otherwise, once and for all;
a Meter reads every backend by it above one baseline, with PyTorch's allocator beside it for PyTorch backends only;
TF32 comes back as it was; the library chooses backends from the registry and patches nothing."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from skrr_export import device_memory
from skrr_export.backends import ENGINE, MEASURE_BACKENDS, MODULE, ONNX

PACKAGE = Path(__file__).resolve().parents[1] / "skrr_export"


class FakeCuda:
    """torch.cuda's counters as a test drives them: ``free`` bytes of ``total``, ``allocated`` by the allocator."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.total, self.free, self.allocated, self.peak = 1000, 1000, 0, 0
        for name, value in {"synchronize": lambda: None, "empty_cache": lambda: None,
                            "mem_get_info": lambda: (self.free, self.total),
                            "memory_allocated": lambda: self.allocated, "max_memory_allocated": lambda: self.peak,
                            "reset_peak_memory_stats": lambda: None}.items():
            monkeypatch.setattr(torch.cuda, name, value)


def fake_nvml(monkeypatch: pytest.MonkeyPatch, processes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """A pynvml listing ``processes`` (pid, bytes) on device 0; the list can change between readings."""
    module = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda index: f"device {index}",
        nvmlDeviceGetComputeRunningProcesses=lambda handle: [types.SimpleNamespace(pid=p, usedGpuMemory=b)
                                                             for p, b in processes])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return processes


def test_the_counter_is_nvmls_figure_for_this_process_else_the_drivers(monkeypatch):
    import os

    cuda = FakeCuda(monkeypatch)
    cuda.free = 600  # the driver says 400 used: other processes' memory too
    listed = fake_nvml(monkeypatch, [(os.getpid() + 1, 999), (os.getpid(), 250)])
    probe = device_memory.DeviceMemory()
    assert (probe.method, probe.used()) == (device_memory.NVML, 250)
    listed[:] = [(os.getpid() + 1, 999)]  # NVML stops listing this process (another PID namespace): the driver's
    assert (probe.used(), probe.method) == (400, device_memory.DRIVER)
    listed[:] = [(os.getpid(), 250)]
    assert probe.used() == 400, "one method from the first fallback on: readings never mix two counters"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert device_memory.DeviceMemory().method == device_memory.DRIVER


def test_a_meter_reads_every_backend_by_one_counter_above_one_baseline(monkeypatch):
    from skrr_export.measure import Meter

    cuda = FakeCuda(monkeypatch)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    probe = device_memory.DeviceMemory()
    cuda.free, cuda.allocated = 900, 30  # 100 used before: the baseline
    for allocator in (True, False):
        meter, run = Meter(probe, allocator), {}
        cuda.free, cuda.allocated = 700, 180  # the model on the device: 200 by the counter, 150 by the allocator
        assert meter.resident(run) == 200
        assert run == {"resident_bytes": 200, "allocator_resident_bytes": 150 if allocator else None}

        class Bound:
            def run(self) -> None:
                cuda.free, cuda.peak = 650, 230

        assert meter.peak(Bound()) == {"peak_bytes": 250, "allocator_peak_bytes": 200 if allocator else None}
        cuda.free, cuda.allocated = 900, 30


def test_tf32_is_restored_after_measuring():
    from skrr_export.measure import exact_matmuls

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with exact_matmuls():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_backends_are_a_registry_and_the_library_patches_nothing():
    """Each backend says what it runs and makes its runner; measure.py never compares a backend's name, and no
    module of the package patches another (the CPU rehearsal lives in benchmarks/)."""
    assert {b.runs for b in MEASURE_BACKENDS.values()} == {MODULE, ONNX, ENGINE}
    assert [n for n, b in MEASURE_BACKENDS.items() if b.fused] == ["ort-cuda-fused"]
    assert [n for n, b in MEASURE_BACKENDS.items() if b.dense_only] == ["hf"]
    measure = (PACKAGE / "measure.py").read_text()
    names = "|".join(re.escape(n) for n in MEASURE_BACKENDS)
    compared = re.findall(rf"""(?:==|!=|\bin\b|startswith\()\s*\(?\s*["']({names})["']""", measure)
    assert compared == [], compared
    for path in PACKAGE.rglob("*.py"):
        assert "mock" not in path.read_text(), path.name
