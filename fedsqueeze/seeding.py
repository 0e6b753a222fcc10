"""The one seeding helper: every random choice of a run draws from a seed derived from its purpose.

`derive_seed(run seed, round, client id, purpose, ...)` is the same on every machine and process,
so the same config and seed give the same run on every backend, whatever the order of calls.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from (run seed, round, client id, purpose, ...), the same on every machine."""
    text = "\x1f".join(repr(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1


def generator(*parts: object) -> torch.Generator:
    """A CPU torch.Generator seeded from `derive_seed(*parts)`."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))
