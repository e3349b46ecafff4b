"""The parity check's rewrites of a half-precision (or quantized) graph, as onnx_ir passes (torch-free).

``Fp32Arithmetic``: the graph computes in fp32 wherever it computed in bf16 or fp16, on its own stored weights (each
widened just before the node that reads it); ``HalfEmulation``: the same, then every node output the graph holds in
half precision rounded back to it; ``DequantizePerReader``: each stored DequantizeLinear (``quantize.py``'s layout)
becomes one per reader. None of them reads a weight's values: a model whose weights are references to a file's bytes
(``graph.read.model_referencing_weights``) is rewritten without loading them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from .fusion import MS_DOMAIN
HALVES = (ir.DataType.BFLOAT16, ir.DataType.FLOAT16)
FLOAT = ir.DataType.FLOAT
_ROUND = "::round"  # a Cast that rounds a dequantized weight as the graph does: its target stays half


class Fp32Arithmetic(ir.passes.InPlacePass):
    """The model computes in fp32 wherever it computed in bf16 or fp16 (weights untouched).

    Each node that reads a half-precision weight, directly or through a Transpose, gets its own chain
    ``Cast(Reshape(W, shape that depends on the node's activation input))`` (+ the Transpose): the Reshape's shape
    waits for the activation, so ONNX Runtime cannot widen every weight at the start of the run (it schedules
    input-free nodes first: a dense T5-v1.1-XXL then held 22 GB for 9.5 GB of bf16 weights), and no fp32 copy
    outlives the node that reads it. Reshape to the weight's own shape changes nothing but the order. A MatMul
    reading a transposed weight becomes ONNX Runtime's FusedMatMul(transB=1): no transposed fp32 copy either.
    Stored DequantizeLinear weights are first made one per reader (``DequantizePerReader``)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        DequantizePerReader()(model)
        graph = model.graph
        widening = _Widening(graph)
        for index, node in enumerate(tuple(graph)):
            if node.outputs[0] in widening.transposed:
                continue  # each reader gets its own Transpose
            graph.insert_before(node, widening.inputs(node, index))
            if not (node.name or "").endswith(_ROUND):
                _widen_attributes(node)
        graph.remove(list(widening.transposed.values()), safe=True)
        for value in _typed_values(graph):
            if value.dtype in HALVES and not value.is_initializer():
                value.type = ir.TensorType(FLOAT)
        model.opset_imports.setdefault(MS_DOMAIN, 1)  # FusedMatMul
        return ir.passes.PassResult(model, modified=True)


class HalfEmulation(ir.passes.InPlacePass):
    """``Fp32Arithmetic``, then every node output the original graph holds in bf16 or fp16 (by ONNX shape inference)
    rounded back to that precision (Cast down, Cast up) before anything reads it: each node computed in fp32 and
    rounded where the graph stores a half tensor, as a runtime with half kernels computes it."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        halves = _half_values(model)
        Fp32Arithmetic()(model)
        graph = model.graph
        for node in tuple(graph):
            rounding = []
            for value in node.outputs:
                if value.name in halves:
                    rounding += _rounded(graph, value, halves[value.name])
            if rounding:
                graph.insert_after(node, rounding)
        return ir.passes.PassResult(model, modified=True)


class DequantizePerReader(ir.passes.InPlacePass):
    """Each DequantizeLinear of a stored weight (quantize.py) becomes one per reader, computed in fp32 and waiting for
    that reader's activation (its scales pass a Reshape to their own shape, as ``Fp32Arithmetic`` does for half
    weights; the CPU provider has no Reshape for int4): ONNX Runtime schedules input-free nodes first and would
    dequantize every weight at the start of the run and hold them all (measured: T5-v1.1-XXL PixArt 41.9 % int4,
    7.8 GB resident during parity, 6 GB of it dequantized weights). fp16 scales next to bf16 weights are dequantized
    to fp16, then cast to bf16 (quantize.py): each reader's copy is rounded as the graph rounds it (``::round`` Casts
    keep their target), then widened."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        stored = graph.initializers
        dequantized = {n.outputs[0]: n for n in graph if n.op_type == "DequantizeLinear"
                       and all(v is not None and v.name in stored for v in n.inputs)}
        if not dequantized:
            return ir.passes.PassResult(model, modified=False)
        casts = {n.outputs[0]: n for n in graph if n.op_type == "Cast" and n.inputs[0] in dequantized}
        rounding = {v: [dq.inputs[1].dtype] for v, dq in dequantized.items()}
        rounding |= {v: [*rounding[cast.inputs[0]], ir.DataType(cast.attributes["to"].as_int())]
                     for v, cast in casts.items()}
        dequantized |= {v: dequantized[cast.inputs[0]] for v, cast in casts.items()}
        zero = _initializer(graph, "fp32_arithmetic::dq_zero", np.array(0, dtype=np.int64))
        scales = {dq.inputs[1] for dq in dequantized.values()}
        shapes = {s: _initializer(graph, f"{s.name}::scale_shape", np.array(s.shape.numpy(), dtype=np.int64))
                  for s in sorted(scales, key=lambda s: s.name)}
        for index, node in enumerate(tuple(graph)):
            if node.outputs[0] in dequantized:
                continue
            activation = next((v for v in node.inputs if v is not None and v.producer() is not None
                               and v not in dequantized), None)
            for k, value in enumerate(node.inputs):
                if value in dequantized:
                    chain = _one_dequantize(dequantized[value], shapes, zero, activation,
                                            f"fp32_arithmetic::dq::{index}::{k}", rounding[value])
                    graph.insert_before(node, chain)
                    node.replace_input_with(k, chain[-1].outputs[0])
        graph.remove([*casts.values(), *{id(n): n for n in dequantized.values()}.values()], safe=True)
        return ir.passes.PassResult(model, modified=True)


