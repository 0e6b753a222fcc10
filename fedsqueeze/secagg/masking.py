"""Masks in Z_{2^w}: key agreement, key derivation, the pseudo-random generator, and the arithmetic.

Every primitive is the `cryptography` package's (Bonawitz et al., CCS 2017, section 4):
- key agreement: X25519; a pair's secret s_ij = HKDF-SHA256(X25519(s_sk_i, s_pk_j), salt = ctx,
  info = "pair" | min(i, j) | max(i, j)) is the same on both sides and bound to the round's context
  ctx (run, round, server nonce, parameters), so no key or stream is ever reused across rounds;
- the self mask's key is HKDF(b_i, salt = ctx, info = "self") from the client's 32-byte seed b_i;
- the generator: the ChaCha20 keystream of a key (zero nonce: each key makes one stream only), read
  as little-endian words of w = 16 or 32 bits, uniform on Z_{2^w};
- y_i = q_i + PRG(self_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)  (mod 2^w): summed over
  the clients that sent y, the pairwise terms cancel, and the server removes the self masks from the
  seeds b_i (and a dropped client's pairwise terms from its s_sk) that the survivors' shares give back.
numpy's unsigned arrays wrap modulo 2^w in array-array additions, which is the arithmetic here; every
operand stays in the word's own dtype (mixing in int64 would promote and stop wrapping).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
#: word widths the masked vectors use (numpy dtypes wrap at them)
WORDS = {16: np.dtype("<u2"), 32: np.dtype("<u4")}
_ZERO_NONCE = bytes(16)


def modulus_bits(contributors: int, bits: int) -> int:
    """The least m with contributors * (2^bits - 1) < 2^m: a sum of that many b-bit values never wraps."""
    if contributors < 1 or bits < 1:
        raise ValueError(f"need at least one contributor and one bit, got {contributors} and {bits}")
    return math.ceil(math.log2(contributors * (2**bits - 1) + 1))


def word_bits(contributors: int, bits: int) -> int:
    """The word width (16 or 32) that holds the sum of `contributors` values of `bits` bits."""
    m = modulus_bits(contributors, bits)
    for w in WORDS:
        if m <= w:
            return w
    raise ValueError(f"{contributors} values of {bits} bits need {m}-bit sums, more than 32 bits")


def derive(secret: bytes, ctx: bytes, info: bytes) -> bytes:
    """A 32-byte key from `secret`, bound to the round context and a purpose."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=ctx, info=info).derive(secret)


def pair_info(purpose: bytes, i: int, j: int) -> bytes:
    lo, hi = sorted((i, j))
    return purpose + lo.to_bytes(8, "big") + hi.to_bytes(8, "big")


def agree(own: bytes, peer_public: bytes, ctx: bytes, purpose: bytes, i: int, j: int) -> bytes:
    """The key clients i and j both derive from X25519 (own private key, the other's public key)."""
    shared = X25519PrivateKey.from_private_bytes(own).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return derive(shared, ctx, pair_info(purpose, i, j))


def new_keypair() -> tuple[bytes, bytes]:
    """(private, public) raw 32-byte X25519 keys from the operating system's randomness."""
    key = X25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def stream(key: bytes, length: int, word: int) -> np.ndarray:
    """`length` words of `word` bits, uniform on Z_{2^word}: the ChaCha20 keystream of `key`."""
    dtype = WORDS[word]
    encryptor = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(length * dtype.itemsize)), dtype=dtype).copy()


SELF, PAIR = b"fedsqueeze/secagg/self", b"fedsqueeze/secagg/pair"


def self_mask(seed: bytes, ctx: bytes, length: int, word: int) -> np.ndarray:
    return stream(derive(seed, ctx, SELF), length, word)


def apply_pairs(out: np.ndarray, own: int, pair_keys: Mapping[int, bytes], word: int, sign: int = 1) -> None:
    """out += sign * (sum_{j > own} PRG(s_ij) - sum_{j < own} PRG(s_ij)), in place, modulo 2^word."""
    for j, key in pair_keys.items():
        if j == own:
            continue
        noise = stream(key, out.size, word)
        if (j > own) == (sign > 0):
            out += noise
        else:
            out -= noise


def mask(q: np.ndarray, own: int, seed: bytes, pair_keys: Mapping[int, bytes], ctx: bytes, word: int) -> np.ndarray:
    """y = q + self mask + pairwise masks (mod 2^word); `pair_keys` holds s_ij for every other j."""
    dtype = WORDS[word]
    if q.dtype != dtype or q.ndim != 1:
        raise ValueError(f"expected a flat {dtype} vector, got {q.dtype} of shape {q.shape}")
    y = q.copy()
    y += self_mask(seed, ctx, q.size, word)
    apply_pairs(y, own, pair_keys, word)
    return y


def total(vectors: Iterable[np.ndarray], length: int, word: int) -> np.ndarray:
    """The sum of masked vectors modulo 2^word."""
    out = np.zeros(length, dtype=WORDS[word])
    for v in vectors:
        out += v
    return out
