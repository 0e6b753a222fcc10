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


def _all_finite(raw: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether the raw bits of float values hold no NaN or inf (numpy only: no thread pool)."""
    if raw.size == 0:
        return True
    if dtype == torch.bfloat16:  # no numpy dtype: the exponent bits are all ones only for NaN/inf
        return not bool(np.any((raw & np.int16(0x7F80)) == np.int16(0x7F80)))
    floats = raw.view(np.float32 if dtype == torch.float32 else np.float16)
    # min and max propagate NaN and expose +-inf: two reductions, no temporaries
    return bool(np.isfinite(floats.min()) and np.isfinite(floats.max()))


def check_scale(scale: float, what: str) -> float:
    """A scale as the float32 that crosses the wire, which must be finite."""
    with np.errstate(over="ignore"):
        value = float(np.float32(scale))
    if not math.isfinite(value):
        raise PayloadError(f"{what}: scale {scale!r} is not finite in float32")
    return value


def tensor_bytes(t: torch.Tensor, what: str) -> bytes:
    """The little-endian bytes of a float32/float16/bfloat16 tensor (after a finiteness check)."""
    if t.dtype not in _BITS:
        raise PayloadError(f"{what}: dtype {t.dtype} has no wire form; valid: float32, float16, bfloat16")
    t = t.detach().cpu().contiguous()
    int_dtype, wire = _BITS[t.dtype]
    raw = t.view(int_dtype).numpy()
    if not _all_finite(raw, t.dtype):
        raise PayloadError(f"{what}: non-finite values (NaN or inf) cannot be sent")
    return raw.astype(wire, copy=False).tobytes()


def bytes_tensor(data: bytes, n: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    """n values of a float32/float16/bfloat16 dtype from their bytes, checked for length and finiteness."""
    int_dtype, wire = _BITS[dtype]
    size = np.dtype(wire).itemsize
    if len(data) != n * size:
        raise PayloadError(f"{what}: {len(data)} bytes, expected {n * size} for {n} {dtype} values")
    raw = np.frombuffer(data, dtype=wire).astype(np.dtype(wire).newbyteorder("="))  # a writable copy
    if not _all_finite(raw, dtype):
        raise PayloadError(f"{what}: non-finite values (NaN or inf)")
    return torch.from_numpy(raw).view(dtype)