class _Widening:
    """The half-precision weights of a graph, and the chains that read them widened."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.weights = {v for v in graph.initializers.values() if v.dtype in HALVES}
        self.transposed = {n.outputs[0]: n for n in graph if n.op_type == "Transpose" and n.inputs[0] in self.weights}
        self.graph_inputs = list(graph.inputs)
        self.zero = _initializer(graph, "fp32_arithmetic::zero", np.array(0, dtype=np.int64))
        self.shapes = {w: _initializer(graph, f"{w.name}::shape", np.array(w.shape.numpy(), dtype=np.int64))
                       for w in sorted(self.weights, key=lambda w: w.name or "")}

    def inputs(self, node: ir.Node, index: int) -> list[ir.Node]:
        """The chains that make every weight ``node`` reads, directly or through a Transpose, read widened
        (FusedMatMul for x @ W^T); ``node`` is rewired to them."""
        produced = [v for v in node.inputs if v is not None and v.producer() is not None and v not in self.transposed]
        activation = produced[0] if produced else next((i for i in self.graph_inputs if i in node.inputs), None)
        nodes: list[ir.Node] = []
        for k, value in enumerate(node.inputs):
            tag = f"fp32_arithmetic::{index}::{k}"
            if value in self.weights:
                node.replace_input_with(k, self.widened(nodes, value, activation, tag))
            elif value in self.transposed:
                perm = list(self.transposed[value].attributes["perm"].as_ints())
                weight = self.transposed[value].inputs[0]
                if node.op_type == "MatMul" and k == 1 and perm == [1, 0]:  # x @ W^T without a transposed copy
                    node.op_type, node.domain = "FusedMatMul", MS_DOMAIN
                    node.attributes["transB"] = ir.AttrInt64("transB", 1)
                    node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
                    node.replace_input_with(k, self.widened(nodes, weight, activation, tag))
                    continue
                widened = self.widened(nodes, weight, activation, tag)
                node.replace_input_with(k, _append(nodes, "Transpose", [widened], f"{tag}::t", perm=perm))
        return nodes

    def widened(self, nodes: list[ir.Node], weight: ir.Value, activation: ir.Value | None, tag: str) -> ir.Value:
        """``Cast(Reshape(weight, its shape + 0 * Size(activation)))``: the widening waits for the activation."""
        source = _waiting(nodes, weight, self.shapes[weight], self.zero, activation, tag)
        return _append(nodes, "Cast", [source], f"{tag}::fp32", to=FLOAT)


def _one_dequantize(dq: ir.Node, shapes: dict[ir.Value, ir.Value], zero: ir.Value, activation: ir.Value | None,
                    tag: str, round_to: list[ir.DataType]) -> list[ir.Node]:
    """One reader's DequantizeLinear of ``dq``'s stored weight, waiting for ``activation``, in fp32 (rounded as the
    graph rounds it, then widened). The last node's output is what the reader reads."""
    nodes: list[ir.Node] = []
    stored_scale = dq.inputs[1]
    scale = _waiting(nodes, stored_scale, shapes[stored_scale], zero, activation, tag)
    if stored_scale.dtype != FLOAT:
        scale = _append(nodes, "Cast", [scale], f"{tag}::fp32", to=FLOAT)
    attributes = [ir.Attr(a.name, a.type, a.value) for a in dq.attributes.values()]
    value = ir.Value(name=tag)
    nodes.append(ir.Node("", "DequantizeLinear", [dq.inputs[0], scale, *dq.inputs[2:]], attributes,
                         outputs=[value], name=tag))
    rounded = [d for d in round_to if d != FLOAT]
    for k, dtype in enumerate(rounded):
        value = _append(nodes, "Cast", [value], f"{tag}::rounded{k}", name=f"{tag}::{k}{_ROUND}", to=dtype)
    if rounded:
        _append(nodes, "Cast", [value], f"{tag}::widened", to=FLOAT)
    return nodes


