"""Faults planted in an exported graph, one at a time: what a parity check must tell from a correct export.

Each function takes a ``model.onnx`` path (a single file: the small models of the tests and benchmarks), edits it in
place with the ``onnx`` package, and returns a one-line description of what it changed. A fault planted in the
PyTorch module would be in the reference too; these are planted in the graph only.

How the graph shows the plan: every stored weight is an initializer named after its parameter in the checkpoint
(``encoder.block.<block>.<role>``, ``skrr_export.graph.names``), read by one MatMul per slot that executes it, through a Transpose (quantized exports:
through a DequantizeLinear, q/k/v and T5's wi_0/wi_1 joined into one weight, ``quantize.store_quantized``). A
re-used sub-block's weight is read by two or more MatMuls, in execution order (the graph's node order). Used by
benchmarks/parity_separation.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

KEY = (".k.weight", ".k_proj.weight", ".key.weight")
QUERY = (".q.weight", ".q_proj.weight", ".query.weight")
FFN_IN = (".wi.weight", ".wi_0.weight", ".fc1.weight", ".intermediate.dense.weight")
_KINDS = {"attention": KEY, "ffn": FFN_IN}
_THROUGH = ("Transpose", "Cast", "DequantizeLinear", "Reshape")


def _load(path: Path | str) -> Any:
    import onnx

    return onnx.load(str(path))


def _save(model: Any, path: Path | str) -> None:
    import onnx

    onnx.save(model, str(path))


def _parts(root: str) -> list[str]:
    """The parameter names a stored weight holds (a quantized joined weight holds several)."""
    return re.sub(r"::.*$|\.(quantized|scales?)\b.*$", "", root).split("+")


_BLOCK = re.compile(r"\.(\d+)\.")  # a checkpoint name's block index: the first number in it
# an attention sub-block's weight (its norm included) in T5 / UMT5, BERT and CLIP
_ATTENTION = re.compile(r"\.block\.\d+\.layer\.0\.|\.attention\.|\.self_attn\.|\.layer_norm1\.")


def _block(root: str) -> int | None:
    """The transformer block a stored weight belongs to (None: the embeddings or the head)."""
    found = _BLOCK.search(_parts(root)[0])
    return int(found.group(1)) if found else None


def _sub_block(root: str) -> int:
    """The sub-block a stored weight of a block belongs to: 2b for attention, 2b + 1 for the feed-forward."""
    return 2 * (_block(root) or 0) + (not _ATTENTION.search(_parts(root)[0]))


def _role(root: str) -> str:
    return "+".join(_BLOCK.sub(".*.", p, count=1) for p in _parts(root))


def _is(root: str, suffixes: tuple[str, ...]) -> bool:
    return _block(root) is not None and any(p.endswith(suffixes) for p in _parts(root))


def weight_readers(model: Any) -> dict[str, list[Any]]:
    """Stored weight (initializer name) -> the MatMul nodes reading it as their second input, directly or through
    Transpose / Cast / DequantizeLinear / Reshape, in graph order."""
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def root(value: str) -> str | None:
        while value not in inits:
            node = producer.get(value)
            if node is None or node.op_type not in _THROUGH:
                return None
            value = node.input[0]
        return value

    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1:
            r = root(node.input[1])
            if r is not None:
                readers.setdefault(r, []).append(node)
    return readers


def _pick(items: list[Any], which: str) -> Any:
    return {"first": items[0], "middle": items[(len(items) - 1) // 2], "last": items[-1]}[which]


def reused_slots(path: Path | str, kind: str, reuse: dict[int, int] | None = None) -> list[tuple[int, str, int]]:
    """The re-used slots of ``kind`` ('attention' or 'ffn') as (slot, stored weight, index of its reader), in slot
    order. With the plan's ``reuse`` map (slot -> kept sub-block) the slots are exact; without it each weight's last
    reader stands for its re-use (slot -1)."""
    readers = weight_readers(_load(path))
    roots = {_sub_block(r): r for r in readers if _is(r, _KINDS[kind])}
    out = []
    if reuse:
        for slot, kept in sorted(reuse.items()):
            if kept in roots:
                executed = sorted({kept, *(s for s, k in reuse.items() if k == kept)})
                out.append((slot, roots[kept], executed.index(slot)))
    else:
        out = [(-1, r, len(readers[r]) - 1) for _, r in sorted(roots.items()) if len(readers[r]) > 1]
    return out


def plant_reused_weight(path: Path | str, kind: str = "attention", which: str = "last",
                        reuse: dict[int, int] | None = None) -> str:
    """A re-used slot's key MatMul (``kind='attention'``) or first FFN MatMul (``kind='ffn'``: wi / wi_0 / fc1 /
    intermediate) reads the same weight of the nearest other kept sub-block instead: the ``which`` ('first',
    'middle', 'last') re-used slot of that kind. In a quantized export the slot's joined q/k/v (wi_0/wi_1) MatMul
    reads the other sub-block's joined weight."""
    model = _load(path)
    readers = weight_readers(model)
    slots = reused_slots(path, kind, reuse)
    if not slots:
        raise ValueError(f"no re-used {kind} slot in {path}")
    slot, weight, index = _pick(slots, which)
    node = readers[weight][index]
    here = _sub_block(weight)
    others = sorted((r for r in readers if r != weight and _role(r) == _role(weight) and _sub_block(r) != here),
                    key=lambda r: (abs(_sub_block(r) - here), _sub_block(r)))
    if not others:
        raise ValueError(f"no other sub-block stores {_role(weight)}")
    other = others[0]
    node.input[1] = readers[other][0].input[1]
    _save(model, path)
    where = f"slot {slot}" if slot >= 0 else f"reader {index + 1} of {len(readers[weight])}"
    return f"{kind} {where} ({node.name}) reads {other} instead of {weight}"


