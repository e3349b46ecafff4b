"""Weight-only quantized weights stored in an exported graph, as an onnx_ir pass (torch-free; ``quantize`` computes the
integers and scales with PyTorch and runs it).

``StoreQuantized`` replaces each quantized weight (``W -> Transpose -> MatMul`` per slot) by its integers and scales
feeding one DequantizeLinear (opset 21: block-wise, int4). Weights whose MatMuls read the same activations in every
slot (q, k, v; T5's gate and up projections) are stored joined along the output width, one MatMul per slot and a
Split: TensorRT-RTX 1.7 fails to build re-used sub-blocks whose parallel MatMuls each have their own
DequantizeLinear (benchmarks/README.md). The integers are ``<name>.quantized``, the scales ``<name>.scale``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from ..errors import InvariantError

OPSET = 21  # block-wise DequantizeLinear and the int4 type
QUANTIZED_SUFFIX, SCALE_SUFFIX = ".quantized", ".scale"


@dataclass(frozen=True)
class QuantizedArrays:
    """One weight's integers ``[in, out]`` (int8, or int4 packed two per uint8 byte, the even column in the low nibble:
    ``[in, out / 2]``) and its scales (``[out]`` for int8, ``[in / block, out]`` for int4) in their stored dtype."""

    bits: int
    values: np.ndarray
    scales: np.ndarray


class StoreQuantized(ir.passes.InPlacePass):
    """Each initializer named in ``weights`` stored as its integers and scales (see the module's docstring). Several
    names may share one ``QuantizedArrays`` (one parameter under several names): the graph must store each one once."""

    def __init__(self, weights: Mapping[str, QuantizedArrays]):
        super().__init__()
        self.weights = weights

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        readers = [_reader(name, value) for name, value in tuple(model.graph.initializers.items())
                   if name in self.weights]
        count = len({id(w) for w in self.weights.values()})
        if len(readers) != count:
            raise InvariantError(f"{count} weights were quantized but the graph stores {len(readers)} of them")
        groups: dict[tuple[Any, ...], list[_Reader]] = {}
        for r in readers:
            groups.setdefault((r.activations(), r.value.shape[1]), []).append(r)
        for group in groups.values():
            _join(model.graph, group, [self.weights[r.name] for r in group])
        model.opset_imports[""] = OPSET
        return ir.passes.PassResult(model, modified=bool(readers))


@dataclass
class _Reader:
    """A quantized weight in the exported graph: its initializer, the Transpose that reads it, the MatMuls after."""

    name: str
    value: Any
    transpose: Any
    matmuls: list[Any]

    def activations(self) -> tuple[str, ...]:
        return tuple(sorted(m.inputs[0].name for m in self.matmuls))


def _reader(name: str, value: Any) -> _Reader:
    uses = list(value.uses())
    transpose = uses[0][0] if len(uses) == 1 else None
    if transpose is None or transpose.op_type != "Transpose" or list(transpose.attributes["perm"].value) != [1, 0]:
        raise InvariantError(f"quantized weight {name} is read by {[u[0].op_type for u in uses]}, not one Transpose")
    matmuls = [node for node, index in transpose.outputs[0].uses()]
    if any(node.op_type != "MatMul" for node in matmuls) or any(i != 1 for _, i in transpose.outputs[0].uses()):
        raise InvariantError(f"quantized weight {name} reaches {[n.op_type for n in matmuls]}, not only MatMul weights")
    return _Reader(name, value, transpose, matmuls)


def _join(graph: Any, group: list[_Reader], weights: list[QuantizedArrays]) -> None:
    """One DequantizeLinear for the group's joined integers and scales; per slot one MatMul (and a Split). Named
    after the weights' checkpoint names joined by '+' (``graph.names``)."""
    name = "+".join(r.name for r in group)
    values = _joined_integers(weights, name + QUANTIZED_SUFFIX)
    scales = ir.Tensor(np.concatenate([w.scales for w in weights], axis=-1), name=name + SCALE_SUFFIX)
    inits = [ir.Value(name=t.name, const_value=t, shape=t.shape, type=ir.TensorType(t.dtype)) for t in (values, scales)]
    for v in inits:
        graph.register_initializer(v)
    block = {"block_size": values.shape[0] // scales.shape[0]} if len(scales.shape) == 2 else {}
    dq = ir.node("DequantizeLinear", inits, attributes={"axis": 0 if block else 1, **block}, name=name + ".dequantize")
    graph.insert_before(graph[0], dq)  # it reads initializers only
    dtype = group[0].value.dtype
    if dtype != scales.dtype:  # fp16 scales next to bf16 weights: dequantized to fp16, then cast (``dequantize``)
        cast = ir.node("Cast", [dq.outputs[0]], attributes={"to": dtype}, name=name + ".cast")
        cast.outputs[0].name, cast.outputs[0].dtype = name + ".dequantized", dtype
        graph.insert_after(dq, cast)
        dq = cast
    widths = [int(w.scales.shape[-1]) for w in weights]  # output widths
    for slot, matmuls in enumerate(zip(*(sorted(r.matmuls, key=lambda m: m.inputs[0].name) for r in group))):
        _one_matmul(graph, dq, list(matmuls), widths, f"{name}.{slot}")
    for r in group:
        graph.remove([*r.matmuls, r.transpose], safe=True)
        graph.initializers.pop(r.name)


def _one_matmul(graph: Any, dq: Any, matmuls: list[Any], widths: list[int], name: str) -> None:
    """One MatMul of a slot's activation with the joined weight, placed right after the activation is made."""
    activation = matmuls[0].inputs[0]
    joined = ir.node("MatMul", [activation, dq.outputs[0]], name=name + ".matmul")
    joined.outputs[0].name = name + ".matmul"
    new = [joined]
    outputs = joined.outputs
    if len(matmuls) > 1:
        sizes = ir.Value(name=name + ".widths", const_value=ir.tensor(np.array(widths, np.int64), name=name + ".widths"))
        graph.register_initializer(sizes)
        split = ir.node("Split", [joined.outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(matmuls),
                        name=name + ".split")
        new.append(split)
        outputs = split.outputs
        for i, out in enumerate(outputs):
            out.name = f"{name}.split.{i}"
    graph.insert_after(activation.producer() or dq, new)
    for old, out in zip(matmuls, outputs):
        out.dtype = old.outputs[0].dtype
        old.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)


def _joined_integers(weights: list[QuantizedArrays], name: str) -> Any:
    """The group's integers joined along the output width, made only when something reads them (``ir.LazyTensor``:
    the streamed save writes it and lets it go), so the joined copy never sits beside every weight's own integers.
    Measured (T5-v1.1-XXL PixArt 41.9 % int4, 1.66 GB): joining eagerly took the export from 2.08 to 3.38 GiB."""
    bits = weights[0].bits
    if len(weights) == 1:
        return _int_tensor(weights[0].values, bits, name)  # the array itself, no copy
    rows, columns = weights[0].values.shape[0], sum(int(w.values.shape[1]) for w in weights)
    dtype, shape = (ir.DataType.INT8, [rows, columns]) if bits == 8 else (ir.DataType.INT4, [rows, 2 * columns])
    return ir.LazyTensor(lambda: _int_tensor(np.concatenate([w.values for w in weights], axis=1), bits, name),
                         dtype, ir.Shape(shape), name=name)


def _int_tensor(values: np.ndarray, bits: int, name: str) -> Any:
    if bits == 8:
        return ir.Tensor(values, name=name)
    return ir.PackedTensor(values, ir.DataType.INT4, shape=[values.shape[0], 2 * values.shape[1]], name=name)
