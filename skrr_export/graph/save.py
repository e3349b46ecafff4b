"""Saving an onnx_ir model at the memory floor: the file is written tensor by tensor, never whole in memory.

``onnx_ir.save`` builds the whole ModelProto (every weight copied into it) and then its serialization (a second copy)
before writing: three copies of the weights at the peak (DESIGN.md section 7: 3.9 GiB for 0.81 GiB of bf16 weights).
Here the model is serialized once with its large initializers hollow (no data), and the file is written from that
small serialization: protobuf writes a message's fields one after another, so each hollow ``raw_data`` field is
written with its tensor's bytes instead, one tensor at a time, and the lengths of the messages around them (the
TensorProto, the GraphProto) are computed from the tensors' sizes up front. The bytes are those ``onnx_ir.save``
writes for the same model (tests/test_save_streaming.py). With external data the weights go to ``NAME.data`` the
way the exporter's own save writes them (onnx_ir streams those already).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import onnx
import onnx_ir as ir

from ..artifacts import unique_sibling
from ..errors import InvariantError
from .read import refer_to_file
from .wire import (GRAPH_INITIALIZER, LENGTH_DELIMITED, MODEL_GRAPH, TENSOR_NAME, TENSOR_RAW_DATA, fields,
                   varint)

STREAM_MIN_BYTES = 4096  # smaller initializers stay inside the serialized model
Part = Union[bytes, "_Data"]  # a piece of the file: bytes as they are, or a tensor's data


def save_model(model: ir.Model, path: Path, external_data: bool) -> None:
    """Write ``model`` to ``path`` (with ``external_data``, its initializers to ``path.data`` beside it) and check the
    file with ``onnx.checker`` (InvariantError), without reading the weights back."""
    if external_data:
        ir.save(model, os.fspath(path), external_data=path.name + ".data")  # as torch's ONNXProgram.save does
        _checker(path)  # the small proto; the data file is only looked up
    else:
        save_streaming(model, path)


def save_streaming(model: ir.Model, path: Path) -> None:
    """One file, the bytes ``onnx_ir.save(model, path)`` writes, holding one tensor's bytes at a time."""
    hollow = _hollow_initializers(model)
    try:
        serialized = ir.serde.serialize_model(model).SerializeToString()
    finally:
        for value, (tensor, _) in hollow.items():
            value.const_value = tensor
    parts = _model_parts(serialized, {name: tensor for tensor, name in hollow.values()})
    try:
        offsets = _write(parts, path)
        check_saved(serialized, offsets, path)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


class _Hollow:
    """A tensor's name, dtype and shape without its data: what the small serialization holds in its place."""

    def __init__(self, tensor: ir.TensorProtocol):
        self.name, self.dtype, self.shape = tensor.name, tensor.dtype, tensor.shape
        self.doc_string, self.metadata_props, self.meta = tensor.doc_string, tensor.metadata_props, tensor.meta

    def tobytes(self) -> bytes:
        return b""


def _hollow_initializers(model: ir.Model) -> dict[ir.Value, tuple[ir.TensorProtocol, str]]:
    """Replace each large in-memory initializer of the main graph by a ``_Hollow``; value -> (tensor, name)."""
    hollow = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < STREAM_MIN_BYTES or tensor.dtype == ir.DataType.STRING:
            continue
        if isinstance(tensor, (ir.ExternalTensor, ir.serde.TensorProtoTensor)):
            continue  # serialized as they are (an external reference, a proto already in memory)
        hollow[value] = (tensor, name)
        value.const_value = _Hollow(tensor)
    return hollow


@dataclass(frozen=True)
class _Data:
    """Where a hollow initializer's bytes go in the file."""

    name: str
    tensor: ir.TensorProtocol


def _write(parts: list[Part], path: Path) -> dict[str, tuple[int, int]]:
    """Write ``parts`` to ``path``, one tensor's bytes at a time; each tensor's (offset, length) in the file."""
    offsets = {}
    with open(path, "wb") as f:
        for part in parts:
            if isinstance(part, bytes):
                f.write(part)
                continue
            data = part.tensor.tobytes()
            if len(data) != part.tensor.nbytes:
                raise InvariantError(f"initializer {part.name} holds {len(data)} bytes, not the {part.tensor.nbytes} "
                                     "its shape says")
            offsets[part.name] = (f.tell(), len(data))
            f.write(data)
    return offsets


def check_saved(serialized: bytes, offsets: dict[str, tuple[int, int]], path: Path) -> None:
    """``onnx.checker`` on the saved model without reading its weights back: the small serialization, each streamed
    initializer pointing at its bytes inside ``path`` (as external data), checked from a hidden sibling file."""
    proto = onnx.ModelProto()
    proto.ParseFromString(serialized)
    refer_to_file(proto, offsets, path.name)
    probe = unique_sibling(path, "check")
    try:
        probe.write_bytes(proto.SerializeToString())
        _checker(probe)
    finally:
        probe.unlink(missing_ok=True)


def _checker(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise InvariantError(f"exported ONNX fails onnx.checker: {str(exc).splitlines()[0]}") from None


def _size(parts: list[Part]) -> int:
    return sum(len(p) if isinstance(p, bytes) else int(p.tensor.nbytes) for p in parts)


def _nested(number: int, parts: list[Part]) -> list[Part]:
    """A length-delimited field holding ``parts``: its key and length, then the parts."""
    return [varint(number << 3 | LENGTH_DELIMITED) + varint(_size(parts)), *parts]


def _model_parts(buf: bytes, hollow: dict[str, ir.TensorProtocol]) -> list[Part]:
    parts: list[Part] = []
    for number, start, value, end in fields(buf, 0, len(buf)):
        parts += _nested(number, _graph_parts(buf, value, end, hollow)) if number == MODEL_GRAPH else [buf[start:end]]
    if hollow:
        raise InvariantError(f"initializers {', '.join(sorted(hollow)[:3])} were not found while saving the ONNX model")
    return parts


def _graph_parts(buf: bytes, start: int, end: int, hollow: dict[str, ir.TensorProtocol]) -> list[Part]:
    parts: list[Part] = []
    for number, field_start, value, field_end in fields(buf, start, end):
        if number == GRAPH_INITIALIZER:
            parts += _nested(number, _tensor_parts(buf, value, field_end, hollow))
        else:
            parts.append(buf[field_start:field_end])
    return parts


def _tensor_parts(buf: bytes, start: int, end: int, hollow: dict[str, ir.TensorProtocol]) -> list[Part]:
    """A TensorProto's fields; a hollow tensor's empty ``raw_data`` becomes its data."""
    found = list(fields(buf, start, end))
    names = [buf[v:e].decode() for n, _, v, e in found if n == TENSOR_NAME]
    tensor = hollow.pop(names[0], None) if names else None
    parts: list[Part] = []
    for number, field_start, value, field_end in found:
        if tensor is not None and number == TENSOR_RAW_DATA and value == field_end:
            parts += [varint(number << 3 | LENGTH_DELIMITED) + varint(int(tensor.nbytes)), _Data(names[0], tensor)]
            tensor = None
        else:
            parts.append(buf[field_start:field_end])
    if tensor is not None:
        raise InvariantError(f"initializer {names[0]} has no empty raw_data field to fill while saving the ONNX model")
    return parts
