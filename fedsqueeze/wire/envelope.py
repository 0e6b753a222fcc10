"""The protobuf envelope without copies of its large bytes fields, in both directions.

The protobuf runtime copies a bytes field when it is set, again when the message is serialised
and again when the result becomes a Python bytes object; parsing copies the input and every read
of a field copies that field. For a payload of 40 MB that is most of the codec's time. So:

- Encoding: `collecting()` makes `put_bytes` keep each bytes field aside (any buffer: numpy
  arrays, bytes) instead of setting it on the message, and `serialize` writes the message itself
  (tags, varints, lengths, from the descriptors) around those buffers, which `bytes.join` then
  copies exactly once into the output. The result is byte for byte protobuf's serialisation
  (fields in field-number order, defaults of proto3 fields without presence left out);
  tests compare the two.
- Decoding: `parse` reads a message written the way `serialize` writes it (known fields only,
  each at most once, right wire types, integers within their type) into light objects whose
  bytes fields are read-only memoryviews of the input: no copies. Anything else (unknown or
  repeated fields, two members of a oneof, odd varints, deep nesting) returns None and the caller
  parses with protobuf, whose semantics for such input (last one wins, merging, truncation) then
  apply unchanged; on the inputs `parse` accepts both parsers agree.
"""

from __future__ import annotations

import struct
from contextlib import contextmanager
from contextvars import ContextVar

from google.protobuf.descriptor import FieldDescriptor as FD

# message id -> (the message, kept alive so that its id stays its own; {field name: buffer})
_pending: ContextVar[dict | None] = ContextVar("fedsqueeze_wire_pending", default=None)

_VARINT_TYPES = {FD.TYPE_UINT32: 32, FD.TYPE_UINT64: 64, FD.TYPE_ENUM: 31}
_FLOAT = struct.Struct("<f")
# below protobuf's own recursion limit (100); valid payloads nest far less deep
_MAX_PARSE_DEPTH = 64
# valid payloads have a few dozen fields (LowRank: six per block); a message of many tiny fields
# is left to protobuf, which walks them faster than Python does
_MAX_PARSE_FIELDS = 1 << 14


# ---------------------------------------------------------------------------------------------
# encoding


@contextmanager
def collecting():
    """Within this block `put_bytes` defers bytes fields for `serialize`."""
    token = _pending.set({})
    try:
        yield
    finally:
        _pending.reset(token)


def put_bytes(msg, name: str, data) -> None:
    """Set bytes field `name` of `msg` to `data` (bytes or a C-contiguous numpy array), deferred
    to `serialize` inside `collecting()`, else set at once (tests fill messages directly)."""
    pending = _pending.get()
    if pending is None:
        setattr(msg, name, data if isinstance(data, bytes) else data.tobytes())
        return
    if len(memoryview(data).cast("B")) == 0:
        setattr(msg, name, b"")  # small: protobuf's own semantics (sent only if in a oneof)
        return
    oneof = msg.DESCRIPTOR.fields_by_name[name].containing_oneof
    if oneof is not None:
        msg.ClearField(oneof.name)  # as setting a member clears the others
    msg.SetInParent()  # as setting a field makes the message present in its parent
    pending.setdefault(id(msg), (msg, {}))[1][name] = data


def serialize(msg) -> bytes:
    """The serialisation of `msg` with the fields `put_bytes` deferred, in one copy."""
    pending = _pending.get() or {}
    chunks: list = []
    seen: set[int] = set()
    _write(msg, pending, chunks, seen)
    if len(seen) != len(pending):  # a deferred field whose message the walk did not meet
        for holder, fields in pending.values():
            for name, data in fields.items():
                setattr(holder, name, bytes(memoryview(data).cast("B")))
        return msg.SerializeToString()
    return b"".join(chunks)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _write(msg, pending: dict, chunks: list, seen: set) -> int:
    """Append the fields of msg to chunks; return their size in bytes."""
    entry = pending.get(id(msg))
    deferred = {}
    if entry is not None and entry[0] is msg:
        seen.add(id(msg))
        deferred = {msg.DESCRIPTOR.fields_by_name[name]: data for name, data in entry[1].items()}
    fields = [(f, v) for f, v in msg.ListFields() if f not in deferred] + list(deferred.items())
    fields.sort(key=lambda item: item[0].number)
    size = 0
    for f, value in fields:
        values = value if f.is_repeated else (value,)
        for v in values:
            if f.type == FD.TYPE_MESSAGE:
                head = len(chunks)
                chunks.append(b"")  # tag and length, once the length is known
                inner = _write(v, pending, chunks, seen)
                chunks[head] = _varint(f.number << 3 | 2) + _varint(inner)
                size += len(chunks[head]) + inner
            elif f.type == FD.TYPE_BYTES:
                view = memoryview(v).cast("B") if not isinstance(v, bytes) else v
                chunks.append(_varint(f.number << 3 | 2) + _varint(len(view)))
                chunks.append(view)
                size += len(chunks[-2]) + len(view)
            elif f.type in _VARINT_TYPES:
                if v < 0:  # negative enums: ten-byte two's complement, as protobuf writes them
                    v += 1 << 64
                chunks.append(_varint(f.number << 3) + _varint(v))
                size += len(chunks[-1])
            elif f.type == FD.TYPE_FLOAT:
                chunks.append(_varint(f.number << 3 | 5) + _FLOAT.pack(v))
                size += len(chunks[-1])
            else:  # pragma: no cover - the schema has no other field types
                raise TypeError(f"field {f.full_name}: type {f.type} is not supported")
    return size


