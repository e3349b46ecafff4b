"""ONNX Runtime's fused operators written into an exported graph, as onnx_ir passes (torch-free; ``ort_fusion`` runs
them for ``--optimize ort``): attention as com.microsoft MultiHeadAttention (``FuseAttention``: ONNX Runtime's
transformer optimizer fuses no attention of these exports, DESIGN.md), T5's fp32-computed RMSNorm in fp16/bf16 graphs
(``FuseHalfNorms``), T5's GELU (``FuseTanhGelus``, which its optimizer misses in bf16), then ONNX Runtime's own
transformer optimizer (``OrtTransformerFusions``: SkipLayerNormalization / SkipSimplifiedLayerNormalization, fused
GELU). None reads a weight's values or adds a stored tensor beyond scalars and shape vectors.

Q, K and V stay three MatMuls on their own weights (MultiHeadAttention's unpacked form), so a re-used attention
sub-block still reads its weights once from each slot; packing would need a concatenated copy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Attention:
    """One matched attention: its projections (batch, seq, hidden), the additive bias terms, and where it ends."""

    query: Any
    key: Any
    value: Any
    bias: tuple[Any, ...]
    scale: float
    num_heads: int
    output: Any  # the Reshape back to (batch, seq, hidden); MultiHeadAttention's output replaces it


# ----------------------------------------------------------------------------------------------- matching


def _ints(value: Any) -> list[int] | None:
    """The integers a constant holds; for a Concat (a Reshape's shape), its parts, each computed part read as one
    dimension of unknown size (-1). None for anything else."""
    if value is None:
        return None
    if value.const_value is not None:
        return [int(v) for v in value.const_value.numpy().reshape(-1)]
    node = _producer(value, "Concat")
    if node is None:
        return None
    return [x for v in node.inputs for x in (_ints(v) if v.const_value is not None else [-1]) or [-1]]


def _scalar(value: Any) -> float | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(-1)[0])


def _perm(node: Any) -> list[int] | None:
    attr = node.attributes.get("perm")
    return list(attr.as_ints()) if attr is not None else None


def _producer(value: Any, op: str) -> Any:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None


def _heads(value: Any, perm: list[int]) -> tuple[Any, int] | None:
    """``Transpose(Reshape(x, [batch, seq, heads, head_size]), perm)`` -> (x, heads)."""
    t = _producer(value, "Transpose")
    r = _producer(t.inputs[0], "Reshape") if t is not None and _perm(t) == perm else None
    if r is None:
        return None
    shape = _ints(r.inputs[1])
    if shape is None or len(shape) != 4:
        return None
    x = r.inputs[0]
    hidden = _width(x)
    if shape[2] < 1 and hidden is not None and shape[3] > 0 and hidden % shape[3] == 0:
        shape[2] = hidden // shape[3]  # reshaped to [batch, seq, -1, head_size]
    return (x, shape[2]) if shape[2] > 0 else None


def _width(x: Any) -> int | None:
    """The last dimension of a projection's output: from its shape, or from the Split that parts a joined projection
    (quantize.py joins the Q, K and V MatMuls of a slot)."""
    if x.shape is not None and len(x.shape) == 3 and isinstance(x.shape[-1], int):
        return int(x.shape[-1])
    split = _producer(x, "Split")
    widths = _ints(split.inputs[1]) if split is not None and len(split.inputs) > 1 else None
    axis = split.attributes.get("axis") if split is not None else None
    if widths is None or axis is None or axis.as_int() not in (-1, 2) or len(widths) != len(split.outputs):
        return None
    return widths[list(split.outputs).index(x)]


def _scores(value: Any, bias: tuple[Any, ...]) -> tuple[Any, float, tuple[Any, ...]] | None:
    """Walk up from the Softmax's input: Adds of bias terms, at most one scalar Mul/Div (in fp32 between Casts in a
    half graph whose scale that precision cannot hold), then MatMul(q, k^T)."""
    value = _through_casts(value)
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Add":
        for s, t in ((0, 1), (1, 0)):
            found = _scores(node.inputs[s], bias + (node.inputs[t],))
            if found is not None:
                return found
        return None
    if node.op_type in ("Mul", "Div"):
        scale = _scalar(node.inputs[1])
        matmul = _producer(_through_casts(node.inputs[0]), "MatMul")
        if scale is None or matmul is None or scale == 0:
            return None
        return matmul, (scale if node.op_type == "Mul" else 1.0 / scale), bias
    matmul = _producer(value, "MatMul")
    return (matmul, 1.0, bias) if matmul is not None else None


def match_attention(softmax: Any) -> Attention | None:
    """The eager attention every family exports, ending at ``softmax``; None where any part differs."""
    axis = softmax.attributes.get("axis")
    scores = _scores(softmax.inputs[0], ()) if axis is None or axis.as_int() in (-1, 3) else None
    uses = list(softmax.outputs[0].uses())
    if scores is None or len(uses) != 1 or uses[0][0].op_type != "MatMul" or uses[0][1] != 0:
        return None
    matmul, scale, bias = scores
    context = uses[0][0]
    q, k = _heads(matmul.inputs[0], [0, 2, 1, 3]), _heads(matmul.inputs[1], [0, 2, 3, 1])
    v = _heads(context.inputs[1], [0, 2, 1, 3])
    output = _merged_heads(context.outputs[0])
    if q is None or k is None or v is None or output is None or len({q[1], k[1], v[1]}) != 1:
        return None
    if any(t.shape is None or len(t.shape) != 4 for t in bias):  # attention_bias is (batch|1, heads|1, seq, seq)
        return None
    return Attention(q[0], k[0], v[0], bias, scale, q[1], output)


def _merged_heads(value: Any) -> Any:
    """``Reshape(Transpose(x, [0, 2, 1, 3]), [batch, seq, hidden])`` -> the Reshape's output."""
    uses = list(value.uses())
    if len(uses) != 1 or uses[0][0].op_type != "Transpose" or _perm(uses[0][0]) != [0, 2, 1, 3]:
        return None
    after = list(uses[0][0].outputs[0].uses())
    if len(after) != 1 or after[0][0].op_type != "Reshape":
        return None
    return after[0][0].outputs[0]


