"""What a compressor produces: the information that crosses the wire, as tensors.

Each class is one kind of payload. `fedsqueeze.wire` turns them into packed bytes and back;
`to_dense()` rebuilds the dense vector. All tensors are 1-D (or 2-D factors for `LowRank`)
and live on the device of the compressed input; `dtype` is the dtype of that input, which
the dense reconstruction gets back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elements per chunk of the chunked CPU loops: buffers of 128 KiB stay in cache, and torch runs
# an op this small inline instead of waking its thread pool, which on a busy machine costs more
# than the op (chunks of 2**16 ran ten times slower here).
CHUNK = 1 << 15
# numpy has no thread pool: its chunks only need to stay in cache
NUMPY_CHUNK = 1 << 16
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def cpu_empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(n, dtype=dtype) on the CPU, allocated by numpy where numpy has the dtype:
    numpy asks for transparent huge pages on large arrays, so the first write to a fresh 40 MB
    output costs a few hundred page faults instead of ten thousand (about twice as fast here)."""
    if dtype in _NUMPY_DTYPES:
        return torch.from_numpy(np.empty(n, dtype=_NUMPY_DTYPES[dtype]))
    return torch.empty(n, dtype=dtype)


@dataclass(frozen=True, eq=False)
class Compressed:
    """Base of every payload: the length and dtype of the vector it stands for."""

    numel: int
    dtype: torch.dtype

    def to_dense(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Dense(Compressed):
    """Every coordinate: value_j = scale * values_j, `values` in float32, float16 or bfloat16.

    `scale` (float32, finite, nonzero unless all values are zero) lets half precision carry
    vectors outside its range: fp16 sends x / max|x|.
    """

    values: torch.Tensor
    scale: float = 1.0

    def to_dense(self) -> torch.Tensor:
        v = self.values
        if v.device.type == "cpu" and self.dtype == torch.float32 and v.dtype != torch.float32:
            # values -> float32 (times scale), chunk by chunk into one output: the same roundings as
            # below without a float32 temporary of the whole vector
            out = cpu_empty(v.numel(), torch.float32)
            for start in range(0, v.numel(), CHUNK):
                part = out[start : start + CHUNK]
                part.copy_(v[start : start + CHUNK])
                if self.scale != 1.0:
                    part.mul_(self.scale)
            return out
        if self.scale == 1.0:
            return v.to(self.dtype)
        return (v.to(torch.float32) * self.scale).to(self.dtype)

    @property
    def device(self) -> torch.device:
        return self.values.device


@dataclass(frozen=True, eq=False)
class Sparse(Compressed):
    """A support of `indices` (int64, strictly increasing, in [0, numel)) and the values there.

    `values` is itself a payload over len(indices) coordinates, so a sparsifier composes with
    any value compressor. When `seed` is set the indices are `shared_indices(seed, numel, k)`
    and only the seed is sent.
    """

    indices: torch.Tensor
    values: Compressed
    seed: int | None = None

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        out[self.indices] = self.values.to_dense().to(self.dtype)
        return out

    @property
    def device(self) -> torch.device:
        return self.indices.device


@dataclass(frozen=True, eq=False)
class Quantized(Compressed):
    """Random dithering (QSGD): value_j = scale * (-1)^negative_j * magnitudes_j / levels.

    `magnitudes` are integers in [0, levels] (int32); `negative` is a bool mask; `scale` is the
    norm used (float32).
    """

    scale: float
    levels: int
    negative: torch.Tensor
    magnitudes: torch.Tensor

    def nonzero_levels(self) -> torch.Tensor:
        """Ascending int64 positions of the nonzero magnitudes (the coordinates not decoded to 0)."""
        mags = self.magnitudes.reshape(-1)
        if mags.device.type == "cpu":  # numpy finds a bool mask's ones several times faster than torch.nonzero
            return torch.from_numpy(np.flatnonzero(mags.numpy() != 0))
        return torch.nonzero(mags).reshape(-1)

    def values_at(self, indices: torch.Tensor) -> torch.Tensor:
        """to_dense()[indices], bit for bit, without the dense vector."""
        return self._values(self.magnitudes[indices], self.negative[indices], self._step())

    def _step(self) -> torch.Tensor:
        """scale / levels, in float32: the value of one level."""
        return torch.tensor(self.scale, dtype=torch.float32) / self.levels

    def _subnormal(self, step: torch.Tensor) -> bool:
        return self.scale > 0 and float(step) < torch.finfo(torch.float32).tiny

    def _values(self, mags: torch.Tensor, negative: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        if self._subnormal(step):
            # a subnormal step has few significant bits: scale in float64, round once to float32
            values = (mags.to(torch.float64) * (self.scale / self.levels)).to(torch.float32)
        else:
            values = mags.to(torch.float32) * step.to(mags.device)
        return torch.where(negative, -values, values).to(self.dtype)

    def to_dense(self) -> torch.Tensor:
        step = self._step()
        if self.device.type != "cpu" or self._subnormal(step):
            return self._values(self.magnitudes, self.negative, step)
        # magnitudes * step (exact float32 products, as in _values), then the sign bit set where
        # negative, chunk by chunk: one pass over the output, no temporaries of its size
        out = np.empty(self.numel, dtype=np.float32)
        mags, negative = self.magnitudes.numpy(), self.negative.numpy().view(np.uint8)
        sign = np.empty(min(self.numel, NUMPY_CHUNK), dtype=np.uint32)
        for start in range(0, self.numel, NUMPY_CHUNK):
            part = out[start : start + NUMPY_CHUNK]
            np.copyto(part, mags[start : start + NUMPY_CHUNK], casting="unsafe")
            np.multiply(part, step.numpy(), out=part)
            bits = sign[: part.size]
            np.left_shift(negative[start : start + NUMPY_CHUNK], 31, out=bits, dtype=np.uint32)
            np.bitwise_or(part.view(np.uint32), bits, out=part.view(np.uint32))
        return torch.from_numpy(out).to(self.dtype)

    @property
    def device(self) -> torch.device:
        return self.magnitudes.device


# Natural compression sends powers of two. Every float32 power of two, subnormals included,
# is 2**e with e in [-149, 127]; code = e + NATURAL_BIAS lies in [1, 277] and code 0 is zero.
NATURAL_BIAS = 150
NATURAL_MAX_CODE = 127 + NATURAL_BIAS
# the float32 bits of the value of each code: 0 for code 0, else 2**(code - NATURAL_BIAS)
_NATURAL_BITS = (
    np.concatenate([[0.0], np.ldexp(np.float32(1.0), np.arange(1, NATURAL_MAX_CODE + 1) - NATURAL_BIAS)])
    .astype(np.float32)
    .view(np.uint32)
)


@dataclass(frozen=True, eq=False)
class Natural(Compressed):
    """Natural compression: value_j = (-1)^negative_j * 2**(codes_j - NATURAL_BIAS), 0 if code 0.

    `codes` is int16 in [0, NATURAL_MAX_CODE].
    """

    negative: torch.Tensor
    codes: torch.Tensor

    def to_dense(self) -> torch.Tensor:
        if self.device.type == "cpu":
            # the float32 bits of every 2**(code - NATURAL_BIAS) from a table (exactly what exp2
            # gives), and the sign bit where negative: two vectorised passes instead of five, chunk
            # by chunk, so that the codes cast to intp (for the look-up) and the sign bits stay small
            codes, negative = self.codes.numpy(), self.negative.numpy().view(np.uint8)
            bits = np.empty(self.numel, dtype=np.uint32)
            sign = np.empty(min(self.numel, NUMPY_CHUNK), dtype=np.uint32)
            for start in range(0, self.numel, NUMPY_CHUNK):
                part = bits[start : start + NUMPY_CHUNK]
                np.take(_NATURAL_BITS, codes[start : start + NUMPY_CHUNK].astype(np.intp), out=part)
                np.left_shift(negative[start : start + NUMPY_CHUNK], 31, out=sign[: part.size], dtype=np.uint32)
                part |= sign[: part.size]
            return torch.from_numpy(bits.view(np.float32)).to(self.dtype)
        exponents = self.codes.to(torch.float32) - NATURAL_BIAS
        values = torch.where(self.codes == 0, 0.0, torch.exp2(exponents))
        return torch.where(self.negative, -values, values).to(self.dtype)

    @property
    def device(self) -> torch.device:
        return self.codes.device


@dataclass(frozen=True, eq=False)
class Sign(Compressed):
    """value_j = scale * (-1)^negative_j (scale is float32; zero inputs count as positive)."""

    scale: float
    negative: torch.Tensor

    def to_dense(self) -> torch.Tensor:
        if self.device.type == "cpu":
            # the float32 bits of +-scale: the sign bit from `negative`, the rest from scale; one
            # vectorised pass where torch.where with scalars takes several times as long
            bits = np.left_shift(self.negative.numpy().view(np.uint8), 31, dtype=np.uint32)
            bits |= np.float32(self.scale).view(np.uint32)
            return torch.from_numpy(bits.view(np.float32)).to(self.dtype)
        scale = torch.tensor(self.scale, dtype=torch.float32, device=self.device)
        return torch.where(self.negative, -scale, scale).to(self.dtype)

    @property
    def device(self) -> torch.device:
        return self.negative.device


@dataclass(frozen=True, eq=False)
class LowRankBlock:
    """The coordinates [offset, offset + rows*cols) of the vector, as the matrix p @ q.T."""

    offset: int
    rows: int
    cols: int
    p: torch.Tensor  # rows x rank, float32
    q: torch.Tensor  # cols x rank, float32


@dataclass(frozen=True, eq=False)
class LowRank(Compressed):
    """Low-rank factors for the matrix blocks of a model; every other coordinate in `rest`.

    `rest` covers, in order, the coordinates outside all blocks (biases, small tensors).
    """

    blocks: tuple[LowRankBlock, ...]
    rest: Compressed

    def to_dense(self) -> torch.Tensor:
        out = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        covered = torch.zeros(self.numel, dtype=torch.bool, device=self.device)
        for b in self.blocks:
            size = b.rows * b.cols
            out[b.offset : b.offset + size] = (b.p @ b.q.T).reshape(-1).to(self.dtype)
            covered[b.offset : b.offset + size] = True
        out[~covered] = self.rest.to_dense().to(self.dtype)
        return out

    @property
    def device(self) -> torch.device:
        return self.rest.device


def shared_indices(seed: int, numel: int, count: int) -> torch.Tensor:
    """The sorted support that a shared-seed rand-k payload stands for: a uniform count-subset.

    Sender and receiver both call this on the CPU (the same torch gives the same stream on every
    machine), so only the seed crosses the wire. For count <= numel/4 it draws indices with
    replacement in batches and keeps first occurrences (sampling without replacement, in
    O(count log count)); otherwise it takes a prefix of a random permutation.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if count * 4 > numel:
        return torch.randperm(numel, generator=gen)[:count].sort().values
    draws = torch.empty(0, dtype=torch.int64)
    distinct = torch.empty(0, dtype=torch.int64)
    while distinct.numel() < count:
        missing = count - distinct.numel()
        # expected repeats among m draws are about m^2 / (2 numel); over-draw a little
        batch = missing + missing * count // numel + 16
        draws = torch.cat([draws, torch.randint(0, numel, (batch,), generator=gen)])
        distinct = _first_occurrences(draws)
    return distinct[:count].sort().values


def _first_occurrences(draws: torch.Tensor) -> torch.Tensor:
    """The distinct values of `draws` in the order they first appear."""
    values, inverse = torch.unique(draws, return_inverse=True)
    first = torch.full((values.numel(),), draws.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(draws.numel()), reduce="amin")
    return values[first.argsort()]
