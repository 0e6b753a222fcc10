"""Sequences of bounded non-negative integers (an IntCode message), in the smallest of three forms.

- fixed: bit_length(max) bits per value;
- rice: Rice-coded, good for roughly geometric values;
- sparse: the positions of the nonzero values (an index set) and the IntCode of value - 1 there.
  Nesting it peels a peaked distribution one level at a time, each level an index set near its
  entropy, so QSGD levels (mostly 0, else mostly 1) cost close to their entropy, not >= 1 bit
  per value as any Rice code would.
Fixed and Rice costs come from a histogram (or a few vectorised passes for wide alphabets), which
for long sequences is estimated from a regular sample; the sparse form is costed where it can pay:
no zeros at all (it then costs a few bytes and the rest is coded as value - 1), or at least a
quarter zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import rice
from .bits import nbytes, pack_uint_array, uint_dtype, unpack_uint
from .envelope import put_bytes
from .errors import PayloadError
from .indices import (
    IndexPlan,
    decode_index_set,
    field_size,
    plan_index_set,
    rice_message_size,
    varint_size,
    write_index_set,
)

#: IntCodes nest at most this deep (a top-level IntCode is depth 1)
MAX_INT_DEPTH = 4
# alphabets below this size get their costs from a histogram instead of passes over the data
HISTOGRAM_LIMIT = 1 << 16
# sequences longer than twice this get their Rice costs from a sample of about this many values
SAMPLE = 1 << 18


def uint_field_size(value: int) -> int:
    """Bytes of a proto3 varint field with a one-byte tag (0 is not sent)."""
    return 1 + varint_size(value) if value else 0


def fixed_width_size(width: int, n: int) -> int:
    """Bytes of a FixedWidth message of n values."""
    return uint_field_size(width) + (field_size(nbytes(n * width)) if n * width else 0)


@dataclass
class IntPlan:
    """The chosen form for one sequence, the IntCode's size, and what its fields hold."""

    form: str  # "fixed", "rice" or "sparse"
    nbytes: int
    values: np.ndarray
    width: int = 0  # bit length of the largest value
    rice: rice.RicePlan | None = None
    count: int = 0
    positions: np.ndarray | None = None  # of the nonzero values, when they were computed
    nonzero: np.ndarray | None = field(default=None, repr=False)  # values != 0
    nnz: int = 0  # how many values are nonzero
    width_max: int = 0  # the largest value
    support: IndexPlan | None = None
    minus_one: IntPlan | None = field(default=None, repr=False)


