"""Compressed payloads <-> bytes: one encoder and one validating decoder per payload kind.

The encoders choose, per payload, the smallest of the forms the format offers (see
protos/fedsqueeze/v1/payload.proto for the bit layouts); the decoders check every count, length,
range and order against the expected layout before allocating anything, and raise PayloadError.

Signs of zero coordinates (Quantized magnitude 0, Natural code 0) are not information and are
not sent by the compact forms: decoded payloads have `negative` False wherever the value is zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from google.protobuf.message import DecodeError

from ..compressors.compressed import (
    NATURAL_MAX_CODE,
    NUMPY_CHUNK,
    Compressed,
    Dense,
    LowRank,
    LowRankBlock,
    Natural,
    Quantized,
    Sign,
    Sparse,
    shared_indices,
)
from ..protos.fedsqueeze.v1 import payload_pb2 as pb
from .bits import pack_mask_array, pack_uint_array, unpack_mask, unpack_uint
from .envelope import collecting, parse, put_bytes, serialize
from .errors import PayloadError
from .floats import VALUE_CODES, bytes_tensor, check_scale, code_dtype, dtype_code, tensor_buffer
from .indices import decode_index_set, plan_index_set, write_index_set
from .ints import IntPlan, plan_ints, read_ints, write_ints

WIRE_VERSION = 1
#: bodies nest at most this deep (the top-level body is depth 1)
MAX_DEPTH = 4
MAX_LEVELS = 2**31 - 1
# No valid payload needs more than this many bytes per coordinate (a LowRank made of 1x1 blocks,
# the worst case, needs about 31), so longer inputs are refused before the protobuf parser runs.
MAX_BYTES_PER_COORDINATE = 64
MAX_FIXED_OVERHEAD = 4096


# ---------------------------------------------------------------------------------------------
# public entry points


def encode(c: Compressed) -> bytes:
    """The wire bytes of a payload (a serialized fedsqueeze.v1.Payload message)."""
    if not isinstance(c, Compressed):
        raise PayloadError(f"cannot encode {type(c).__name__}: expected a Compressed payload")
    n = _numel(c)
    with collecting():  # the large bytes fields go straight into the output (envelope.py)
        msg = pb.Payload(version=WIRE_VERSION, numel=n, dtype=dtype_code(c.dtype, "payload dtype"))
        _encode_body(c, msg, n, 1)
        return serialize(msg)


def decode(data: bytes, numel: int) -> Compressed:
    """The payload in `data`, which must stand for a vector of `numel` coordinates.

    Raises PayloadError, and nothing else, for any input that is not a valid payload of that
    size; never allocates more than `numel` (and len(data)) allow.
    """
    try:
        return _decode(data, numel)
    except PayloadError:
        raise
    except DecodeError as e:
        raise PayloadError(f"not a fedsqueeze payload: protobuf parse failed ({e})") from e
    except Exception as e:  # any other failure on hostile input is still a bad payload
        raise PayloadError(f"malformed payload: {type(e).__name__}: {e}") from e


def _decode(data: bytes, numel: int) -> Compressed:
    if isinstance(numel, bool) or not isinstance(numel, (int, np.integer)) or numel < 0:
        raise PayloadError(f"expected numel must be a non-negative integer, got {numel!r}")
    numel = int(numel)
    data = _as_bytes(data)
    limit = MAX_BYTES_PER_COORDINATE * numel + MAX_FIXED_OVERHEAD
    if len(data) > limit:
        raise PayloadError(f"payload of {len(data)} bytes exceeds the {limit} bytes any {numel}-element payload needs")
    # payloads as encode writes them are read without copies; protobuf parses anything else
    msg = parse(data, pb.Payload.DESCRIPTOR) or pb.Payload.FromString(data)
    if msg.version != WIRE_VERSION:
        raise PayloadError(f"wire version {msg.version} is not supported (this is version {WIRE_VERSION})")
    if msg.numel != numel:
        raise PayloadError(f"payload has {msg.numel} coordinates, the expected layout has {numel}")
    return _decode_body(msg, numel, code_dtype(msg.dtype, "payload dtype"), 1)


def _as_bytes(data) -> bytes:
    # mutable buffers are copied: decoded arrays may be made from read-only views of these bytes
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, np.ndarray) and data.dtype in (np.uint8, np.int8) and data.ndim == 1:
        return data.tobytes()
    raise PayloadError(f"payload must be bytes, got {type(data).__name__}")


# ---------------------------------------------------------------------------------------------
# dispatch and nesting


def _encode_body(c: Compressed, msg, n: int, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise PayloadError(f"payload nests more than {MAX_DEPTH} bodies deep")
    for kind, (cls, encoder) in _ENCODERS.items():
        if isinstance(c, cls):
            body = getattr(msg, kind)
            body.SetInParent()
            encoder(c, body, n, depth)
            return
    raise PayloadError(f"cannot encode {type(c).__name__}: no wire form")


def _encode_nested(c: Compressed, msg, parent_dtype: torch.dtype, n: int, depth: int, what: str) -> None:
    if not isinstance(c, Compressed):
        raise PayloadError(f"{what}: expected a Compressed payload, got {type(c).__name__}")
    if _numel(c) != n:
        raise PayloadError(f"{what}: covers {c.numel} coordinates, expected {n}")
    msg.SetInParent()
    if c.dtype != parent_dtype:
        msg.dtype = dtype_code(c.dtype, f"{what} dtype")
    _encode_body(c, msg, n, depth + 1)


def _decode_body(msg, n: int, dtype: torch.dtype, depth: int) -> Compressed:
    if depth > MAX_DEPTH:
        raise PayloadError(f"payload nests more than {MAX_DEPTH} bodies deep")
    kind = msg.WhichOneof("body")
    if kind is None:
        raise PayloadError("payload has no body")
    return _DECODERS[kind](getattr(msg, kind), n, dtype, depth)


def _decode_nested(body, field: str, n: int, parent_dtype: torch.dtype, depth: int) -> Compressed:
    if not body.HasField(field):
        raise PayloadError(f"{field}: nested body missing")
    nested = getattr(body, field)
    dtype = parent_dtype if nested.dtype == pb.DTYPE_UNSPECIFIED else code_dtype(nested.dtype, f"{field} dtype")
    return _decode_body(nested, n, dtype, depth + 1)


# ---------------------------------------------------------------------------------------------
# input checks for encoding


def _numel(c: Compressed) -> int:
    n = c.numel
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise PayloadError(f"numel must be a non-negative integer, got {n!r}")
    return int(n)


def _vector(t, n: int, what: str, kind: str) -> np.ndarray:
    """A 1-D tensor of n elements as a CPU numpy array, of kind 'bool' or 'int'."""
    if not isinstance(t, torch.Tensor):
        raise PayloadError(f"{what}: expected a tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.numel() != n:
        raise PayloadError(f"{what}: shape {tuple(t.shape)}, expected ({n},)")
    if kind == "bool" and t.dtype != torch.bool:
        raise PayloadError(f"{what}: dtype {t.dtype}, expected torch.bool")
    if kind == "int" and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        raise PayloadError(f"{what}: dtype {t.dtype}, expected an integer dtype")
    return t.detach().cpu().contiguous().numpy()


def _max_checked(values: np.ndarray, hi: int, what: str) -> int:
    """The maximum of a non-empty integer array whose values must lie in [0, hi]."""
    # one pass: seen as unsigned, negative values become huge and fail the same test
    unsigned = values.view(f"u{values.itemsize}") if values.dtype.kind == "i" else values
    mx = int(unsigned.max())
    if mx > hi:
        raise PayloadError(f"{what}: values must lie in [0, {hi}], found {int(values.min())}..{int(values.max())}")
    return mx


def _nonzero_signs(negative: np.ndarray, plan: IntPlan) -> np.ndarray:
    """The signs of the nonzero values, in order."""
    if plan.nnz == negative.size:
        return negative
    return negative[plan.positions] if plan.positions is not None else negative[plan.nonzero]


def _scatter_signs(data: bytes, values: np.ndarray, pos: np.ndarray | None, what: str) -> np.ndarray:
    """The negative mask from one sign bit per nonzero value (False where the value is 0)."""
    if pos is None:
        nonzero = values != 0
        nnz = int(np.count_nonzero(nonzero))
        signs = unpack_mask(data, nnz, what)
        if nnz == values.size:
            return signs
        negative = np.zeros(values.size, dtype=bool)
        negative[nonzero] = signs
        return negative
    negative = np.zeros(values.size, dtype=bool)
    negative[pos] = unpack_mask(data, pos.size, what)
    return negative


# ---------------------------------------------------------------------------------------------
# Dense


def _encode_dense(c: Dense, body, n: int, depth: int) -> None:
    v = c.values
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.numel() != n:
        raise PayloadError(f"dense values: expected a 1-D tensor of {n} elements")
    body.precision = dtype_code(v.dtype, "dense values dtype")
    put_bytes(body, "values", tensor_buffer(v, "dense values"))
    scale = check_scale(getattr(c, "scale", 1.0), "dense")
    if scale != 1.0:
        body.scale = scale


def _decode_dense(body, n: int, dtype: torch.dtype, depth: int) -> Dense:
    if body.precision not in VALUE_CODES:
        raise PayloadError(f"dense precision code {body.precision} is not one of {list(VALUE_CODES)}")
    values = bytes_tensor(body.values, n, code_dtype(body.precision), "dense values")
    scale = body.scale if body.HasField("scale") else 1.0
    if not math.isfinite(scale):
        raise PayloadError(f"dense scale {scale} is not finite")
    return Dense(numel=n, dtype=dtype, values=values, scale=scale)


# ---------------------------------------------------------------------------------------------
# Sparse


def _encode_sparse(c: Sparse, body, n: int, depth: int) -> None:
    idx_t = c.indices
    if not isinstance(idx_t, torch.Tensor) or idx_t.dim() != 1:
        raise PayloadError("sparse indices: expected a 1-D tensor")
    count = idx_t.numel()
    idx = _vector(idx_t, count, "sparse indices", "int").astype(np.int64, copy=False)
    if count > n:
        raise PayloadError(f"sparse indices: {count} indices for {n} coordinates")
    if count and (idx[0] < 0 or idx[-1] >= n or (count > 1 and not bool(np.all(idx[1:] > idx[:-1])))):
        raise PayloadError(f"sparse indices must be strictly increasing and lie in [0, {n})")
    body.count = count
    if c.seed is not None:
        seed = c.seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
            raise PayloadError(f"sparse seed must be an integer in [0, 2**64), got {seed!r}")
        body.seed = int(seed)
    else:
        plan = plan_index_set(n, count, indices=idx)
        write_index_set(plan, body.indices, n, indices=idx)
    _encode_nested(c.values, body.values, c.dtype, count, depth, "sparse values")


def _decode_sparse(body, n: int, dtype: torch.dtype, depth: int) -> Sparse:
    count = body.count
    if count > n:
        raise PayloadError(f"sparse count {count} exceeds the {n} coordinates")
    support = body.WhichOneof("support")
    seed = None
    if support == "seed":
        seed = body.seed
        indices = shared_indices(seed, n, count)
    elif support == "indices":
        indices = torch.from_numpy(decode_index_set(body.indices, n, count, "sparse indices"))
    else:
        raise PayloadError("sparse payload has neither seed nor indices")
    values = _decode_nested(body, "values", count, dtype, depth)
    return Sparse(numel=n, dtype=dtype, indices=indices, values=values, seed=seed)


# ---------------------------------------------------------------------------------------------
# Quantized (QSGD)


def _encode_quantized(c: Quantized, body, n: int, depth: int) -> None:
    s = c.levels
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 1 <= s <= MAX_LEVELS:
        raise PayloadError(f"quantized levels must be an integer in [1, {MAX_LEVELS}], got {s!r}")
    body.scale = check_scale(c.scale, "quantized")
    body.levels = int(s)
    mags = _vector(c.magnitudes, n, "quantized magnitudes", "int")
    negative = _vector(c.negative, n, "quantized negative", "bool")
    if n:
        _max_checked(mags, int(s), "quantized magnitudes")
    plan = plan_ints(mags)
    write_ints(plan, body.magnitudes)
    put_bytes(body, "negative", pack_mask_array(_nonzero_signs(negative, plan)))


def _decode_quantized(body, n: int, dtype: torch.dtype, depth: int) -> Quantized:
    s = body.levels
    if not 1 <= s <= MAX_LEVELS:
        raise PayloadError(f"quantized levels {s} outside [1, {MAX_LEVELS}]")
    scale = body.scale
    if not math.isfinite(scale):
        raise PayloadError(f"quantized scale {scale} is not finite")
    mags, pos = read_ints(body.magnitudes, n, s, "quantized magnitudes", dtype=np.int32)
    negative = _scatter_signs(body.negative, mags, pos, "quantized negative")
    return Quantized(
        numel=n,
        dtype=dtype,
        scale=scale,
        levels=s,
        negative=torch.from_numpy(negative),
        magnitudes=torch.from_numpy(mags),
    )


# ---------------------------------------------------------------------------------------------
# Natural

_SYMBOL_BITS = NATURAL_MAX_CODE.bit_length()


def _encode_natural(c: Natural, body, n: int, depth: int) -> None:
    codes = _vector(c.codes, n, "natural codes", "int")
    negative = _vector(c.negative, n, "natural negative", "bool")
    if n:
        _max_checked(codes, NATURAL_MAX_CODE, "natural codes")
    # the histogram and the table look-up chunk by chunk: numpy casts int16 indices to intp,
    # and a cast of the whole vector would be a temporary four times its size
    hist = np.zeros(NATURAL_MAX_CODE + 1, dtype=np.intp)
    for start in range(0, n, NUMPY_CHUNK):
        part = codes[start : start + NUMPY_CHUNK].astype(np.intp, copy=False)
        hist += np.bincount(part, minlength=NATURAL_MAX_CODE + 1)
    # the table: codes in use, most frequent first (ties: smaller code first)
    used = np.flatnonzero(hist[1:]) + 1
    symbols = used[np.argsort(-hist[used], kind="stable")]
    lut = np.zeros(NATURAL_MAX_CODE + 1, dtype=np.uint16)
    lut[symbols] = np.arange(1, symbols.size + 1, dtype=np.uint16)
    values = np.empty(n, dtype=np.uint16)
    for start in range(0, n, NUMPY_CHUNK):
        part = codes[start : start + NUMPY_CHUNK].astype(np.intp, copy=False)
        np.take(lut, part, out=values[start : start + NUMPY_CHUNK])
    value_hist = np.zeros(symbols.size + 1, dtype=np.int64)
    value_hist[0] = hist[0]
    value_hist[1:] = hist[symbols]
    plan = plan_ints(values, hist=value_hist)
    body.symbol_count = symbols.size
    put_bytes(body, "symbols", pack_uint_array(symbols, _SYMBOL_BITS))
    write_ints(plan, body.values)
    put_bytes(body, "negative", pack_mask_array(_nonzero_signs(negative, plan)))


def _decode_natural(body, n: int, dtype: torch.dtype, depth: int) -> Natural:
    m = body.symbol_count
    if m > NATURAL_MAX_CODE:
        raise PayloadError(f"natural table of {m} codes exceeds the {NATURAL_MAX_CODE} nonzero codes")
    symbols = unpack_uint(body.symbols, m, _SYMBOL_BITS, "natural table").astype(np.int16)
    if m and (int(symbols.min()) < 1 or int(symbols.max()) > NATURAL_MAX_CODE or np.unique(symbols).size != m):
        raise PayloadError(f"natural table must hold distinct codes in [1, {NATURAL_MAX_CODE}]")
    values, pos = read_ints(body.values, n, m, "natural values")
    lut = np.zeros(m + 1, dtype=np.int16)
    lut[1:] = symbols
    codes = np.empty(n, dtype=np.int16)
    for start in range(0, n, NUMPY_CHUNK):  # chunks: the cast of the indices to intp stays small
        part = values[start : start + NUMPY_CHUNK].astype(np.intp)
        np.take(lut, part, out=codes[start : start + NUMPY_CHUNK])
    negative = _scatter_signs(body.negative, values, pos, "natural negative")
    return Natural(numel=n, dtype=dtype, negative=torch.from_numpy(negative), codes=torch.from_numpy(codes))


# ---------------------------------------------------------------------------------------------
# Sign


def _encode_sign(c: Sign, body, n: int, depth: int) -> None:
    body.scale = check_scale(c.scale, "sign")
    put_bytes(body, "negative", pack_mask_array(_vector(c.negative, n, "sign negative", "bool")))


def _decode_sign(body, n: int, dtype: torch.dtype, depth: int) -> Sign:
    if not math.isfinite(body.scale):
        raise PayloadError(f"sign scale {body.scale} is not finite")
    negative = unpack_mask(body.negative, n, "sign negative")
    return Sign(numel=n, dtype=dtype, scale=body.scale, negative=torch.from_numpy(negative))


# ---------------------------------------------------------------------------------------------
# LowRank


def _check_spans(spans: list[tuple[int, int]], what: str) -> int:
    """Total size of disjoint [start, end) spans; raises if two overlap."""
    spans = sorted(spans)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise PayloadError(f"{what}: blocks overlap at coordinate {start}")
    return sum(end - start for start, end in spans)


def _encode_low_rank(c: LowRank, body, n: int, depth: int) -> None:
    spans = []
    for i, b in enumerate(c.blocks):
        what = f"low-rank block {i}"
        if not isinstance(b, LowRankBlock):
            raise PayloadError(f"{what}: expected a LowRankBlock, got {type(b).__name__}")
        offset, rows, cols = (int(x) for x in (b.offset, b.rows, b.cols))
        if rows < 1 or cols < 1 or offset < 0 or offset + rows * cols > n:
            raise PayloadError(f"{what}: {rows}x{cols} at offset {offset} does not fit in [0, {n})")
        for name, f, dim in (("p", b.p, rows), ("q", b.q, cols)):
            if not isinstance(f, torch.Tensor) or f.dtype != torch.float32 or f.dim() != 2 or f.shape[0] != dim:
                raise PayloadError(f"{what}: {name} must be a float32 tensor with {dim} rows")
        rank = b.p.shape[1]
        if b.q.shape[1] != rank or rank > min(rows, cols):
            raise PayloadError(f"{what}: factor ranks {b.p.shape[1]}, {b.q.shape[1]} invalid for {rows}x{cols}")
        spans.append((offset, offset + rows * cols))
        blk = body.blocks.add()
        blk.offset, blk.rows, blk.cols, blk.rank = offset, rows, cols, rank
        put_bytes(blk, "p", tensor_buffer(b.p.reshape(-1), f"{what} p"))
        put_bytes(blk, "q", tensor_buffer(b.q.reshape(-1), f"{what} q"))
    covered = _check_spans(spans, "low-rank")
    _encode_nested(c.rest, body.rest, c.dtype, n - covered, depth, "low-rank rest")


def _decode_low_rank(body, n: int, dtype: torch.dtype, depth: int) -> LowRank:
    if len(body.blocks) > n:
        raise PayloadError(f"low-rank payload has {len(body.blocks)} blocks for {n} coordinates")
    blocks, spans = [], []
    for i, blk in enumerate(body.blocks):
        what = f"low-rank block {i}"
        offset, rows, cols, rank = blk.offset, blk.rows, blk.cols, blk.rank
        if rows < 1 or cols < 1 or offset + rows * cols > n:
            raise PayloadError(f"{what}: {rows}x{cols} at offset {offset} does not fit in [0, {n})")
        if rank > min(rows, cols):
            raise PayloadError(f"{what}: rank {rank} exceeds min({rows}, {cols})")
        p = bytes_tensor(blk.p, rows * rank, torch.float32, f"{what} p").reshape(rows, rank)
        q = bytes_tensor(blk.q, cols * rank, torch.float32, f"{what} q").reshape(cols, rank)
        blocks.append(LowRankBlock(offset=offset, rows=rows, cols=cols, p=p, q=q))
        spans.append((offset, offset + rows * cols))
    covered = _check_spans(spans, "low-rank")
    rest = _decode_nested(body, "rest", n - covered, dtype, depth)
    return LowRank(numel=n, dtype=dtype, blocks=tuple(blocks), rest=rest)


_ENCODERS: dict[str, tuple[type, Callable]] = {
    "dense": (Dense, _encode_dense),
    "sparse": (Sparse, _encode_sparse),
    "quantized": (Quantized, _encode_quantized),
    "natural": (Natural, _encode_natural),
    "sign": (Sign, _encode_sign),
    "low_rank": (LowRank, _encode_low_rank),
}
_DECODERS: dict[str, Callable] = {
    "dense": _decode_dense,
    "sparse": _decode_sparse,
    "quantized": _decode_quantized,
    "natural": _decode_natural,
    "sign": _decode_sign,
    "low_rank": _decode_low_rank,
}
