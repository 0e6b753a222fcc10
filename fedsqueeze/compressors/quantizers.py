"""Unbiased quantisers: random dithering (QSGD) and natural compression."""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import FLOAT32_MAX, Compressor, CompressorError, check_input, checked_peak
from .compressed import NATURAL_BIAS, Natural, Quantized
from .randomness import UNIFORM_SHIFT, device_generator, numpy_rng, uniform, uniform_into, uniform_words, uniforms_of
from .registry import register

# Coordinates per chunk of the CPU dithering loop: a few hundred KiB, so buffers stay in cache.
_CHUNK = 1 << 16
# Largest rounding probability for which QSGD draws only candidates (skip sampling) rather than one
# uniform per coordinate: a candidate costs several times what one coordinate of the dense loop does.
SKIP_SAMPLING_BELOW = 0.125
# Candidates per block of the skip-sampling loop (temporaries of 64 KiB).
_SKIP_BLOCK = 1 << 13


def peak_and_norm(x: torch.Tensor) -> tuple[float, float]:
    """(max|x|, ||x||_2) without overflow or underflow of the squares (huge or tiny vectors).

    CompressorError for non-finite values: QSGD leaves that check to this reduction."""
    peak = checked_peak(x)
    if peak == 0.0:
        return 0.0, 0.0
    unit = 1.0 if 1e-15 < peak < 1e15 else peak  # squares of x / unit are normal float32 numbers
    v = x if unit == 1.0 else x / unit
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        a = v.detach().numpy()
        norm = unit * math.sqrt(float(np.dot(a, a)))  # BLAS dot: one vectorised pass
    else:
        norm = unit * float(torch.linalg.vector_norm(v))
    return peak, max(norm, peak)  # rounding must not put any |x_j| above the norm