def plant_qk_swap(path: Path | str, which: str = "middle") -> str:
    """q and k swapped in one attention slot (the ``which`` kept attention sub-block's own first slot): its query
    MatMul reads the key weight and the other way round (quantized, joined q/k/v: the Split's first two outputs)."""
    model = _load(path)
    readers = weight_readers(model)
    keys = sorted((r for r in readers if _is(r, KEY)), key=_sub_block)
    if not keys:
        raise ValueError(f"no attention key weight in {path}")
    key = _pick(keys, which)
    if _is(key, QUERY):  # joined q/k/v: swap what the Split hands on as q and as k
        matmul = readers[key][0]
        split = next(n for n in model.graph.node if n.op_type == "Split" and n.input[0] == matmul.output[0])
        q, k = split.output[0], split.output[1]
        split.output[0], split.output[1] = k, q
        _save(model, path)
        return f"q and k swapped in sub-block {_sub_block(key)}'s first slot ({split.name} outputs 0 and 1)"
    query = next(r for r in readers if _is(r, QUERY) and _sub_block(r) == _sub_block(key))
    a, b = readers[query][0], readers[key][0]
    a.input[1], b.input[1] = b.input[1], a.input[1]
    _save(model, path)
    return f"q and k swapped in sub-block {_sub_block(key)}'s first slot ({a.name} <-> {b.name})"


def plant_scales(path: Path | str, which: str = "middle") -> str:
    """Quantized export: the ``which`` DequantizeLinear of a kept sub-block reads the scales of the nearest other
    sub-block's weight of the same role and shape (DequantizeLinear input 1)."""
    model = _load(path)
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in shapes
           and _block(n.input[0]) is not None]
    if not dqs:
        raise ValueError(f"no quantized weight in {path}")
    dqs.sort(key=lambda n: (_role(n.input[0]), _sub_block(n.input[0])))
    candidates = [n for n in dqs if any(o is not n and _role(o.input[0]) == _role(n.input[0])
                                        and shapes[o.input[1]] == shapes[n.input[1]] for o in dqs)]
    candidates.sort(key=lambda n: _sub_block(n.input[0]))
    dq = _pick(candidates, which)
    here = _sub_block(dq.input[0])
    other = min((o for o in dqs if o is not dq and _role(o.input[0]) == _role(dq.input[0])
                 and shapes[o.input[1]] == shapes[dq.input[1]]),
                key=lambda o: (abs(_sub_block(o.input[0]) - here), _sub_block(o.input[0])))
    old = dq.input[1]
    dq.input[1] = other.input[1]
    _save(model, path)
    return f"{dq.name} reads scales {other.input[1]} instead of {old}"


def plant_fp16_round_trip(path: Path | str, which: str = "last") -> str:
    """A round trip through fp16 (Cast to fp16, Cast back) inserted inside one norm: on the squared input that the
    norm averages (T5's RMSNorm: Pow -> ReduceMean; a decomposed LayerNorm likewise). At T5-XXL's activation scale the
    square exceeds 65504, so in real fp16 it is inf and the norm's output zero. Valid ONNX; invisible to a check that
    widens every Cast to fp32. ``which='last'``: the final norm, whose zeros are the output; a norm inside a sub-block
    ('first') only silences that sub-block, which a residual stream at that scale hardly notices
    (benchmarks/README.md)."""
    import onnx
    from onnx import TensorProto, helper

    model = _load(path)
    graph = model.graph
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    squares = [n for n in graph.node if n.op_type == "Pow"
               and any(c.op_type == "ReduceMean" for c in consumers.get(n.output[0], []))]
    if not squares:
        raise ValueError(f"no norm (Pow -> ReduceMean) in {path}")
    pow_node = _pick(squares, which)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.output)}
    dtype = types.get(pow_node.output[0], TensorProto.FLOAT)
    value = pow_node.output[0]
    down, back = f"{value}::planted_fp16", f"{value}::planted_back"
    for c in consumers[value]:
        for k, name in enumerate(c.input):
            if name == value:
                c.input[k] = back
    nodes = list(graph.node)
    at = nodes.index(pow_node) + 1
    nodes[at:at] = [helper.make_node("Cast", [value], [down], to=TensorProto.FLOAT16, name="planted_cast_fp16"),
                    helper.make_node("Cast", [down], [back], to=dtype, name="planted_cast_back")]
    graph.ClearField("node")
    graph.node.extend(nodes)
    _save(model, path)
    return f"fp16 round trip on {pow_node.name}'s output (the squared input of norm {squares.index(pow_node) + 1} of {len(squares)})"
