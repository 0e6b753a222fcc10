"""Compressed payloads <-> wire bytes: a versioned protobuf envelope around bit-packed data.

    data = encode(compressed)            # bytes, a serialized fedsqueeze.v1.Payload
    compressed = decode(data, numel)     # validated against the expected layout

`decode` raises PayloadError (a ValueError), and nothing else, for any malformed, truncated,
oversized or inconsistent input. The format is specified in protos/fedsqueeze/v1/payload.proto.
"""

from .codec import MAX_DEPTH, WIRE_VERSION, decode, encode
from .errors import PayloadError

__all__ = ["MAX_DEPTH", "WIRE_VERSION", "PayloadError", "decode", "encode"]