@dataclass(frozen=True)
class HalfNorm:
    """An RMSNorm computed in fp32 and rounded to the weight's half precision before the scale (T5 in fp16/bf16):
    ``Mul(w, Cast(Div(x32, Sqrt(ReduceMean(Pow(x32, 2)) + eps)), to=half))``."""

    x32: Any
    weight: Any
    epsilon: float
    output: Any


def _chain(value: Any, steps: tuple[tuple[str, int], ...]) -> list[Any] | None:
    """Producers up from ``value``: each step names the op and the input the walk goes on from."""
    nodes = []
    for op, k in steps:
        node = _producer(value, op)
        if node is None or len(node.inputs) <= k:
            return None
        nodes.append(node)
        value = node.inputs[k]
    return nodes


def match_half_norm(mul: Any) -> HalfNorm | None:
    for w, c in ((0, 1), (1, 0)):
        found = _chain(mul.inputs[c], (("Cast", 0), ("Div", 1), ("Sqrt", 0), ("Add", 0), ("ReduceMean", 0), ("Pow", 0)))
        if found is None:
            continue
        _, div, _, add, mean, pow_ = found
        if pow_.inputs[0] is not div.inputs[0] or _scalar(pow_.inputs[1]) != 2.0:
            continue
        axes, eps = _ints(mean.inputs[1]) if len(mean.inputs) > 1 else None, _scalar(add.inputs[1])
        x32 = div.inputs[0]
        if axes == [-1] and eps is not None and x32.dtype is not None and x32.dtype.name == "FLOAT":
            return HalfNorm(x32, mul.inputs[w], eps, mul.outputs[0])
    return None



GELU_TANH = (0.5, 0.044715, math.sqrt(2 / math.pi), 1.0, 3.0)  # 0.5 x (1 + tanh(c (x + a x^3)))
HALF_ROUNDING = 4e-3  # a bf16-rounded constant is within 2^-9 of its value


