"""An ONNX file's metadata properties, read without loading the model.

The model repository needs each plain ``.onnx`` file's name and version (written by training into
the file's ``metadata_props``) to decide what to serve, before it pays for an ONNX Runtime session.
The ``onnx`` package would parse the whole graph and is not a dependency of the service; the
metadata sits in top-level fields of the ``ModelProto`` message, so walking the protobuf wire
format at the top level, skipping every other field by its length, is enough.
"""

from __future__ import annotations

import mmap
from pathlib import Path

METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto
KEY, VALUE = 1, 2  # StringStringEntryProto.key, .value
VARINT, I64, LEN, I32 = 0, 1, 2, 5  # protobuf wire types


class NotOnnx(ValueError):
    """The bytes are not a well-formed protobuf message at the top level."""


def _varint(buf: bytes | mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise NotOnnx("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes | mmap.mmap, pos: int, end: int) -> list[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each field of the message in buf[pos:end]; for
    length-delimited fields start:end is the payload, for others the raw value bytes."""
    out = []
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise NotOnnx("field number 0")
        if wire == VARINT:
            _, after = _varint(buf, pos, end)
        elif wire == LEN:
            length, pos = _varint(buf, pos, end)
            after = pos + length
        elif wire == I64:
            after = pos + 8
        elif wire == I32:
            after = pos + 4
        else:
            raise NotOnnx(f"unsupported wire type {wire}")
        if after > end:
            raise NotOnnx("a field runs past the end of the file")
        out.append((number, wire, pos, after))
        pos = after
    return out


def read_metadata_props(path: Path) -> dict[str, str]:
    """The file's metadata properties (``key -> value``); raises OSError or :class:`NotOnnx`."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            raise NotOnnx(f"{path} is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            props: dict[str, str] = {}
            for number, wire, start, end in _fields(buf, 0, size):
                if number != METADATA_PROPS or wire != LEN:
                    continue
                entry = {n: bytes(buf[s:e]) for n, w, s, e in _fields(buf, start, end)
                         if w == LEN and n in (KEY, VALUE)}
                try:
                    key = entry.get(KEY, b"").decode()
                    props[key] = entry.get(VALUE, b"").decode()
                except UnicodeDecodeError as exc:
                    raise NotOnnx(f"metadata that is not UTF-8: {exc}") from None
            return props
