"""Bit streams: boolean masks and fixed-width unsigned integers, packed LSB-first.

Stream bit j is bit (j mod 8) of byte (j div 8), numpy's bitorder="little". A stream of n
values of w bits puts value i in bits [i*w, i*w + w), least-significant bit first; the unused
bits of the last byte are zero. Everything is vectorised; the unpackers check lengths and
padding before allocating anything, and raise PayloadError.
"""

from __future__ import annotations

import numpy as np

from .errors import PayloadError

if hasattr(np, "bitwise_count"):

    def popcount(data: np.ndarray) -> int:
        """Number of set bits in a uint8 array."""
        return int(np.bitwise_count(data).sum(dtype=np.int64))

else:  # pragma: no cover - numpy < 2.0
    _POP = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def popcount(data: np.ndarray) -> int:
        """Number of set bits in a uint8 array."""
        return int(_POP[data].sum(dtype=np.int64))


def nbytes(nbits: int) -> int:
    """Bytes of a stream of nbits bits."""
    return (nbits + 7) >> 3


def as_uint8(data: bytes) -> np.ndarray:
    """A read-only uint8 view of a bytes object (no copy)."""
    return np.frombuffer(data, dtype=np.uint8)


def _check_stream(data: bytes, nbits: int, what: str) -> np.ndarray:
    """A uint8 view of `data` once its length is exactly nbytes(nbits) and its padding is zero."""
    if len(data) != nbytes(nbits):
        raise PayloadError(f"{what}: {len(data)} bytes, expected {nbytes(nbits)} for {nbits} bits")
    buf = as_uint8(data)
    tail = nbits & 7
    if tail and int(buf[-1]) >> tail:
        raise PayloadError(f"{what}: nonzero padding bits after bit {nbits}")
    return buf


def pack_mask(mask: np.ndarray) -> bytes:
    """n booleans as n bits."""
    return pack_mask_array(mask).tobytes()


def pack_mask_array(mask: np.ndarray) -> np.ndarray:
    """n booleans as n bits, a uint8 array (for the envelope, which copies it once)."""
    return np.packbits(np.asarray(mask, dtype=bool), bitorder="little")


def unpack_mask(data: bytes, n: int, what: str = "mask") -> np.ndarray:
    """The n booleans of a mask stream (a fresh, writable array)."""
    buf = _check_stream(data, n, what)
    return np.unpackbits(buf, count=n, bitorder="little").view(bool)


def one_positions(buf: np.ndarray, ones: int) -> np.ndarray:
    """Positions (int64, increasing) of the `ones` set bits of a uint8 stream.

    A stream with few set bits per byte has only its nonzero bytes expanded, so memory stays
    O(ones + len(buf)) and never reaches 8 bytes per input byte for a sparse hostile stream.
    """
    if buf.size <= 2 * ones + 4096:
        return np.flatnonzero(np.unpackbits(buf, bitorder="little").view(bool))
    nz = np.flatnonzero(buf)
    flat = np.flatnonzero(np.unpackbits(buf[nz], bitorder="little").view(bool))
    return nz[flat >> 3] * 8 + (flat & 7)


