"""Half-precision arithmetic on rounded scalars: the graph walk that finds it (torch-free).

PyTorch's eager kernels apply a Python scalar to a bf16/fp16 tensor in fp32 and round only the result. A graph that
instead stores the scalar in bf16 (0.796875 for T5's sqrt(2/pi) = 0.7978846) computes something else than the module
it came from, on every runtime. ``rounded_scalars`` lists every scalar constant that reaches an arithmetic node
through a half-precision tensor while that precision cannot hold it:

- a constant stored in fp32 (or fp64) and cast to the half precision on its way, whose value the half precision
  does not hold exactly: the defect itself, seen with its true value;
- a constant stored in the half precision whose value is not evidently exact: more than 4 significant bits (0.5,
  1.0, 3.0, 0.125 pass; 0.796875 has 6), other than 0, +-inf and the precision's own extremes (masks use its min).
  A stored half value no longer shows what it was rounded from, so "evidently exact" is the test a reader can apply.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

HALVES = {ir.DataType.BFLOAT16: ml_dtypes.bfloat16, ir.DataType.FLOAT16: np.float16}
ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Clip", "Where", "Sum", "Mean", "PRelu"}
_PASS_THROUGH = {"Cast", "CastLike", "Reshape", "Identity", "Unsqueeze", "Squeeze", "Expand"}
SIGNIFICANT_BITS = 4


@dataclass(frozen=True)
class RoundedScalar:
    node: str  # the arithmetic node that reads it
    op_type: str
    value: float  # the scalar as the graph stores it (before any cast)
    stored_as: str  # the dtype it is stored in
    reaches_as: str  # the half dtype it is computed in

    def __str__(self) -> str:
        why = (f"stored as {self.stored_as}, not evidently exact: a scalar rounded to {self.reaches_as}"
               if self.stored_as == self.reaches_as else
               f"stored as {self.stored_as} and cast to {self.reaches_as}, which does not hold it exactly")
        return f"{self.op_type} node {self.node} computes in {self.reaches_as} with the scalar {self.value!r} ({why})"


def rounded_scalars(model: ir.Model) -> list[RoundedScalar]:
    """Every scalar constant that reaches half-precision arithmetic rounded (see the module's docstring)."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type not in ARITHMETIC or node.domain not in ("", "ai.onnx"):
            continue
        half = next((d for d in map(_dtype, node.inputs) if d in HALVES), None)
        if half is None:
            continue
        for value in node.inputs:
            for source in _constant_sources(value) if value is not None else ():
                if _rounded(source, half):
                    found.append(RoundedScalar(node.name or "?", node.op_type, float(source.numpy().reshape(-1)[0]),
                                               str(source.dtype), str(half)))
    return found


def _dtype(value: ir.Value | None) -> ir.DataType | None:
    """A value's element type: declared, or the target of the Cast that makes it (files without value_info)."""
    if value is None:
        return None
    if value.dtype is not None:
        return value.dtype
    node = value.producer()
    if node is not None and node.op_type == "Cast" and "to" in node.attributes:
        return ir.DataType(node.attributes["to"].as_int())
    return None


def _constant_sources(value: ir.Value, depth: int = 8) -> Iterator[ir.TensorProtocol]:
    """The single-valued constants ``value`` is computed from through casts and reshapes (an initializer or a
    Constant node's tensor)."""
    if value.const_value is not None:
        if value.const_value.size == 1 or _all_equal(value.const_value):
            yield value.const_value
        return
    node = value.producer()
    if node is None or depth == 0:
        return
    if node.op_type == "Constant" and "value" in node.attributes:
        tensor = node.attributes["value"].as_tensor()
        if tensor.size == 1 or _all_equal(tensor):
            yield tensor
    elif node.op_type in _PASS_THROUGH and node.inputs and node.inputs[0] is not None:
        yield from _constant_sources(node.inputs[0], depth - 1)


def _all_equal(tensor: ir.TensorProtocol) -> bool:
    if tensor.size > 64 or tensor.dtype not in (*HALVES, ir.DataType.FLOAT, ir.DataType.DOUBLE):
        return False
    values = tensor.numpy().reshape(-1)
    return bool(values.size) and bool((values == values[0]).all())


def _rounded(tensor: ir.TensorProtocol, half: ir.DataType) -> bool:
    if tensor.dtype not in (*HALVES, ir.DataType.FLOAT, ir.DataType.DOUBLE):
        return False
    value = float(np.asarray(tensor.numpy()).reshape(-1)[0].astype(np.float64))
    if tensor.dtype in HALVES:
        return not evidently_exact(value, tensor.dtype)
    return float(np.asarray(value).astype(HALVES[half]).astype(np.float64)) != value


def evidently_exact(value: float, dtype: ir.DataType) -> bool:
    """0, +-inf, the dtype's extremes, or a value with at most ``SIGNIFICANT_BITS`` significant bits."""
    if value == 0 or math.isinf(value) or math.isnan(value):
        return True
    if abs(value) == float(ml_dtypes.finfo(HALVES[dtype]).max):
        return True
    mantissa, _ = math.frexp(abs(value))
    return (mantissa * 2**SIGNIFICANT_BITS).is_integer()
