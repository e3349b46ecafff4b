"""The protobuf wire format, as far as the ONNX layer walks it: a message's fields with their offsets, so that a
file can be written (graph.save) or referenced (graph.read) tensor by tensor without parsing the weights."""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import InvariantError

MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_NAME, TENSOR_RAW_DATA = 7, 5, 8, 9  # field numbers in onnx.proto
LENGTH_DELIMITED = 2


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value, shift, pos = value | (byte & 0x7F) << shift, shift + 7, pos + 1
        if not byte & 0x80:
            return value, pos


def fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, field start, value start, field end) of each field of the message in ``buf[start:end]``;
    the value of a length-delimited field is ``buf[value start:field end]``."""
    pos = start
    while pos < end:
        key, value_start = read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            field_end = read_varint(buf, value_start)[1]
        elif wire == LENGTH_DELIMITED:
            length, value_start = read_varint(buf, value_start)
            field_end = value_start + length
        elif wire in (1, 5):
            field_end = value_start + (8 if wire == 1 else 4)
        else:
            raise InvariantError(f"unexpected protobuf wire type {wire} in an ONNX file")
        yield key >> 3, pos, value_start, field_end
        pos = field_end
