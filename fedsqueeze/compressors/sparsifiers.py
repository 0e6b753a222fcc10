"""Sparsifiers: top-k, rand-k and Bernoulli (algorithms.md section 1)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import CompressorError, Selector, scale_values
from .compressed import shared_indices
from .randomness import UNIFORM_SHIFT, draw_seed, numpy_rng, uniform, uniform_words
from .registry import register

# Coordinates per chunk in the CPU top-k scan: small enough to stay in cache.
_CHUNK = 1 << 16
# Below this size torch.topk is as fast as the sampled-threshold scan.
_SCAN_MIN = 1 << 16


class _Counted(Selector):
    """A sparsifier that keeps k coordinates, given as `ratio` (k = round(ratio d)) or as `k`."""

    def __init__(self, ratio: float | None = None, k: int | None = None):
        if (ratio is None) == (k is None):
            raise CompressorError(f"{self.name}: give exactly one of ratio or k")
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
                raise CompressorError(f"{self.name}: ratio must be in (0, 1], got {ratio!r}")
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise CompressorError(f"{self.name}: k must be a positive integer, got {k!r}")
        self.ratio = None if ratio is None else float(ratio)
        self.k = k

    def count(self, d: int) -> int:
        """The number of coordinates kept from a d-vector."""
        if self.k is not None:
            if self.k > d:
                raise CompressorError(f"{self.name}: k={self.k} is larger than the dimension d={d}")
            return self.k
        return min(d, max(1, round(self.ratio * d)))

    def max_kept(self, d: int) -> int:
        return self.count(d)

    def arguments(self) -> dict:
        return {"ratio": self.ratio} if self.ratio is not None else {"k": self.k}


@register("topk")
class TopK(_Counted):
    """The k coordinates of largest absolute value. B(k/d), i.e. C(sqrt(1 - k/d), 0)."""

    deterministic = True

    def select(self, x, generator):
        idx = topk_indices(x, self.count(x.numel()))
        return idx, x[idx], None

    def eta(self, d: int) -> float:
        return math.sqrt(1.0 - self.count(d) / d)

    def omega(self, d: int) -> float:
        return 0.0

    def second_moment(self, d: int) -> float:
        return 1.0


@register("randk")
class RandK(_Counted):
    """k uniformly random coordinates, times d/k when scaled (U(d/k - 1)); unscaled: B(k/d).

    The support comes from a seed drawn from the generator, so only the seed is sent.
    """

    def __init__(self, ratio: float | None = None, k: int | None = None, scaled: bool = True):
        super().__init__(ratio, k)
        if not isinstance(scaled, bool):
            raise CompressorError(f"randk: scaled must be true or false, got {scaled!r}")
        self.scaled = scaled
        self.unbiased = scaled

    def select(self, x, generator):
        d = x.numel()
        k = self.count(d)
        seed = draw_seed(generator)
        idx = shared_indices(seed, d, k).to(x.device)
        values = x[idx]
        if self.scaled:
            values = scale_values(values, d / k, "randk")
        return idx, values, seed

    def eta(self, d: int) -> float:
        return 0.0 if self.scaled else 1.0 - self.count(d) / d

    def omega(self, d: int) -> float:
        q = self.count(d) / d
        # scaled: E||C(x) - x||^2 = (d/k - 1)||x||^2; unscaled: Var = q(1 - q)||x||^2 around q x
        return 1.0 / q - 1.0 if self.scaled else q * (1.0 - q)

    def second_moment(self, d: int) -> float:
        q = self.count(d) / d
        return 1.0 / q if self.scaled else q

    def arguments(self) -> dict:
        return {**super().arguments(), "scaled": self.scaled}


@register("bernoulli")
class Bernoulli(Selector):
    """Each coordinate kept independently with probability p, as x_j / p. U(1/p - 1)."""

    unbiased = True

    def __init__(self, p: float):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise CompressorError(f"bernoulli: p must be in (0, 1], got {p!r}")
        self.p = float(p)

    def select(self, x, generator):
        if x.device.type == "cpu":
            idx = torch.from_numpy(self._kept_cpu(x.numel(), numpy_rng(generator)))
        else:
            idx = torch.nonzero(uniform(x.numel(), generator, x.device) < self.p).squeeze(1)
        return idx, scale_values(x[idx], 1.0 / self.p, "bernoulli"), None

    def _kept_cpu(self, d: int, rng: np.random.Generator) -> np.ndarray:
        """Where numpy's float32 uniform u_j < p (float32), chunk by chunk, from the uniforms' words:
        u = (w >> 8) 2^-24 < p exactly when w < ceil(p 2^24) 2^8 (no float is made)."""
        bound = math.ceil(float(np.float32(self.p)) * 2.0**24)
        if bound >= 2**24:  # p = 1: every u < 1 (and rng is this call's own: nothing else draws from it)
            return np.arange(d, dtype=np.int64)
        below = np.uint32(bound << UNIFORM_SHIFT)
        kept = [np.flatnonzero(uniform_words(rng, min(_CHUNK, d - start)) < below) + start
                for start in range(0, d, _CHUNK)]  # fmt: skip
        return np.concatenate(kept) if kept else np.empty(0, dtype=np.int64)

    def max_kept(self, d: int) -> int:
        return d

    def eta(self, d: int) -> float:
        return 0.0

    def omega(self, d: int) -> float:
        return 1.0 / self.p - 1.0

    def second_moment(self, d: int) -> float:
        return 1.0 / self.p

    def arguments(self) -> dict:
        return {"p": self.p}


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k entries of largest |x| (ties broken by torch.topk).

    On the CPU, large inputs take a threshold from a strided sample, scan for candidates in
    cache-sized chunks and run torch.topk on the candidates only; a threshold that admits fewer
    than k falls back to torch.topk over everything, so the result is always exact.
    """
    d = x.numel()
    if k >= d:
        return torch.arange(d, device=x.device)
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    if x.device.type != "cpu" or d < _SCAN_MIN or k > d // 8:
        return torch.topk(x.abs(), k, sorted=False).indices.sort().values
    xs = x.detach().to(torch.float32).contiguous().numpy()
    candidates = _candidates(xs, _threshold(xs, k))
    if candidates.size < k:
        return torch.topk(x.abs(), k, sorted=False).indices.sort().values
    # exact selection among the candidates, in x's own precision where numpy has it
    exact = x.detach().numpy() if x.dtype in (torch.float32, torch.float64) else xs
    magnitudes = np.abs(exact[candidates])
    best = np.argpartition(magnitudes, magnitudes.size - k)[magnitudes.size - k :]
    return torch.from_numpy(np.sort(candidates[best]))


def _threshold(xs: np.ndarray, k: int) -> float:
    """A value of |x| that about 1.25 k + 4 sqrt(k) entries exceed, read off a strided sample."""
    d = xs.size
    step = max(1, d // (1 << 17))
    sample = np.abs(xs[::step])
    n = sample.size
    want = min(d, 1.25 * k + 4.0 * math.sqrt(k) + 16)
    rank = int(n - want * n / d)
    if rank <= 0:
        return 0.0
    return float(np.partition(sample, rank)[rank])


def _candidates(xs: np.ndarray, threshold: float) -> np.ndarray:
    """Indices with |x| >= threshold, scanned in chunks that stay in cache."""
    d = xs.size
    buf = np.empty(min(d, _CHUNK), dtype=np.float32)
    mask = np.empty(min(d, _CHUNK), dtype=bool)
    found = []
    for start in range(0, d, _CHUNK):
        chunk = xs[start : start + _CHUNK]
        n = chunk.size
        np.abs(chunk, out=buf[:n])
        np.greater_equal(buf[:n], threshold, out=mask[:n])
        hits = np.flatnonzero(mask[:n])
        if hits.size:
            found.append(hits + start)
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)