def _through_casts(value: Any) -> Any:
    """What ``value`` is a Cast (or Casts) of: a half graph computes its scalar arithmetic in fp32 between Casts
    (export.HalfScalarsInFp32)."""
    while value is not None and (node := _producer(value, "Cast")) is not None:
        value = node.inputs[0]
    return value


def _with_constant(value: Any, op: str, expected: float) -> Any:
    """``op(other, c)`` or ``op(c, other)`` with c a scalar close to ``expected`` (rounded to half precision at
    worst), looking through Casts on either side -> other; None otherwise."""
    node = _producer(_through_casts(value), op)
    if node is None or len(node.inputs) != 2:
        return None
    for k in (0, 1):
        c = _scalar(node.inputs[k])
        if c is not None and abs(c - expected) <= HALF_ROUNDING * abs(expected):
            return _through_casts(node.inputs[1 - k])
    return None


def match_tanh_gelu(mul: Any) -> Any:
    """T5's GELU (``gelu_new``) as exported: ``Mul(Mul(x, 0.5), Add(Tanh(Mul(Add(x, Mul(Pow(x, 3), a)), c)), 1))``
    -> x. ONNX Runtime's FastGelu fusion misses it in bf16, whose graph holds a and c rounded (0.04468, 0.7969)."""
    half, a, c, one, three = GELU_TANH
    for k in (0, 1):
        x = _with_constant(mul.inputs[k], "Mul", half)
        tanh = _producer(_with_constant(mul.inputs[1 - k], "Add", one), "Tanh")
        inner = _producer(_with_constant(tanh.inputs[0], "Mul", c), "Add") if tanh is not None else None
        if x is None or inner is None:
            continue
        for j in (0, 1):
            cube = _producer(_with_constant(inner.inputs[1 - j], "Mul", a), "Pow")
            if inner.inputs[j] is x and cube is not None and cube.inputs[0] is x and _scalar(cube.inputs[1]) == three:
                return x
    return None


# ----------------------------------------------------------------------------------------------- rewriting


def _write(graph: Any, attention: Attention) -> None:
    """MultiHeadAttention(q, k, v, attention_bias = the sum of the bias terms) in place of the matched nodes."""
    anchor = attention.output.producer()
    nodes = []
    bias = attention.bias[0] if attention.bias else None
    for term in attention.bias[1:]:
        nodes.append(ir.node("Add", [bias, term]))
        bias = nodes[-1].outputs[0]
    if bias is not None and _broadcast_rows(attention.bias):
        nodes += _expanded_rows(bias)
        bias = nodes[-1].outputs[0]
    mha = ir.node("MultiHeadAttention", [attention.query, attention.key, attention.value, None, None, bias],
                  attributes={"num_heads": attention.num_heads, "scale": attention.scale}, domain=MS_DOMAIN)
    nodes.append(mha)
    graph.insert_before(anchor, nodes)
    _take_place(attention.output, mha.outputs[0])


def _take_place(old: Any, new: Any) -> None:
    """``new`` replaces ``old`` everywhere, with its type and shape, and its name where it is a graph output."""
    new.shape, new.type = old.shape, old.type
    if old.is_graph_output():
        name, old.name = old.name, f"{old.name}::replaced"
        new.name = name
    old.replace_all_uses_with(new, replace_graph_outputs=True)


def _broadcast_rows(terms: tuple[Any, ...]) -> bool:
    """Whether the bias may have one row for all queries (a padding mask, batch x 1 x 1 x seq): MultiHeadAttention
    wants dimension 2 to be the sequence."""
    return all(t.shape[2] == 1 for t in terms)


