"""The one weights-once invariant, for every form of an exported graph (plain, quantized, fused, a copy), torch-free.

Given what the weights must be (``Expected``: which initializer holds which parameter, and their bytes), ``check``
reads an onnx_ir model and finds every violation of:

- every parameter is stored exactly once, and the weights hold exactly the expected bytes (a quantized form: within
  its slack);
- everything else the file stores (initializers that hold no parameter and tensors inside nodes: Constant values and
  any other tensor attribute, in the graph, its subgraphs and its functions) is at most ``bound(sequence)`` bytes in
  all: max(64 KiB, 4 S^2) for a fixed sequence S;
- no stored non-weight tensor of 1 KiB or more equals a weight, its transpose, its cast to fp32 / fp16 / bf16, a
  reshape of any of these (the same bytes) or a contiguous block of one.

A copy is found by searching the constant's bytes in each weight's bytes (and those of its transpose and casts), one
weight at a time, at element-aligned offsets: linear in the weights' bytes per constant, and there are at most
``bound / 1 KiB`` such constants. A constant whose elements are all equal (a fill) copies nothing learned and is
only counted.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ..artifacts import SMALL_CONSTANT_BYTES  # the bound without a fixed sequence

COPY_MIN_BYTES = 1024  # a non-weight tensor this large must not copy a weight
FLOATS = {ir.DataType.FLOAT: np.dtype(np.float32), ir.DataType.FLOAT16: np.dtype(np.float16),
          ir.DataType.BFLOAT16: np.dtype(ml_dtypes.bfloat16)}
WEIGHT_DTYPES = {*FLOATS, ir.DataType.INT8, ir.DataType.INT4}  # a parameter, or its quantized integers
FLOAT_NAMES = {ir.DataType.FLOAT: "fp32", ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}
# A parameter's checkpoint name (``encoder.block.3.layer.0.SelfAttention.q.weight``, ``graph.names``), or several
# joined by '+' (a quantized group's integers or scales): how a file read without the module tells weights from the
# exporter's constants (``val_17``).
_PARAMETER_NAME = re.compile(r"[A-Za-z_]\w*(\.\w+)+(\+[A-Za-z_]\w*(\.\w+)+)*")


def bound(sequence: int | None) -> int:
    """The most bytes a graph may store besides its weights: max(64 KiB, 4 S^2) for a fixed sequence S."""
    return max(SMALL_CONSTANT_BYTES, 4 * sequence * sequence) if sequence else SMALL_CONSTANT_BYTES


@dataclass(frozen=True)
class Initializers:
    """What the exported graph stores: one initializer per parameter (named as in the checkpoint), and constants
    (every other stored tensor: initializers and tensors inside nodes)."""

    weight_count: int
    weight_bytes: int
    constant_count: int
    constant_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.constant_bytes


@dataclass(frozen=True)
class Expected:
    """What the weights of a graph must be. ``holders``: initializer name -> the parameter keys it holds (a joined
    quantized initializer holds several; a quantized parameter's scales have keys of their own); ``required``: every
    key that must be held (empty where unknown: a file read without the module); ``bytes``: the weights' bytes (None:
    unknown, not checked); ``slack``: the relative difference allowed (int4 packing); ``sequence``: a fixed sequence."""

    holders: Mapping[str, tuple[str, ...]]
    required: frozenset[str]
    bytes: int | None
    slack: float = 0.0
    sequence: int | None = None
    stored: Mapping[str, tuple[object, ...]] | None = None  # a rewritten copy: each weight exactly as the original
    # stored it (``stored_expected``: dtype, shape, and its bytes' file and place, or their digest)


@dataclass(frozen=True)
class Violation:
    """One broken promise: the tensor, its size, and what it copies (or what is wrong with it)."""

    tensor: str
    nbytes: int
    what: str

    def __str__(self) -> str:
        size = f" ({self.nbytes:,} bytes)" if self.nbytes else ""
        return f"{self.tensor}{size} {self.what}"


@dataclass(frozen=True)
class WeightsCheck:
    """The accounting and every violation found; true when there is none."""

    stored: Initializers
    violations: tuple[Violation, ...] = field(default=())

    def __bool__(self) -> bool:
        return not self.violations

    def message(self) -> str:
        more = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
        return f"weights once: {self.violations[0]}{more}" if self.violations else "weights once: passed"


@dataclass(frozen=True)
class _Stored:
    name: str
    tensor: ir.TensorProtocol

    @property
    def nbytes(self) -> int:
        return int(self.tensor.nbytes)


def check(model: ir.Model, expected: Expected) -> WeightsCheck:
    """Every violation of the invariant in ``model`` (nothing is changed)."""
    weights, constants = _split(model, expected.holders)
    violations = [*_stored_twice(weights, expected), *_missing(weights, expected), *_changed(weights, expected)]
    weight_bytes = sum(w.nbytes for w in weights)
    violations += _wrong_bytes(weights, weight_bytes, expected)
    violations += _over_bound(constants, bound(expected.sequence))
    violations += find_copies(constants, weights)
    stored = Initializers(len(weights), weight_bytes, len(constants), sum(c.nbytes for c in constants))
    return WeightsCheck(stored, tuple(violations))


def file_expected(model: ir.Model, weight_bytes: int | None, slack: float = 0.0) -> Expected:
    """``Expected`` for a file read without the module: its floating-point (or quantized) initializers named like
    parameters are the weights; integer buffers (BERT's ``position_ids``) are not parameters."""
    names = [n for n, v in model.graph.initializers.items()
             if _PARAMETER_NAME.fullmatch(n) and v.const_value is not None and v.const_value.dtype in WEIGHT_DTYPES]
    return Expected({n: (n,) for n in names}, frozenset(), weight_bytes, slack, fixed_sequence(model))


def stored_expected(model: ir.Model) -> Expected:
    """``Expected`` for a rewritten copy of ``model`` (the ``--optimize ort`` fusion, a measurement's fused copy): it
    stores exactly ``model``'s weights (``file_expected``), every one of them, each as ``model`` stores it (the same
    dtype and shape, the same bytes in the same file and place, or inline with the same digest)."""
    found = file_expected(model, None)
    weights = {n: model.graph.initializers[n].const_value for n in found.holders}
    return Expected(found.holders, frozenset(k for keys in found.holders.values() for k in keys),
                    sum(int(t.nbytes) for t in weights.values() if t is not None), found.slack, found.sequence,
                    {n: _identity(t) for n, t in weights.items() if t is not None})


def _identity(tensor: ir.TensorProtocol) -> tuple[object, ...]:
    """What a weight is without reading external data: dtype, shape, and where its bytes are (file, offset, length)
    or the digest of its inline bytes."""
    if isinstance(tensor, ir.ExternalTensor):
        where: tuple[object, ...] = ("in", str(tensor.location), tensor.offset or 0, tensor.length)
    else:
        where = ("inline", hashlib.sha256(tensor.tobytes()).hexdigest())
    return (tensor.dtype, tuple(tensor.shape), where)


def _describe(identity: tuple[object, ...]) -> str:
    dtype, shape, where = identity
    place = f"{where[1]} at byte {where[2]:,}" if where[0] == "in" else "inline"  # type: ignore[index]
    return f"{dtype} {list(shape)} {place}"  # type: ignore[call-overload]


def fixed_sequence(model: ir.Model) -> int | None:
    """The sequence length the graph's first input fixes (its second axis), None when dynamic."""
    shape = model.graph.inputs[0].shape if model.graph.inputs else None
    dim = shape[1] if shape is not None and len(shape) > 1 else None
    return dim if isinstance(dim, int) else None


def _split(model: ir.Model, holders: Mapping[str, tuple[str, ...]]) -> tuple[list[_Stored], list[_Stored]]:
    """(weights, constants): every tensor the model stores, initializers first, then tensors inside nodes."""
    weights, constants = [], []
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            if value.const_value is not None:
                (weights if name in holders and graph is model.graph else constants).append(_Stored(name, value.const_value))
    constants += _node_tensors(model)
    return weights, constants


def _node_tensors(model: ir.Model) -> Iterator[_Stored]:
    """Tensors stored inside nodes (Constant values, any tensor attribute; Constant's float and int lists)."""
    nodes = [*model.graph.all_nodes(), *(n for f in model.functions.values() for n in f.all_nodes())]
    for index, node in enumerate(nodes):
        where = node.name or f"{node.op_type}#{index}"
        for attr in node.attributes.values():
            for k, tensor in enumerate(_attribute_tensors(attr, node.op_type)):
                yield _Stored(f"{where}.{attr.name}" + (f".{k}" if k else ""), tensor)


def _attribute_tensors(attr: ir.Attr, op_type: str) -> list[ir.TensorProtocol]:
    if attr.type == ir.AttributeType.TENSOR:
        return [attr.value]
    if attr.type == ir.AttributeType.TENSORS:
        return list(attr.value)
    if op_type == "Constant" and attr.type in (ir.AttributeType.FLOATS, ir.AttributeType.INTS):
        dtype = np.float32 if attr.type == ir.AttributeType.FLOATS else np.int64
        return [ir.tensor(np.asarray(list(attr.value), dtype))]
    return []


def _stored_twice(weights: list[_Stored], expected: Expected) -> Iterator[Violation]:
    owners: dict[str, str] = {}
    for w in weights:
        for key in expected.holders[w.name]:
            if key in owners:
                yield Violation(w.name, w.nbytes, f"holds parameter {key}, stored twice (also in {owners[key]})")
            owners.setdefault(key, w.name)


def _missing(weights: list[_Stored], expected: Expected) -> Iterator[Violation]:
    held = {key for w in weights for key in expected.holders[w.name]}
    for key in sorted(expected.required - held):
        yield Violation(f"parameter {key}", 0, "is not stored as a weight (no initializer holds it)")


def _changed(weights: list[_Stored], expected: Expected) -> Iterator[Violation]:
    """Each weight of a rewritten copy that the original stored otherwise (``Expected.stored``)."""
    for w in weights if expected.stored is not None else ():
        was, now = expected.stored.get(w.name), _identity(w.tensor)
        if was is not None and was != now:
            yield Violation(w.name, w.nbytes, f"is not the weight the original stored ({_describe(was)}), it is "
                            f"{_describe(now)}: rewritten or stored anew")


def _wrong_bytes(weights: list[_Stored], weight_bytes: int, expected: Expected) -> list[Violation]:
    """The weights' bytes against the expected ones; over them, each weight whose bytes another weight also holds
    (not a fill) is named: a weight stored twice under two parameter names."""
    if expected.bytes is None or abs(weight_bytes - expected.bytes) <= expected.slack * expected.bytes:
        return []
    limit = f" (limit {expected.slack:.0%})" if expected.slack else ""
    found = []
    if weight_bytes > expected.bytes:
        seen: dict[bytes, str] = {}
        for w in weights:
            data = w.tensor.tobytes()
            digest = hashlib.sha256(data).digest()
            if digest in seen and not _uniform(data, w.tensor.dtype):
                found.append(Violation(w.name, w.nbytes, f"holds the bytes of weight {seen[digest]}, stored twice"))
            seen.setdefault(digest, w.name)
    return found + [Violation("the weights", weight_bytes, f"are not the {expected.bytes:,} unique parameter bytes "
                              f"expected{limit}")]


def _over_bound(constants: list[_Stored], limit: int) -> list[Violation]:
    total = sum(c.nbytes for c in constants)
    if total <= limit:
        return []
    largest = max(constants, key=lambda c: c.nbytes)
    return [Violation(largest.name, largest.nbytes, f"is the largest of {len(constants)} non-weight tensors holding "
                      f"{total:,} bytes in all, over the bound of {limit:,} bytes")]


def find_copies(constants: Iterable[_Stored], weights: list[_Stored]) -> list[Violation]:
    """Each non-weight tensor of ``COPY_MIN_BYTES`` or more that equals a weight, its transpose or cast (or a
    reshape or contiguous block of one of these), or holds one of these whole among other values (a packed copy),
    once, with what it copies."""
    targets = {c.name: (c, c.tensor.tobytes()) for c in constants if c.nbytes >= COPY_MIN_BYTES}
    targets = {name: t for name, t in targets.items() if not _uniform(t[1], t[0].tensor.dtype)}
    found: list[Violation] = []
    for w in weights:
        dtypes = {c.tensor.dtype for c, _ in targets.values()}
        if not dtypes & ({w.tensor.dtype} | (set(FLOATS) if w.tensor.dtype in FLOATS else set())):
            continue  # no tensor left that could copy this weight (an int64 shape table never copies a float)
        for form, dtype, data in _forms(w.tensor, dtypes):
            for name, (c, stored) in list(targets.items()):
                needle = _needle(c.tensor, stored, dtype)
                offset = _find(data, needle, dtype)
                cast = f", cast to {FLOAT_NAMES[c.tensor.dtype]}" if c.tensor.dtype != w.tensor.dtype else ""
                if offset is not None:
                    where = "all of it" if len(needle) == len(data) else f"a block at byte {offset:,}"
                    found.append(Violation(name, c.nbytes, f"copies weight {w.name} ({form}{cast}, {where})"))
                    del targets[name]
                elif (packed := _packed(needle, data, dtype)) is not None:
                    found.append(Violation(name, c.nbytes, f"copies weight {w.name} ({form}{cast}, all of it, "
                                           f"packed at byte {packed:,} among other values)"))
                    del targets[name]
    return found


def _needle(constant: ir.TensorProtocol, data: bytes, dtype: ir.DataType) -> bytes | None:
    """``constant``'s bytes as a tensor of ``dtype`` would hold them: as they are, or cast where the cast is exact
    (an fp32 copy of a bf16 weight is the weight's values widened); None where it cannot be a copy in ``dtype``."""
    if constant.dtype == dtype:
        return data
    if constant.dtype not in FLOATS or dtype not in FLOATS:
        return None
    values = constant.numpy()
    narrowed = values.astype(FLOATS[dtype])
    exact = np.array_equal(narrowed.astype(FLOATS[constant.dtype]), values)
    return narrowed.tobytes() if exact else None


def _packed(constant: bytes | None, weight: bytes, dtype: ir.DataType) -> int | None:
    """Where a weight of ``COPY_MIN_BYTES`` or more (not a fill) lies whole inside a larger constant's bytes."""
    if constant is None or len(weight) < COPY_MIN_BYTES or len(constant) <= len(weight) or _uniform(weight, dtype):
        return None
    return _find(constant, weight, dtype)


def _uniform(data: bytes, dtype: ir.DataType) -> bool:
    """Every element the same (a fill): such a tensor copies nothing learned."""
    size = max(int(dtype.itemsize), 1)
    elements = np.frombuffer(data, np.uint8)
    return len(elements) % size == 0 and bool((elements.reshape(-1, size) == elements[:size]).all())


def _forms(tensor: ir.TensorProtocol, dtypes: set[ir.DataType]) -> Iterator[tuple[str, ir.DataType, bytes]]:
    """The weight's bytes as stored and transposed (2-D), in its dtype; and cast to each half dtype in ``dtypes``
    that rounds it (an fp32 weight's fp16 / bf16 copies; a wider copy is found by narrowing the copy, ``_needle``)."""
    if tensor.dtype not in FLOATS:
        yield "as stored", tensor.dtype, tensor.tobytes()
        return
    array = tensor.numpy()
    layouts = [("as stored", array)] + ([("transposed", array.T)] if array.ndim == 2 and min(array.shape) > 1 else [])
    narrower = [d for d in FLOATS if d in dtypes and FLOATS[d].itemsize < FLOATS[tensor.dtype].itemsize]
    for label, values in layouts:
        values = np.ascontiguousarray(values)
        yield label, tensor.dtype, values.tobytes()
        for dtype in narrower:
            yield label, dtype, values.astype(FLOATS[dtype]).tobytes()


def _find(data: bytes, needle: bytes | None, dtype: ir.DataType) -> int | None:
    """The first element-aligned byte offset of ``needle`` in ``data``."""
    if needle is None:
        return None
    size = max(int(dtype.itemsize), 1)
    start = data.find(needle)
    while start >= 0 and start % size:
        start = data.find(needle, start + 1)
    return start if start >= 0 else None
