"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^256 + 297) (Shamir 1979).

A secret s < 2^256 is the constant term of a random polynomial f of degree t - 1; the share of the
party with x-coordinate x > 0 is f(x). Any t shares give s back by Lagrange interpolation at 0, and
fewer give no information about it. The coefficients come from the operating system's randomness
(`secrets`), never from a seed the server could know. Python integers: at t = 100 a reconstruction
costs about a hundred modular inversions (milliseconds).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

#: the smallest prime above 2^256, so that every 32-byte secret is a field element
PRIME = 2**256 + 297
SECRET_BYTES = 32
#: a share is a field element, big-endian
SHARE_BYTES = 33


class ShamirError(ValueError):
    """Shares that cannot give the secret back (too few, malformed, repeated x); the message says why."""


def split(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, bytes]:
    """The share of `secret` for every x in `xs` (distinct, 1 <= x < PRIME); any `threshold` of them
    reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    points = list(xs)
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise ShamirError(f"share x-coordinates must be distinct and in 1..PRIME-1, got {points}")
    if not 1 <= threshold <= len(points):
        raise ShamirError(f"threshold {threshold} must be in 1..{len(points)} (the number of shares)")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in points:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least `threshold` shares {x: share} (the first `threshold` by x are used)."""
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, fewer than the threshold {threshold}: the secret stays hidden")
    points = sorted(shares)[:threshold]
    values = []
    for x in points:
        data = shares[x]
        if not isinstance(data, bytes) or len(data) != SHARE_BYTES:
            raise ShamirError(f"the share at x = {x} is not {SHARE_BYTES} bytes")
        y = int.from_bytes(data, "big")
        if y >= PRIME or not 0 < x < PRIME:
            raise ShamirError(f"the share at x = {x} is not a field element")
        values.append(y)
    secret = 0
    for j, (xj, yj) in enumerate(zip(points, values, strict=True)):
        num, den = 1, 1
        for m, xm in enumerate(points):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ShamirError("the shares are inconsistent: they interpolate to no 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