def _waiting(nodes: list[ir.Node], value: ir.Value, shape: ir.Value, zero: ir.Value, activation: ir.Value | None,
             tag: str) -> ir.Value:
    """``Reshape(value, shape + zero * Size(activation))`` (``shape``: its own; ``zero``: a stored 0): ``value`` as it
    is, once ``activation`` exists, so ONNX Runtime cannot schedule what reads it at the start of the run."""
    if activation is None:
        return value
    size = _append(nodes, "Size", [activation], f"{tag}::size")
    waited = _append(nodes, "Mul", [size, zero], f"{tag}::zero")
    total = _append(nodes, "Add", [shape, waited], f"{tag}::shape")
    return _append(nodes, "Reshape", [value, total], f"{tag}::waited")


def _rounded(graph: ir.Graph, value: ir.Value, dtype: int) -> list[ir.Node]:
    """``value`` (a node's fp32 result) rounded to ``dtype`` and widened again, under ``value``'s name, in place of it
    for every reader and graph output; ``value`` itself is renamed ``NAME::exact``."""
    name = value.name
    readers = list(value.uses())
    outputs = [i for i, o in enumerate(graph.outputs) if o is value]
    value.name = f"{name}::exact"
    down = ir.node("Cast", [value], {"to": ir.DataType(dtype)}, outputs=[ir.Value(name=f"{name}::rounded")])
    up = ir.node("Cast", [down.outputs[0]], {"to": FLOAT}, outputs=[ir.Value(name=name)])
    new = up.outputs[0]
    if outputs:
        new.type, new.shape = value.type, value.shape
    for user, k in readers:
        user.replace_input_with(k, new)
    for i in outputs:
        graph.outputs[i] = new
    return [down, up]


def _half_values(model: ir.Model) -> dict[str, int]:
    """Name -> dtype of every node output and graph output ONNX shape inference finds in bf16 or fp16 (the proto
    holds no weight values: external tensors stay references)."""
    inferred = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model)).graph
    return {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.output)
            if v.type.tensor_type.elem_type in {int(h) for h in HALVES}}


def _widen_attributes(node: ir.Node) -> None:
    """Cast targets and constant tensors in half precision become fp32 (bf16 and fp16 widen exactly)."""
    for name, attr in tuple(node.attributes.items()):
        if name in ("to", "dtype") and attr.type == ir.AttributeType.INT and attr.as_int() in {int(h) for h in HALVES}:
            node.attributes[name] = ir.AttrInt64(name, int(FLOAT))
        elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype in HALVES:
            tensor = attr.value
            node.attributes[name] = ir.AttrTensor(name, ir.tensor(tensor.numpy().astype(np.float32), name=tensor.name))


def _typed_values(graph: ir.Graph) -> list[ir.Value]:
    return [*graph.inputs, *graph.outputs, *(v for n in graph for v in n.outputs)]


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.INT64))
    graph.register_initializer(value)
    return value


def _append(nodes: list[ir.Node], op: str, inputs: list[Any], output: str, name: str | None = None,
            **attributes: Any) -> ir.Value:
    """A node appended to ``nodes``; its one output, named ``output``."""
    value = ir.Value(name=output)
    nodes.append(ir.node(op, inputs, attributes or None, outputs=[value], name=name))
    return value