def _bernoulli_skip(
    xs: np.ndarray, factor: float, p_max: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitudes Bernoulli(y_j), y_j = |x_j| factor <= p_max < 1, with about d p_max draws, not d.

    Candidates are the events of a Bernoulli(p_max) process over the coordinates, drawn as geometric
    gaps; each candidate is kept with probability y_j / p_max, so P(magnitude_j = 1) = y_j exactly
    and coordinates stay independent. QSGD with the l2 norm on a long vector is this case: every
    |x_j| s / ||x|| is far below 1 and almost every magnitude is 0.
    """
    d = xs.size
    negative = np.zeros(d, dtype=bool)
    magnitudes = np.zeros(d, dtype=np.uint8)
    if p_max <= 0.0:
        return torch.from_numpy(negative), torch.from_numpy(magnitudes)
    # a geometric gap is 1 + floor(E / lambda), E ~ Exp(1), lambda = -log(1 - p_max): P(gap > g) =
    # (1 - p_max)^g; numpy's exponential sampler is about 3x faster than its geometric one. Blocks of
    # _SKIP_BLOCK candidates keep every temporary small enough to be reused, not mapped afresh.
    per_exp = -1.0 / math.log1p(-p_max)
    threshold = p_max / factor  # keep a candidate when u < y_j / p_max, i.e. u * threshold < |x_j|
    last = -1
    while last < d:
        gaps = rng.standard_exponential(_SKIP_BLOCK)
        gaps *= per_exp
        positions = last + np.cumsum(np.floor(gaps, out=gaps).astype(np.int64) + 1)
        last = int(positions[-1])
        if last >= d:
            positions = positions[positions < d]
        values = np.take(xs, positions)
        keep = rng.random(positions.size) * threshold < np.abs(values)
        kept = positions[keep]
        magnitudes[kept] = 1
        negative[kept] = np.signbit(values[keep])
    return torch.from_numpy(negative), torch.from_numpy(magnitudes)


@register("qsgd")
class QSGD(Compressor):
    """Random dithering with s levels (Alistarh et al. 2017): ||x|| sign(x_j) xi_j / s.

    xi_j rounds s|x_j|/||x|| up or down at random so that E[C(x)] = x. With norm="linf" the
    scale is max|x| (finer levels for the same s). U(omega) with
    omega = min(d / (4 s^2), sqrt(d) / s): per coordinate the variance is (scale/s)^2 p(1 - p)
    with p the rounding probability, and p(1 - p) <= min(1/4, p); scale <= ||x||_2 for both
    norms. The QSGD paper states min(d/s^2, sqrt(d)/s), which this bound implies.
    """

    unbiased = True

    def __init__(self, levels: int = 16, norm: str = "l2"):
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= 2**16:
            raise CompressorError(f"qsgd: levels must be an integer in [1, 65536], got {levels!r}")
        if norm not in ("l2", "linf"):
            raise CompressorError(f"qsgd: norm must be one of l2, linf; got {norm!r}")
        self.levels = levels
        self.norm = norm

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Quantized:
        x = check_input(x, finite=False)  # peak_and_norm checks
        d = x.numel()
        mag_dtype = torch.uint8 if self.levels < 256 else torch.int32
        peak, norm = peak_and_norm(x)
        if self.norm == "l2" and norm > FLOAT32_MAX:
            raise CompressorError(f"qsgd: ||x||_2 = {norm:.6g} exceeds float32's range; use norm=linf")
        scale = float(np.float32(norm if self.norm == "l2" else peak))  # >= peak: rounding is monotone
        factor = self.levels / scale if scale > 0 else 0.0
        if x.device.type == "cpu":
            xs = x.detach().to(torch.float32).numpy()
            rng = numpy_rng(generator)
            p_max = peak * factor  # the largest rounding probability when below 1
            if p_max < SKIP_SAMPLING_BELOW:
                negative, magnitudes = _bernoulli_skip(xs, factor, p_max, rng)
            else:
                negative, magnitudes = self._dither_cpu(xs, scale, peak, rng, mag_dtype)
            return Quantized(d, x.dtype, scale, self.levels, negative, magnitudes.to(mag_dtype))
        negative = x < 0
        y = x.abs().to(torch.float32)
        # a scale so small (subnormal) that levels / scale overflows float32: divide, then multiply
        y = y * factor if factor <= FLOAT32_MAX else (y / scale) * self.levels
        u = torch.rand(d, generator=device_generator(generator, x.device), device=x.device)
        magnitudes = self._round(y, u).to(mag_dtype)
        return Quantized(d, x.dtype, scale, self.levels, negative, magnitudes)

    def _round(self, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        low = torch.floor(y)
        return torch.clamp_max(low + (u < y - low), self.levels)

    def _dither_cpu(self, xs: np.ndarray, scale: float, peak: float, rng: np.random.Generator, mag_dtype):
        """(negative, magnitudes), in cache-sized chunks: one pass over x, no large temporaries."""
        negative = np.empty(xs.size, dtype=bool)
        out = np.empty(xs.size, dtype=np.uint8 if mag_dtype == torch.uint8 else np.int32)
        y = np.empty(min(_CHUNK, xs.size), dtype=np.float32)
        low, u, up = np.empty_like(y), np.empty_like(y), np.empty(y.size, dtype=bool)
        factor = self.levels / scale if scale > 0 else 0.0
        # a scale so small (subnormal) that levels / scale overflows float32: divide by it, then multiply
        tiny = factor > FLOAT32_MAX
        factor32 = np.float32(self.levels if tiny else factor)
        scale32, levels32 = np.float32(scale), np.float32(self.levels)
        # rounding is monotone, so y_j <= y of max|x|: when that is <= levels, no y_j rounds past the top
        # level (y_j = levels has no fraction to round up) and the clamp would change nothing
        top = np.float32(peak)  # max|x| in float32 is the largest |xs_j|
        clamp = bool((top / scale32 * factor32 if tiny else top * factor32) > levels32)
        for start in range(0, xs.size, _CHUNK):
            n = min(_CHUNK, xs.size - start)
            chunk, yv, lv, uv, upv = xs[start : start + n], y[:n], low[:n], u[:n], up[:n]
            np.signbit(chunk, out=negative[start : start + n])  # -0.0 too: it decodes to 0
            np.abs(chunk, out=yv)
            if tiny:
                np.divide(yv, scale32, out=yv)
            np.multiply(yv, factor32, out=yv)
            if clamp:  # min(floor(y) + up, levels) is min(y, levels) rounded the same way
                np.minimum(yv, levels32, out=yv)
            np.floor(yv, out=lv)
            np.subtract(yv, lv, out=yv)  # yv is now the probability of rounding up
            uniform_into(rng, uv)
            np.less(uv, yv, out=upv)
            level = out[start : start + n]
            np.copyto(level, lv, casting="unsafe")  # whole numbers in [0, levels]
            np.add(level, upv.view(np.uint8), out=level, casting="unsafe")
        return torch.from_numpy(negative), torch.from_numpy(out)

    def eta(self, d: int) -> float:
        return 0.0

    def omega(self, d: int) -> float:
        s = self.levels
        return min(d / (4.0 * s * s), math.sqrt(d) / s)

    def second_moment(self, d: int) -> float:
        return 1.0 + self.omega(d)

    def arguments(self) -> dict:
        return {"levels": self.levels, "norm": self.norm}


@register("natural")
class NaturalCompression(Compressor):
    """Unbiased stochastic rounding of every value to a power of two (Horvath et al. 2019).

    |x_j| in [2^e, 2^(e+1)) becomes 2^(e+1) with probability |x_j|/2^e - 1, else 2^e. U(1/8).
    Values of magnitude >= 2^127 round down (float32 has no 2^128); that corner is biased.
    """

    unbiased = True

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Natural:
        x = check_input(x)
        xf = x.to(torch.float32)
        if xf.device.type == "cpu":
            return self._compress_cpu(x, xf, generator)
        mantissa, exponent = torch.frexp(xf)  # |x| = |mantissa| 2^exponent, |mantissa| in [0.5, 1)
        p_up = 2.0 * mantissa.abs() - 1.0
        u = uniform(xf.numel(), generator, xf.device)
        e = exponent.to(torch.int32) - 1 + (u < p_up).to(torch.int32)
        codes = torch.clamp(e + NATURAL_BIAS, max=127 + NATURAL_BIAS)
        codes = torch.where(xf == 0, 0, codes).to(torch.int16)
        return Natural(x.numel(), x.dtype, xf < 0, codes)

    @staticmethod
    def _compress_cpu(x: torch.Tensor, xf: torch.Tensor, generator: torch.Generator | None) -> Natural:
        """The device path's codes from the float32 bits, in cache-sized chunks (the uniforms are
        the same stream, drawn chunk by chunk). A normal |x| = (1 + f) 2^E has frexp's p_up = f and
        code E + NATURAL_BIAS + (u < f), i.e. its biased exponent + 23 + (u < f); subnormals and
        zeros (biased exponent 0) are redone with frexp, as on the device."""
        xs = np.ascontiguousarray(xf.detach().numpy())
        d = xs.size
        rng = numpy_rng(generator)
        codes = np.empty(d, dtype=np.int16)
        negative = np.less(xs, 0)
        magnitude = np.empty(min(_CHUNK, d), dtype=np.uint32)
        fraction, top_bits = np.empty_like(magnitude), np.empty_like(magnitude)
        up = np.empty(magnitude.size, dtype=bool)
        top = np.int16(127 + NATURAL_BIAS)
        for start in range(0, d, _CHUNK):
            n = min(_CHUNK, d - start)
            a, fv, kv, upv = magnitude[:n], fraction[:n], top_bits[:n], up[:n]
            out = codes[start : start + n]
            np.bitwise_and(xs[start : start + n].view(np.uint32), np.uint32(0x7FFFFFFF), out=a)
            np.bitwise_and(a, np.uint32(0x7FFFFF), out=fv)  # f = fv 2^-23, exactly
            # u < f for numpy's uniform u = (w >> 8) 2^-24 is (w >> 8) < 2 fv, i.e. (w >> 9) < fv
            words = uniform_words(rng, n)
            np.less(np.right_shift(words, UNIFORM_SHIFT + 1, out=kv), fv, out=upv)
            np.right_shift(a, 23, out=a)
            low = np.flatnonzero(a == 0) if a.min() == 0 else None  # zeros and subnormals
            np.add(a, upv, out=a)
            np.add(a, np.uint32(NATURAL_BIAS - 127), out=a)
            np.minimum(a, top, out=out, casting="unsafe")
            if low is not None:
                sub = xs[start + low]
                mantissa, exponent = np.frexp(sub)
                p_up = np.float32(2.0) * np.abs(mantissa) - np.float32(1.0)
                u = uniforms_of(words[low], np.empty(low.size, dtype=np.float32))
                e = exponent - 1 + (u < p_up) + NATURAL_BIAS
                out[low] = np.where(sub == 0, 0, e)
        return Natural(x.numel(), x.dtype, torch.from_numpy(negative), torch.from_numpy(codes))

    def eta(self, d: int) -> float:
        return 0.0

    def omega(self, d: int) -> float:
        return 1.0 / 8.0

    def second_moment(self, d: int) -> float:
        return 1.0 + 1.0 / 8.0
