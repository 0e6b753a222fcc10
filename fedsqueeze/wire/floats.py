"""Dtype codes and float arrays as little-endian bytes (float32, float16, bfloat16)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..protos.fedsqueeze.v1 import payload_pb2 as pb
from .errors import PayloadError

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float64: pb.DTYPE_FLOAT64,
}
CODE_DTYPES: dict[int, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
VALUE_CODES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16)

# the raw bits of each value dtype, as a numpy integer dtype of the same width
_BITS = {torch.float32: (torch.int32, "<i4"), torch.float16: (torch.int16, "<i2"), torch.bfloat16: (torch.int16, "<i2")}


def dtype_code(dtype: torch.dtype, what: str = "dtype") -> int:
    """The wire code of a payload dtype."""
    try:
        return DTYPE_CODES[dtype]
    except (KeyError, TypeError):
        raise PayloadError(f"{what} {dtype} has no wire form; valid: {', '.join(map(str, DTYPE_CODES))}") from None


def code_dtype(code: int, what: str = "dtype") -> torch.dtype:
    """The dtype of a wire code."""
    try:
        return CODE_DTYPES[code]
    except KeyError:
        raise PayloadError(f"{what}: unknown code {code}; valid: {sorted(CODE_DTYPES)}") from None


# 16-bit floats are finite iff their exponent bits are not all ones, i.e. iff the bits without the
# sign lie below these limits
_NONFINITE_FROM = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}
# values per chunk of the 16-bit check: its temporary (128 KiB) stays in cache
_CHUNK = 1 << 16


def _all_finite(raw: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether the raw bits of float values hold no NaN or inf (numpy only: no thread pool)."""
    if raw.size == 0:
        return True
    if dtype == torch.float32:
        floats = raw.view(np.float32)
        # min and max propagate NaN and expose +-inf: two vectorised reductions, no temporaries
        return bool(np.isfinite(floats.min()) and np.isfinite(floats.max()))
    # numpy compares float16 in software (about 100x slower than the integer path) and has no
    # bfloat16: test the bits instead, |bits| below the first non-finite pattern, chunk by chunk
    limit = _NONFINITE_FROM[dtype]
    tmp = np.empty(min(raw.size, _CHUNK), dtype=np.int16)
    for start in range(0, raw.size, _CHUNK):
        chunk = raw[start : start + _CHUNK]
        magnitude = tmp[: chunk.size]
        np.bitwise_and(chunk, np.int16(0x7FFF), out=magnitude)
        if int(magnitude.max()) >= limit:
            return False
    return True


def check_scale(scale: float, what: str) -> float:
    """A scale as the float32 that crosses the wire, which must be finite."""
    with np.errstate(over="ignore"):
        value = float(np.float32(scale))
    if not math.isfinite(value):
        raise PayloadError(f"{what}: scale {scale!r} is not finite in float32")
    return value


def tensor_buffer(t: torch.Tensor, what: str) -> np.ndarray:
    """The little-endian bits of a float32/float16/bfloat16 tensor, as a contiguous integer array
    that shares t's memory (after a finiteness check): the envelope copies it once, into the
    output."""
    if t.dtype not in _BITS:
        raise PayloadError(f"{what}: dtype {t.dtype} has no wire form; valid: float32, float16, bfloat16")
    t = t.detach().cpu().contiguous()
    int_dtype, wire = _BITS[t.dtype]
    raw = t.view(int_dtype).numpy()
    if not _all_finite(raw, t.dtype):
        raise PayloadError(f"{what}: non-finite values (NaN or inf) cannot be sent")
    return raw.astype(wire, copy=False)


def bytes_tensor(data, n: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    """n values of a float32/float16/bfloat16 dtype from their bytes (any read-only buffer),
    checked for length and finiteness. The tensor owns a copy: it never aliases `data`."""
    int_dtype, wire = _BITS[dtype]
    size = np.dtype(wire).itemsize
    if len(data) != n * size:
        raise PayloadError(f"{what}: {len(data)} bytes, expected {n * size} for {n} {dtype} values")
    view = np.frombuffer(data, dtype=wire)
    # one copy, by numpy (its large allocations get huge pages, so this runs near memory speed),
    # checked chunk by chunk while each chunk is still in cache
    raw = np.empty(n, dtype=np.dtype(wire).newbyteorder("="))
    for start in range(0, n, _CHUNK):
        part = raw[start : start + _CHUNK]
        np.copyto(part, view[start : start + _CHUNK])
        if not _all_finite(part, dtype):
            raise PayloadError(f"{what}: non-finite values (NaN or inf)")
    return torch.from_numpy(raw).view(dtype)
