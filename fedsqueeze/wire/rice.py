"""Rice (Golomb power-of-two) coding of non-negative integer sequences, as two streams.

A value v with parameter k is q = v >> k and r = v & (2^k - 1). The unary stream holds, for each
value in order, q zero bits then one one bit; the remainder stream holds the r's, k bits each,
as a fixed-width stream (see bits.py). Keeping the two apart makes both directions vectorised:
the encoder places the one bits at cumsum(q + 1) - 1, and the decoder finds them again.

The optimal k minimises n * (k + 1) + sum(v >> k). That cost is convex in k (its increments
n - sum(ceil((v >> k) / 2)) grow with k), so a local search from the mean's guess finds it in a
few vectorised passes; for small alphabets the same costs come from a histogram.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .bits import as_uint8, nbytes, pack_uint_array, popcount, unpack_uint
from .errors import PayloadError

# beyond this k the quotients of int64 values are 0 and a bigger k only costs more
MAX_K = 62
# values per chunk of the encoder and of the decoder's remainders (a multiple of 8): their
# temporaries stay in cache, and torch runs ops this small inline: at 2**16 values its thread
# pool takes part, and on a busy machine waiting for it made the encoder ten times slower
_CHUNK = 1 << 15
# bytes of the unary stream per chunk of the decoder (at most 8 times as many values)
_DECODE_BYTES = 1 << 13


@dataclass(frozen=True)
class RicePlan:
    """A parameter and the exact byte sizes of both streams for one sequence."""

    k: int
    unary_bytes: int
    remainder_bytes: int

    @property
    def nbytes(self) -> int:
        return self.unary_bytes + self.remainder_bytes


def _plan(n: int, k: int, quotient_sum: int) -> RicePlan:
    return RicePlan(k, nbytes(n + quotient_sum), nbytes(n * k))


def _search(n: int, total: int, cost) -> RicePlan:
    """The best plan, by local search on the convex bit cost n*(k+1) + cost(k)."""
    if n == 0:
        return RicePlan(0, 0, 0)
    mean = total / n
    k = max(0, min(MAX_K, int(math.log2(mean * math.log(2))) if mean >= 2 else 0))
    sums = {k: cost(k)}

    def bits(j: int) -> int:
        if j not in sums:
            sums[j] = cost(j)
        return n * (j + 1) + sums[j]

    while k < MAX_K and bits(k + 1) < bits(k):
        k += 1
    while k > 0 and bits(k - 1) <= bits(k):
        k -= 1
    return _plan(n, k, sums[k])


def plan(values: np.ndarray) -> RicePlan:
    """The optimal Rice parameter for a sequence of non-negative integers (int64 array)."""
    n = values.size
    total = int(values.sum(dtype=np.int64)) if n else 0
    return _search(n, total, lambda k: _shifted_sum(values, k) if k else total)


def _shifted_sum(values: np.ndarray, k: int) -> int:
    """sum(values >> k), chunk by chunk into one small buffer: no temporary of the whole size."""
    buf = np.empty(min(values.size, _CHUNK), dtype=values.dtype)
    total = 0
    for start in range(0, values.size, _CHUNK):
        part = buf[: min(_CHUNK, values.size - start)]
        np.right_shift(values[start : start + _CHUNK], k, out=part)
        total += int(part.sum(dtype=np.int64))
    return total


def plan_from_histogram(hist: np.ndarray) -> RicePlan:
    """The optimal Rice parameter for a sequence given as counts: hist[v] = occurrences of v."""
    hist = np.asarray(hist, dtype=np.int64)
    n = int(hist.sum())
    support = np.arange(hist.size, dtype=np.int64)
    total = int(hist @ support)
    return _search(n, total, lambda k: int(hist @ (support >> k)))


def encode(values: np.ndarray, k: int, max_value: int | None = None) -> tuple[bytes, bytes]:
    """The unary and remainder streams of non-negative integers with parameter k (max_value, if
    given, bounds the values)."""
    unary, remainders = encode_arrays(values, k, max_value)
    return unary.tobytes(), remainders.tobytes()


def encode_arrays(values: np.ndarray, k: int, max_value: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`encode` as two uint8 arrays (for the envelope, which copies them once)."""
    values = np.asarray(values)
    n = values.size
    empty = np.zeros(0, dtype=np.uint8)
    if n == 0:
        return empty, empty
    if max_value is None:
        max_value = int(values.max())
    mask = values.dtype.type((1 << k) - 1) if k else None
    # chunk by chunk, so that every temporary stays in cache: each chunk's unary bits go after
    # the bits (fewer than 8) that the previous chunk left over, and its full bytes are packed;
    # a chunk of _CHUNK values (a multiple of 8) has byte-aligned remainders. torch's cumsum and
    # index_fill_ on int64 positions run 3x and 2x faster than numpy's cumsum and fancy assignment.
    unary, remainders = [], np.empty(nbytes(n * k), dtype=np.uint8)
    carry = np.zeros(0, dtype=bool)
    for start in range(0, n, _CHUNK):
        chunk = values[start : start + _CHUNK]
        q = torch.from_numpy(np.right_shift(chunk, k, dtype=np.int64) if k else chunk.astype(np.int64))
        q += 1
        ends = torch.cumsum(q, 0, out=q)  # position + 1 of each terminating one bit
        bits = np.zeros(carry.size + int(ends[-1]), dtype=bool)
        bits[: carry.size] = carry
        ends += carry.size - 1
        torch.from_numpy(bits).index_fill_(0, ends, True)
        full = bits.size & ~7
        unary.append(np.packbits(bits[:full], bitorder="little"))
        carry = bits[full:]
        if k:
            part = pack_uint_array(chunk & mask, k).view(np.uint8)
            at = start * k // 8
            remainders[at : at + part.size] = part
    unary.append(np.packbits(carry, bitorder="little"))
    return np.concatenate(unary), remainders


