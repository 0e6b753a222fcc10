"""Sets of sorted indices in [0, n), coded by whichever of three forms is smallest for the set.

- bitmap: n bits, bit i set iff i is in the set;
- gaps: the Rice-coded gaps idx[j] - idx[j-1] - 1 (idx[-1] = -1), near the entropy of a random
  k-subset, log2 C(n, k) bits, when the set is small;
- complement_gaps: the same for the indices not in the set, for sets of more than n/2 indices.
The count and n are known from the context, so only the chosen form is sent (an IndexSet message).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import rice
from .bits import as_uint8, nbytes, one_positions, pack_mask_array, popcount
from .envelope import put_bytes
from .errors import PayloadError


def varint_size(value: int) -> int:
    """Bytes of a protobuf varint."""
    return max(1, (value.bit_length() + 6) // 7)


def field_size(length: int) -> int:
    """Bytes of a length-delimited protobuf field (one-byte tag) holding `length` bytes."""
    return 1 + varint_size(length) + length


def rice_message_size(plan: rice.RicePlan) -> int:
    """Bytes of a RiceCode message with that plan (empty fields are not sent)."""
    size = varint_size(plan.k) + 1 if plan.k else 0
    size += field_size(plan.unary_bytes) if plan.unary_bytes else 0
    size += field_size(plan.remainder_bytes) if plan.remainder_bytes else 0
    return size


@dataclass(frozen=True)
class IndexPlan:
    """The chosen form for one set, its size (as an IndexSet message) and what it codes."""

    coding: str  # "bitmap", "gaps" or "complement_gaps"
    nbytes: int
    rice: rice.RicePlan | None = None
    gaps: np.ndarray | None = None


def gaps_of(indices: np.ndarray) -> np.ndarray:
    """idx[j] - idx[j-1] - 1 with idx[-1] = -1 (int64)."""
    gaps = np.empty(indices.size, dtype=np.int64)
    if indices.size:
        gaps[0] = indices[0]
        np.subtract(indices[1:], indices[:-1], out=gaps[1:])
        gaps[1:] -= 1
    return gaps


def _rice_plan(coding: str, gaps: np.ndarray) -> IndexPlan:
    plan = rice.plan(gaps)
    return IndexPlan(coding, field_size(rice_message_size(plan)), plan, gaps)


def plan_index_set(n: int, count: int, indices: np.ndarray | None = None, mask: np.ndarray | None = None) -> IndexPlan:
    """The smallest coding of a set of `count` indices in [0, n), given as sorted int64 indices
    or as a boolean mask of n (or both)."""
    if count == 0:
        return IndexPlan("gaps", field_size(0), rice.RicePlan(0, 0, 0), np.zeros(0, dtype=np.int64))
    if count == n:
        return IndexPlan("complement_gaps", field_size(0), rice.RicePlan(0, 0, 0), np.zeros(0, dtype=np.int64))
    best = IndexPlan("bitmap", field_size(nbytes(n)))
    if 2 * count <= n:
        if indices is None:
            indices = np.flatnonzero(mask)
        candidate = _rice_plan("gaps", gaps_of(indices))
    else:
        if mask is None:
            mask = np.zeros(n, dtype=bool)
            mask[indices] = True
        candidate = _rice_plan("complement_gaps", gaps_of(np.flatnonzero(~mask)))
    return candidate if candidate.nbytes < best.nbytes else best


def write_index_set(
    plan: IndexPlan, msg, n: int, indices: np.ndarray | None = None, mask: np.ndarray | None = None
) -> None:
    """Fill an IndexSet message with the planned coding."""
    if plan.coding == "bitmap":
        if mask is None:
            mask = np.zeros(n, dtype=bool)
            mask[indices] = True
        put_bytes(msg, "bitmap", pack_mask_array(mask))
        return
    target = getattr(msg, plan.coding)
    target.SetInParent()
    target.k = plan.rice.k
    unary, remainders = rice.encode_arrays(plan.gaps, plan.rice.k)
    put_bytes(target, "unary", unary)
    put_bytes(target, "remainders", remainders)


def decode_index_set(msg, n: int, count: int, what: str = "index set", positions: bool = True) -> np.ndarray | None:
    """The sorted indices (int64) of an IndexSet message that must hold `count` indices in [0, n).

    positions=False: the message is checked the same way, but a full set (count == n), whose
    indices are 0..n-1, comes back as None instead of an array of n indices."""
    if not 0 <= count <= n:
        raise PayloadError(f"{what}: count {count} outside [0, {n}]")
    coding = msg.WhichOneof("coding")
    if coding == "bitmap":
        data = msg.bitmap
        if len(data) != nbytes(n):
            raise PayloadError(f"{what}: bitmap of {len(data)} bytes, expected {nbytes(n)}")
        buf = as_uint8(data)
        if n & 7 and int(buf[-1]) >> (n & 7):
            raise PayloadError(f"{what}: bitmap has bits set beyond index {n - 1}")
        found = popcount(buf)
        if found != count:
            raise PayloadError(f"{what}: bitmap holds {found} indices, expected {count}")
        return one_positions(buf, count) if positions or count < n else None
    if coding == "gaps":
        g = msg.gaps
        gaps = rice.decode(g.k, g.unary, g.remainders, count, n - count, n - count, f"{what} gaps")
        if count == n and not positions:
            return None
        gaps += 1
        indices = np.cumsum(gaps, out=gaps)
        indices -= 1
        return indices
    if coding == "complement_gaps":
        g = msg.complement_gaps
        gaps = rice.decode(g.k, g.unary, g.remainders, n - count, count, count, f"{what} complement gaps")
        if count == n:
            return np.arange(n, dtype=np.int64) if positions else None
        gaps += 1
        outside = np.cumsum(gaps, out=gaps)
        outside -= 1
        mask = np.ones(n, dtype=bool)
        mask[outside] = False
        return np.flatnonzero(mask)
    raise PayloadError(f"{what}: no coding set")