def _histogram(values: np.ndarray, size: int) -> np.ndarray:
    """Counts of 0..size-1 among the values; estimated from a regular sample for long sequences
    (a full histogram costs more than the rest of planning, and it only steers choices)."""
    stride = max(1, values.size // SAMPLE)
    hist = np.bincount(values[::stride].astype(np.intp), minlength=size)
    if stride > 1:
        hist *= stride
    return hist


def plan_ints(values: np.ndarray, depth: int = 1, hist: np.ndarray | None = None) -> IntPlan:
    """The smallest IntCode for non-negative integers (checked by the caller); `hist`, if given,
    is their histogram."""
    n = values.size
    if n == 0:
        return IntPlan("fixed", field_size(0), values)
    nonzero = values != 0
    nnz = int(np.count_nonzero(nonzero))
    pos = sub_plan = support = None
    # The sparse form peels off the zeros (an index set near its entropy when they are rare or
    # common) and recurses on value - 1; with no zeros it only costs a few bytes.
    if depth < MAX_INT_DEPTH and (nnz == n or 4 * nnz <= 3 * n):
        if nnz == n:
            sub = values - 1
        else:
            # positions only where the index set codes them (gaps); np.compress gathers without
            # them, and runs about twice as fast as indexing with the mask
            if 2 * nnz <= n:
                pos = np.flatnonzero(nonzero)
                sub = values[pos]
            else:
                sub = np.compress(nonzero, values)
            sub -= 1
        sub_plan = plan_ints(sub, depth + 1)
        support = plan_index_set(n, nnz, indices=pos, mask=nonzero)
        mx = sub_plan.width_max + 1 if nnz else 0
        if hist is None and mx < HISTOGRAM_LIMIT:
            hist = np.concatenate([[n - nnz], _histogram(sub, mx)])
    else:
        mx = int(values.max())
        if hist is None and mx < HISTOGRAM_LIMIT:
            hist = _histogram(values, mx + 1)
    width = mx.bit_length()
    best = IntPlan("fixed", field_size(fixed_width_size(width, n)), values, width=width)
    rice_plan = rice.plan_from_histogram(hist) if hist is not None else rice.plan(values.astype(np.int64))
    size = field_size(rice_message_size(rice_plan))
    if size < best.nbytes:
        best = IntPlan("rice", size, values, width=width, rice=rice_plan)
    if sub_plan is not None:
        inner = uint_field_size(nnz) + field_size(support.nbytes) + field_size(sub_plan.nbytes)
        size = field_size(inner)
        if size < best.nbytes:
            best = IntPlan("sparse", size, values, width=width, count=nnz, support=support, minus_one=sub_plan)
    best.positions, best.nonzero, best.nnz, best.width_max = pos, nonzero, nnz, mx
    return best


def write_ints(plan: IntPlan, msg) -> None:
    """Fill an IntCode message with the planned form."""
    if plan.form == "fixed":
        msg.fixed.SetInParent()
        msg.fixed.width = plan.width
        put_bytes(msg.fixed, "data", pack_uint_array(plan.values, plan.width))
    elif plan.form == "rice":
        msg.rice.SetInParent()
        msg.rice.k = plan.rice.k
        unary, remainders = rice.encode_arrays(plan.values, plan.rice.k, plan.width_max)
        put_bytes(msg.rice, "unary", unary)
        put_bytes(msg.rice, "remainders", remainders)
    else:
        sp = msg.sparse
        sp.SetInParent()
        sp.count = plan.count
        write_index_set(plan.support, sp.support, plan.values.size, indices=plan.positions, mask=plan.nonzero)
        write_ints(plan.minus_one, sp.minus_one)


def read_ints(
    msg, n: int, max_value: int, what: str, depth: int = 1, dtype: np.dtype | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The n integers of an IntCode message, each in [0, max_value], and (for the sparse form)
    the positions of the nonzero ones. Values come as `dtype` (default: the smallest unsigned
    dtype that holds max_value), which must hold max_value."""
    dt = np.dtype(dtype) if dtype is not None else uint_dtype(max(max_value.bit_length(), 1))
    form = msg.WhichOneof("form")
    if form == "fixed":
        width = msg.fixed.width
        if width > max_value.bit_length():
            raise PayloadError(f"{what}: width {width} exceeds the {max_value.bit_length()} bits of {max_value}")
        values = unpack_uint(msg.fixed.data, n, width, what)
        if n and int(values.max()) > max_value:
            raise PayloadError(f"{what}: value {int(values.max())} exceeds {max_value}")
        return values.astype(dt, copy=False), None
    if form == "rice":
        r = msg.rice
        return rice.decode(r.k, r.unary, r.remainders, n, max_value, n * max_value, what, dt), None
    if form == "sparse":
        if depth >= MAX_INT_DEPTH:
            raise PayloadError(f"{what}: sparse integer codes nest more than {MAX_INT_DEPTH} deep")
        sp = msg.sparse
        count = sp.count
        if count > n:
            raise PayloadError(f"{what}: {count} nonzero values among {n}")
        if count and max_value < 1:
            raise PayloadError(f"{what}: nonzero values where the bound is 0")
        pos = decode_index_set(sp.support, n, count, f"{what} support", positions=count < n)
        sub, _ = read_ints(sp.minus_one, count, max(max_value - 1, 0), what, depth + 1, dt)
        sub += 1
        if count == n:
            return sub, None
        values = np.zeros(n, dtype=dt)
        values[pos] = sub
        return values, pos
    raise PayloadError(f"{what}: no form set")
