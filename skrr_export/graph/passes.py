"""Every graph rewrite of the package, by name: each an onnx_ir pass (``onnx_ir.passes.PassBase``: called on a model,
it returns ``PassResult(model, modified)``), with one line on what it does. Callers construct a pass by its name
(``PASSES[name].cls(...)``, with the arguments its class takes) or run one that takes none (``run``)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from . import arithmetic


@dataclass(frozen=True)
class Registered:
    cls: type[ir.passes.PassBase]
    description: str


PASSES: dict[str, Registered] = {
    "dequantize-per-reader": Registered(arithmetic.DequantizePerReader, "each stored DequantizeLinear becomes one per "
                                        "reader, in fp32, waiting for that reader's activation"),
    "fp32-arithmetic": Registered(arithmetic.Fp32Arithmetic, "a half-precision graph computes in fp32 on its own "
                                  "weights, each widened just before the node that reads it"),
    "half-emulation": Registered(arithmetic.HalfEmulation, "fp32 arithmetic, each half-precision node output rounded "
                                 "back to its precision: a runtime with half kernels, emulated"),
}


def run(model: ir.Model, name: str) -> ir.passes.PassResult:
    """The registered pass ``name`` (one that takes no arguments) applied to ``model``."""
    return PASSES[name].cls()(model)
