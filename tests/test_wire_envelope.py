"""The copy-free envelope writes exactly protobuf's bytes, and its parser agrees with protobuf's
on everything it accepts (it hands anything unusual to protobuf)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_wire import bits_of, random_payload

from fedsqueeze.protos.fedsqueeze.v1 import payload_pb2 as pb
from fedsqueeze.wire import PayloadError, decode, encode, envelope

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same_message(parsed, msg) -> bool:
    """Whether a Parsed and a protobuf message hold the same fields and values."""
    if {f.name for f, _ in msg.ListFields()} != set(parsed._fields):
        return False
    for f, value in msg.ListFields():
        mine = getattr(parsed, f.name)
        if f.type == f.TYPE_MESSAGE:
            items = list(zip(mine, value, strict=True)) if f.is_repeated else [(mine, value)]
            if not all(same_message(a, b) for a, b in items):
                return False
        elif f.type == f.TYPE_BYTES:
            if bytes(mine) != value:
                return False
        elif mine != value and not (mine != mine and value != value):  # NaN floats
            return False
    return True


@FUZZ
@given(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 5, 17, 100, 1000]))
def test_encode_writes_protobufs_serialisation_and_parse_reads_it(seed, n):
    data = encode(random_payload(np.random.default_rng(seed), n))
    msg = pb.Payload.FromString(data)
    assert msg.SerializeToString() == data
    parsed = envelope.parse(data, pb.Payload.DESCRIPTOR)
    assert parsed is not None and same_message(parsed, msg)


@FUZZ
@given(st.binary(max_size=300))
def test_parse_agrees_with_protobuf_or_declines(data):
    parsed = envelope.parse(data, pb.Payload.DESCRIPTOR)
    if parsed is None:
        return
    assert same_message(parsed, pb.Payload.FromString(data))


def test_unusual_messages_are_left_to_protobuf():
    msg = pb.Payload(version=1, numel=3, dtype=pb.DTYPE_FLOAT32)
    msg.sign.scale = 1.0
    msg.sign.negative = b"\x05"
    data = msg.SerializeToString()
    twice = data + msg.SerializeToString()  # every field again: protobuf keeps the last
    unknown = data + b"\xf8\x01\x07"  # field 31, a varint
    for odd in (twice, unknown):
        assert envelope.parse(odd, pb.Payload.DESCRIPTOR) is None
        assert decode(odd, 3).negative.tolist() == [True, False, True]


def test_decoded_values_do_not_alias_the_input():
    x = torch.randn(1000)
    buffer = bytearray(encode(identity_payload(x)))
    c = decode(buffer, 1000)
    buffer[-4:] = b"\x00\x00\xc0\x7f"  # the caller reuses its buffer: the payload keeps its values
    assert torch.equal(bits_of(c.to_dense()), bits_of(x))
    c.values.add_(1.0)  # and writing into a decoded tensor is allowed: it owns its memory
    with pytest.raises(PayloadError):
        decode(bytes(buffer), 1000)


def identity_payload(x):
    from fedsqueeze.compressors import build

    return build("identity").compress(x)