# ---------------------------------------------------------------------------------------------
# decoding


class Parsed:
    """A parsed message: attribute access, HasField and WhichOneof as on protobuf messages."""

    __slots__ = ("DESCRIPTOR", "_fields")

    def __init__(self, descriptor, fields: dict):
        self.DESCRIPTOR = descriptor
        self._fields = fields

    def __getattr__(self, name: str):
        try:
            return self._fields[name]
        except KeyError:
            pass
        f = self.DESCRIPTOR.fields_by_name.get(name)
        if f is None:
            raise AttributeError(name)
        if f.is_repeated:
            return []
        if f.type == FD.TYPE_MESSAGE:
            return Parsed(f.message_type, {})
        return f.default_value

    def HasField(self, name: str) -> bool:  # noqa: N802 - the protobuf name
        return name in self._fields

    def WhichOneof(self, name: str) -> str | None:  # noqa: N802 - the protobuf name
        for f in self.DESCRIPTOR.oneofs_by_name[name].fields:
            if f.name in self._fields:
                return f.name
        return None


class _NotCanonical(Exception):
    pass


def parse(data: bytes, descriptor) -> Parsed | None:
    """The message in `data`, or None where protobuf must parse it (see the module docstring)."""
    try:
        return _parse(memoryview(data).cast("B"), descriptor, 0, [_MAX_PARSE_FIELDS])
    except _NotCanonical:
        return None


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _NotCanonical
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _parse(buf: memoryview, descriptor, depth: int, budget: list[int]) -> Parsed:
    if depth > _MAX_PARSE_DEPTH:
        raise _NotCanonical
    fields: dict = {}
    oneofs: set[str] = set()
    pos, end = 0, len(buf)
    while pos < end:
        budget[0] -= 1
        if budget[0] < 0:
            raise _NotCanonical
        tag, pos = _read_varint(buf, pos, end)
        f = descriptor.fields_by_number.get(tag >> 3)
        wire = tag & 7
        if f is None:
            raise _NotCanonical
        repeated = f.is_repeated
        if f.name in fields and not repeated:
            raise _NotCanonical
        if f.containing_oneof is not None:
            if f.containing_oneof.name in oneofs:
                raise _NotCanonical
            oneofs.add(f.containing_oneof.name)
        if f.type in _VARINT_TYPES:
            if wire != 0:
                raise _NotCanonical
            value, pos = _read_varint(buf, pos, end)
            if value >> _VARINT_TYPES[f.type]:
                raise _NotCanonical
        elif f.type == FD.TYPE_FLOAT:
            if wire != 5 or pos + 4 > end:
                raise _NotCanonical
            (value,) = _FLOAT.unpack_from(buf, pos)
            pos += 4
        elif f.type in (FD.TYPE_BYTES, FD.TYPE_MESSAGE):
            if wire != 2:
                raise _NotCanonical
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise _NotCanonical
            value = buf[pos : pos + length].toreadonly()
            pos += length
            if f.type == FD.TYPE_MESSAGE:
                value = _parse(value, f.message_type, depth + 1, budget)
        else:  # pragma: no cover - the schema has no other field types
            raise _NotCanonical
        if repeated:
            if f.type != FD.TYPE_MESSAGE:
                raise _NotCanonical  # packed scalars: protobuf's business
            fields.setdefault(f.name, []).append(value)
        else:
            fields[f.name] = value
    return Parsed(descriptor, fields)