def uint_dtype(width: int) -> np.dtype:
    """The smallest unsigned dtype that holds `width` bits."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if width <= 8 * np.dtype(dt).itemsize:
            return np.dtype(dt)
    raise PayloadError(f"bit width {width} exceeds 64")


def pack_uint(values: np.ndarray, width: int) -> bytes:
    """Non-negative integers < 2**width as a fixed-width stream (values are not checked)."""
    return pack_uint_array(values, width).tobytes()


def pack_uint_array(values: np.ndarray, width: int) -> np.ndarray:
    """pack_uint as a contiguous array (for the envelope, which copies it once); it may share
    memory with `values`."""
    values = np.asarray(values).ravel()
    n = values.size
    if width == 0 or n == 0:
        return np.zeros(0, dtype=np.uint8)
    if not 0 < width <= 64:
        raise PayloadError(f"bit width {width} outside [0, 64]")
    if width in (8, 16, 32, 64):
        return np.ascontiguousarray(values.astype(f"<u{width // 8}", copy=False))
    if width == 1:
        return np.packbits(values.astype(bool, copy=False), bitorder="little")
    if width in (2, 4):
        per = 8 // width
        v = values.astype(np.uint8, copy=False)
        if n % per:
            v = np.concatenate([v, np.zeros(per - n % per, dtype=np.uint8)])
        v = v.reshape(-1, per)
        out = v[:, 0].copy()
        for j in range(1, per):
            out |= v[:, j] << np.uint8(j * width)
        return out
    # general widths: 8 values fill exactly `width` bytes, so byte t of a group always takes the
    # same bits of the same values; build the bytes column by column from those fixed overlaps
    work = _work_dtype(width)
    v = values.astype(work, copy=False)
    if n % 8:
        v = np.concatenate([v, np.zeros(8 - n % 8, dtype=work)])
    v = v.reshape(-1, 8)
    out = np.empty((v.shape[0], width), dtype=np.uint8)
    for t, parts in enumerate(_byte_sources(width)):
        acc = None
        for j, shift in parts:
            col = v[:, j] << work.type(shift) if shift >= 0 else v[:, j] >> work.type(-shift)
            acc = col if acc is None else acc | col
        out[:, t] = acc  # keeps the low 8 bits
    return out.reshape(-1)[: nbytes(n * width)]


def _work_dtype(width: int) -> np.dtype:
    """An unsigned dtype with room for a value of `width` bits shifted by up to 7 bits."""
    return uint_dtype(min(width + 7, 64))


def _byte_sources(width: int) -> list[list[tuple[int, int]]]:
    """For each byte t of a group of 8 values: the values j it takes bits from, and the left
    shift (negative: right shift) that moves value j's bits to their place in byte t."""
    return [
        [(j, j * width - 8 * t) for j in range(8) if j * width < 8 * t + 8 and (j + 1) * width > 8 * t]
        for t in range(width)
    ]


def unpack_uint(data: bytes, n: int, width: int, what: str = "fixed-width stream") -> np.ndarray:
    """The n values of a fixed-width stream, as the smallest unsigned dtype holding `width` bits."""
    if not 0 <= width <= 64:
        raise PayloadError(f"{what}: bit width {width} outside [0, 64]")
    dt = uint_dtype(max(width, 1))
    buf = _check_stream(data, n * width, what)
    if width == 0 or n == 0:
        return np.zeros(n, dtype=dt)
    if width in (8, 16, 32, 64):
        return np.frombuffer(data, dtype=f"<u{width // 8}").astype(dt)
    if width == 1:
        return np.unpackbits(buf, count=n, bitorder="little")
    if width in (2, 4):
        per = 8 // width
        mask = np.uint8((1 << width) - 1)
        out = np.empty((buf.size, per), dtype=np.uint8)
        for j in range(per):
            np.bitwise_and(buf >> np.uint8(j * width), mask, out=out[:, j])
        return out.ravel()[:n]
    # the inverse of pack_uint's general path: value j of a group from its fixed source bytes
    work = _work_dtype(width)
    groups = -(-n // 8)
    padded = np.zeros(groups * width, dtype=np.uint8)
    padded[: buf.size] = buf
    raw = padded.reshape(groups, width)
    mask = work.type((1 << width) - 1)
    out = np.empty((groups, 8), dtype=dt)
    for j in range(8):
        acc = None
        for t in range(j * width // 8, ((j + 1) * width - 1) // 8 + 1):
            shift = 8 * t - j * width  # where byte t's bit 0 lands in value j
            col = raw[:, t].astype(work)
            col = col << work.type(shift) if shift >= 0 else col >> work.type(-shift)
            acc = col if acc is None else acc | col
        out[:, j] = acc & mask
    return out.ravel()[:n]