def decode(
    k: int,
    unary: bytes,
    remainders: bytes,
    n: int,
    max_value: int,
    max_sum: int,
    what: str = "rice code",
    dtype: np.dtype = np.int64,
) -> np.ndarray:
    """n values from their streams, each in [0, max_value] and summing to at most max_sum, as
    `dtype` (int64 unless given; it must hold max_value).

    Sizes are checked before anything is allocated: the unary stream cannot be longer than
    n + (max_sum >> k) bits, and the remainder stream must be exactly n*k bits. Both streams are
    read chunk by chunk, straight into the output, so no temporary has the size of the output.
    """
    max_sum = min(max_sum, n * max_value)
    k_limit = min(MAX_K, max_value.bit_length())
    if not 0 <= k <= k_limit:
        raise PayloadError(f"{what}: parameter k={k} outside [0, {k_limit}]")
    limit = nbytes(n + (max_sum >> k))
    if len(unary) > limit:
        raise PayloadError(f"{what}: unary stream of {len(unary)} bytes exceeds the {limit} bytes possible")
    if len(remainders) != nbytes(n * k):
        raise PayloadError(f"{what}: remainder stream of {len(remainders)} bytes, expected {nbytes(n * k)}")
    if n == 0:
        if unary:
            raise PayloadError(f"{what}: unary stream of {len(unary)} bytes for no values")
        return np.zeros(0, dtype=dtype)
    buf = as_uint8(unary)
    ones = popcount(buf)
    if ones != n:
        raise PayloadError(f"{what}: unary stream holds {ones} values, expected {n}")
    if buf[-1] == 0:  # the last one bit must lie in the last byte
        raise PayloadError(f"{what}: unary stream has trailing bytes")
    last = 8 * (buf.size - 1) + int(buf[-1]).bit_length() - 1
    if last + 1 - n > max_sum >> k:  # the sum of the quotients
        raise PayloadError(f"{what}: values sum to more than {max_sum}")
    out = np.empty(n, dtype=dtype)
    # the quotients q_i = ones_at[i] - ones_at[i - 1] - 1 (ones_at[-1] = -1), a chunk of the
    # unary stream at a time; each is checked against the bound before it is narrowed to dtype
    top_quotient = max_value >> k
    at, previous = 0, -1
    for start in range(0, buf.size, _DECODE_BYTES):
        ones_at = np.flatnonzero(np.unpackbits(buf[start : start + _DECODE_BYTES], bitorder="little").view(bool))
        if ones_at.size == 0:
            continue
        ones_at += 8 * start
        q = np.empty(ones_at.size, dtype=np.int64)
        q[0] = ones_at[0] - previous
        np.subtract(ones_at[1:], ones_at[:-1], out=q[1:])
        q -= 1
        if int(q.max()) > top_quotient:
            raise PayloadError(f"{what}: a value exceeds {max_value}")
        out[at : at + q.size] = q
        at, previous = at + q.size, int(ones_at[-1])
    check_sum = max_sum < n * max_value
    total = 0
    for start in range(0, n, _CHUNK):
        part = out[start : start + _CHUNK]
        if k:  # _CHUNK values of k bits are whole bytes: each chunk's remainders start a byte
            first = start * k // 8
            r = unpack_uint(remainders[first : first + nbytes(part.size * k)], part.size, k, what)
            part <<= k
            part |= r.astype(part.dtype, copy=False)
            if int(part.max()) > max_value:
                raise PayloadError(f"{what}: a value exceeds {max_value}")
        if check_sum:
            total += int(part.sum(dtype=np.int64))
    if check_sum and total > max_sum:
        raise PayloadError(f"{what}: values sum to more than {max_sum}")
    return out
