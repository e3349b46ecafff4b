"""Reading an ONNX file: the one reader of the ONNX layer (external data stays on disk until read), and a proto (or
model) of the file whose weights stay in it (``proto_referencing_weights``, ``model_referencing_weights``), for
rewritten copies that run beside it."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import onnx
import onnx_ir as ir

from ..artifacts import check_onnx_files, check_onnx_model
from ..errors import ArtifactError
from .wire import GRAPH_INITIALIZER, LENGTH_DELIMITED, MODEL_GRAPH, TENSOR_NAME, TENSOR_RAW_DATA, fields, varint

REFERENCED_MIN_BYTES = 4096  # smaller initializers are copied into the proto (rewrites may read them)


def read_model(path: Path) -> ir.Model:
    """The model at ``path``, once it and every external data file it names are known to be there."""
    check_onnx_files(path)
    try:
        return ir.load(os.fspath(path))
    except Exception as exc:  # protobuf's DecodeError and the like
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(exc).__name__}); export it again") from None


def proto_referencing_weights(path: Path) -> onnx.ModelProto:
    """The ModelProto at ``path`` with every initializer of ``REFERENCED_MIN_BYTES`` or more held inside the file left
    there: the tensor becomes external data pointing at its bytes in ``path`` (location, offset, length), so the
    proto holds no weight. Saved beside ``path``, it is a model that runs on the original's weights without a copy;
    initializers already external keep their references. Reads only the file's small fields (mapped), and checks
    them as ``check_onnx_files`` does (which would read the whole file)."""
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist")
    proto = onnx.ModelProto()
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            small, references = _without_raw_data(buf)
        proto.ParseFromString(small)
    except Exception as exc:  # an empty file (mmap), a truncated one, protobuf's DecodeError
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(exc).__name__}); export it again") from None
    check_onnx_model(path, proto)
    refer_to_file(proto, references, path.name)
    return proto


def model_referencing_weights(path: Path) -> ir.Model:
    """``proto_referencing_weights`` as an onnx_ir model: its weights are external tensors that nothing loads until
    read; rewritten by passes that read no weight values and saved beside ``path`` (``onnx_ir.save``), it runs on the
    original's weights without a copy."""
    return ir.serde.deserialize_model(proto_referencing_weights(path))


def refer_to_file(proto: onnx.ModelProto, offsets: dict[str, tuple[int, int]], location: str) -> None:
    """Each initializer named in ``offsets`` (name -> (offset, length)) becomes external data at those bytes of the
    file ``location`` beside the model, its raw_data dropped."""
    for tensor in proto.graph.initializer:
        if tensor.name in offsets:
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset, length = offsets[tensor.name]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value


def _without_raw_data(buf: mmap.mmap) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The file's model with large raw_data fields left out; tensor name -> (offset, length) of each one left out."""
    references: dict[str, tuple[int, int]] = {}
    out = bytearray()
    for number, start, value, end in fields(buf, 0, len(buf)):
        if number != MODEL_GRAPH:
            out += buf[start:end]
            continue
        graph = bytearray()
        for g_number, g_start, g_value, g_end in fields(buf, value, end):
            if g_number == GRAPH_INITIALIZER:
                graph += _delimited(g_number, _tensor_without_raw_data(buf, g_value, g_end, references))
            else:
                graph += buf[g_start:g_end]
        out += _delimited(number, graph)
    return bytes(out), references


def _tensor_without_raw_data(buf: mmap.mmap, start: int, end: int, references: dict[str, tuple[int, int]]) -> bytes:
    found = list(fields(buf, start, end))
    names = [bytes(buf[v:e]).decode() for n, _, v, e in found if n == TENSOR_NAME]
    out = bytearray()
    for number, field_start, value, field_end in found:
        if number == TENSOR_RAW_DATA and names and field_end - value >= REFERENCED_MIN_BYTES:
            references[names[0]] = (value, field_end - value)
        else:
            out += buf[field_start:field_end]
    return bytes(out)


def _delimited(number: int, payload: bytes | bytearray) -> bytes:
    return varint(number << 3 | LENGTH_DELIMITED) + varint(len(payload)) + bytes(payload)
