"""The parity checks of an exported graph against PyTorch, each with a name, a method and a tolerance key.

- **wiring**: the graph computed in fp32 against PyTorch computing in fp32 on exactly the same stored weights
  (quantized exports: the same dequantized weights). Every precision; always on ONNX Runtime's CPU provider, so
  it runs on any machine. Its noise is fp32 rounding, so a miswired slot stands far above it.
- **precision**: the graph as shipped in its own precision against PyTorch computing in that precision. On CUDA,
  ONNX Runtime's CUDA provider runs it as it is; on the CPU a bf16/fp16 graph is emulated (each node in fp32,
  rounded where the graph stores a half tensor: ``runners.OrtHalfEmulationRunner``). An fp32 graph's precision
  check is its wiring check, unless CUDA runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

HALF_PRECISIONS = ("bf16", "fp16")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


@dataclass(frozen=True)
class ParityCheck:
    kind: str  # "wiring" or "precision"
    precision: str  # the export's
    provider: str = CPU

    @property
    def tolerance_key(self) -> str:
        return "wiring" if self.kind == "wiring" else f"precision-{self.precision}"

    @property
    def fp32_reference(self) -> bool:
        """The reference is PyTorch computing in fp32 on the stored weights (``apply.computed_in_fp32``)."""
        return self.kind == "wiring" and self.precision in HALF_PRECISIONS

    @property
    def reference(self) -> str:
        if self.fp32_reference:
            return "pytorch-fp32-arithmetic"
        return "pytorch" if self.precision == "fp32" else f"pytorch-{self.precision}"

    @property
    def emulated(self) -> bool:
        return self.kind == "precision" and self.provider == CPU

    @property
    def method(self) -> str:
        from .runners import OrtFp32ArithmeticRunner, OrtHalfEmulationRunner

        if self.fp32_reference:
            return OrtFp32ArithmeticRunner.method(self.precision)
        if self.emulated:
            return OrtHalfEmulationRunner.method(self.precision)
        where = "CUDA (TF32 off)" if self.provider == CUDA else "CPU"
        return f"ONNX Runtime {where} in {self.precision} against PyTorch in {self.precision}"

    def runner(self, onnx_path: Path) -> Any:
        from .runners import OrtFp32ArithmeticRunner, OrtHalfEmulationRunner, OrtRunner

        if self.fp32_reference:
            return OrtFp32ArithmeticRunner(onnx_path, self.precision)
        if self.emulated:
            return OrtHalfEmulationRunner(onnx_path, self.precision)
        return OrtRunner(onnx_path, (self.provider,))

    def describe(self) -> dict[str, Any]:
        return {"check": self.kind, "method": self.method, "tolerance_key": self.tolerance_key}


def parity_checks(precision: str, cuda: bool) -> tuple[ParityCheck, ...]:
    """What this machine checks an export in ``precision`` with: the wiring check, and the precision check where
    it differs from it (half precision everywhere; fp32 where CUDA runs the graph)."""
    checks = [ParityCheck("wiring", precision)]
    if precision in HALF_PRECISIONS or cuda:
        checks.append(ParityCheck("precision", precision, CUDA if cuda else CPU))
    return tuple(checks)
