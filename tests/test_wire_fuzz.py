"""Hostile input: random bytes, truncations and bit flips of valid payloads make decode raise
PayloadError or return a valid payload, never anything else; valid random payloads round-trip."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_wire import assert_round_trip, bits_of, random_payload

from fedsqueeze.compressors.compressed import Compressed
from fedsqueeze.wire import PayloadError, decode, encode

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NUMELS = [0, 1, 2, 5, 8, 17, 100, 1000]


def payload_bytes(seed: int, n: int) -> bytes:
    return encode(random_payload(np.random.default_rng(seed), n))


def decodes_or_refuses(data: bytes, numel: int) -> None:
    """decode either raises PayloadError or returns a payload that is valid in every respect."""
    try:
        c = decode(data, numel)
    except PayloadError:
        return
    assert isinstance(c, Compressed) and c.numel == numel
    x = c.to_dense()
    assert x.shape == (numel,) and x.dtype == c.dtype
    assert torch.equal(bits_of(decode(encode(c), numel).to_dense()), bits_of(x))


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(NUMELS))
def test_random_bytes(data, numel):
    decodes_or_refuses(data, numel)


@FUZZ
@given(st.integers(0, 2**32), st.sampled_from(NUMELS), st.data())
def test_truncations(seed, n, draw):
    data = payload_bytes(seed, n)
    for cut in draw.draw(st.lists(st.integers(0, max(len(data) - 1, 0)), min_size=1, max_size=8)):
        decodes_or_refuses(data[:cut], n)


def test_every_truncation_of_some_payloads():
    for seed in range(6):
        data = payload_bytes(seed, 40)
        for cut in range(len(data)):
            decodes_or_refuses(data[:cut], 40)


@FUZZ
@given(st.integers(0, 2**32), st.sampled_from(NUMELS), st.data())
def test_bit_flips(seed, n, draw):
    data = bytearray(payload_bytes(seed, n))
    flips = draw.draw(st.lists(st.integers(0, 8 * len(data) - 1), min_size=1, max_size=4))
    for bit in flips:
        data[bit >> 3] ^= 1 << (bit & 7)
    decodes_or_refuses(bytes(data), n)


@FUZZ
@given(st.integers(0, 2**32), st.sampled_from(NUMELS), st.data())
def test_byte_overwrites_and_wrong_numel(seed, n, draw):
    data = bytearray(payload_bytes(seed, n))
    if data:
        at = draw.draw(st.integers(0, len(data) - 1))
        data[at] = draw.draw(st.integers(0, 255))
    decodes_or_refuses(bytes(data), n)
    decodes_or_refuses(bytes(data), draw.draw(st.sampled_from(NUMELS)))


@FUZZ
@given(st.integers(0, 2**32), st.sampled_from(NUMELS))
def test_random_payloads_round_trip_exactly(seed, n):
    assert_round_trip(random_payload(np.random.default_rng(seed), n))


INTERESTING = [0, 1, 2, 3, 7, 8, 9, 31, 32, 33, 63, 64, 255, 277, 278, 1000, 2**31 - 1, 2**31, 2**32 - 1]


def _fields(msg, out: list) -> list:
    """Every (message, field descriptor) set in msg and its sub-messages."""
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            out.append((msg, fd))
        elif fd.is_repeated:
            for item in value:
                _fields(item, out)
        else:
            _fields(value, out)
    return out


def mutate(msg, rng: np.random.Generator) -> None:
    """Set one scalar or bytes field of the message tree to a boundary or random value."""
    fields = _fields(msg, [])
    if not fields:
        return
    owner, fd = fields[rng.integers(len(fields))]
    if fd.type == fd.TYPE_BYTES:
        data = getattr(owner, fd.name)
        choice = rng.integers(4)
        if choice == 0 and data:
            data = data[: rng.integers(len(data))]
        elif choice == 1:
            data = data + bytes(rng.integers(0, 256, rng.integers(1, 9), dtype=np.uint8))
        elif choice == 2 and data:
            arr = bytearray(data)
            arr[rng.integers(len(arr))] = int(rng.integers(256))
            data = bytes(arr)
        else:
            data = bytes(rng.integers(0, 256, len(data), dtype=np.uint8))
        setattr(owner, fd.name, data)
    elif fd.type == fd.TYPE_FLOAT:
        setattr(owner, fd.name, float(rng.choice([0.0, -1.0, 1e38, float("inf"), float("nan")])))
    elif fd.type == fd.TYPE_ENUM:
        setattr(owner, fd.name, int(rng.integers(0, 6)))
    else:
        top = 2**32 - 1 if fd.type == fd.TYPE_UINT32 else 2**64 - 1
        value = int(rng.choice(INTERESTING + [top])) if rng.random() < 0.7 else int(rng.integers(0, 2**31))
        current = getattr(owner, fd.name)
        if rng.random() < 0.3:
            value = max(0, current + int(rng.choice([-1, 1])))
        setattr(owner, fd.name, min(value, top))


@FUZZ
@given(st.integers(0, 2**32), st.sampled_from(NUMELS), st.integers(0, 2**32))
def test_structured_field_mutations(seed, n, mutation_seed):
    from fedsqueeze.protos.fedsqueeze.v1 import payload_pb2 as pb

    msg = pb.Payload.FromString(payload_bytes(seed, n))
    rng = np.random.default_rng(mutation_seed)
    for _ in range(rng.integers(1, 4)):
        mutate(msg, rng)
    decodes_or_refuses(msg.SerializeToString(), n)