def _expanded_rows(bias: Any) -> list[Any]:
    """``Expand(bias, [b, h, seq, seq])`` from the bias's own shape (self-attention: queries = keys), so slots that
    share the bias share this too (CSE)."""
    head, tail = ir.node("Shape", [bias], attributes={"start": 0, "end": 2}), ir.node("Shape", [bias], attributes={"start": 3})
    shape = ir.node("Concat", [head.outputs[0], tail.outputs[0], tail.outputs[0]], attributes={"axis": 0})
    return [head, tail, shape, ir.node("Expand", [bias, shape.outputs[0]])]


class FuseAttention(ir.passes.InPlacePass):
    """Every attention that ``match_attention`` recognises becomes one MultiHeadAttention; the bias sums of slots that
    share their terms are computed once (CSE). ``fused``: how many, after the pass has run."""

    fused = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        matches = [m for m in (match_attention(n) for n in tuple(model.graph) if n.op_type == "Softmax") if m is not None]
        for attention in matches:
            _write(model.graph, attention)
        if matches:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        common.RemoveUnusedNodesPass()(model)
        common.CommonSubexpressionEliminationPass()(model)
        self.fused = len(matches)
        return ir.passes.PassResult(model, modified=bool(matches))


class FuseHalfNorms(ir.passes.InPlacePass):
    """Each ``HalfNorm`` becomes ``Cast(SimplifiedLayerNormalization(x32, Cast(w, to=float)), to=half)``: the norm in
    fp32 as PyTorch computes it, in one node that ONNX Runtime's optimizer then fuses with the residual Add before it
    (SkipSimplifiedLayerNormalization); fp32 kernels only. The widened scale is a node, not a stored copy."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        matches = [m for m in (match_half_norm(n) for n in tuple(model.graph) if n.op_type == "Mul") if m is not None]
        for norm in matches:
            half = norm.output.dtype
            scale = ir.node("Cast", [norm.weight], attributes={"to": ir.DataType.FLOAT})
            fused = ir.node("SimplifiedLayerNormalization", [norm.x32, scale.outputs[0]],
                            attributes={"axis": -1, "epsilon": norm.epsilon, "stash_type": 1})
            out = ir.node("Cast", [fused.outputs[0]], attributes={"to": half})
            model.graph.insert_before(norm.output.producer(), [scale, fused, out])
            _take_place(norm.output, out.outputs[0])
        common.RemoveUnusedNodesPass()(model)
        common.CommonSubexpressionEliminationPass()(model)
        return ir.passes.PassResult(model, modified=bool(matches))


class FuseTanhGelus(ir.passes.InPlacePass):
    """Each ``match_tanh_gelu`` becomes com.microsoft FastGelu, which computes with the exact constants (as PyTorch
    does: its Python-float constants are not rounded to the tensor's precision)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found = [(n, x) for n in tuple(model.graph) if n.op_type == "Mul" for x in [match_tanh_gelu(n)] if x is not None]
        for mul, x in found:
            gelu = ir.node("FastGelu", [x], domain=MS_DOMAIN)
            model.graph.insert_before(mul, [gelu])
            _take_place(mul.outputs[0], gelu.outputs[0])
        if found:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(found))


class OrtTransformerFusions(ir.passes.FunctionalPass):
    """ONNX Runtime's transformer optimizer for ``model_type`` (its Python fusions only, no session):
    SkipLayerNormalization / SkipSimplifiedLayerNormalization, LayerNormalization / SimplifiedLayerNormalization, fused
    GELU. Two of its steps are left out: its attention fusion (``FuseAttention`` did that, unpacked) and its constant
    folding, which writes each weight transposed, inline, under the parameter's name (it would read every weight's
    values). It works on a ModelProto: the result is a new model (external weights stay references)."""

    def __init__(self, model_type: str):
        super().__init__()
        self.model_type = model_type

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import MODEL_TYPES

        options = FusionOptions(self.model_type)
        options.enable_attention = False
        optimizer = MODEL_TYPES[self.model_type][0](ir.serde.serialize_model(model), 0, 0)
        optimizer.fuse_constant_fold = lambda: None
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        optimizer.optimize(options)
        optimizer.topological_sort()
        return ir.passes.PassResult(ir.serde.deserialize_model(optimizer.model), modified=True)
