"""Composition `S | C`: a sparsifier S keeps a support, then C compresses the kept values.

Constants (proofs in the comments of `Chain`): with S in C(eta1, omega1) with second moment m1,
and C in C(eta2, omega2) with second moment m2, both at the dimensions they see,
    eta   <= eta1 + eta2 sqrt(m1)
    omega <= omega2 m1 + (sqrt(omega1) + eta2 sqrt(m1))^2     (omega2 m1 if S is deterministic)
    m     <= m1 m2.
For comp-(k, k') = topk(k') | randk(k, scaled=true) this gives C(sqrt((d - k')/d), (k' - k)/k),
the constants of EF-BV (algorithms.md section 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import Compressor, CompressorError, Selector, check_input
from .compressed import Compressed, Sparse


class Chain(Selector):
    """`outer | inner`: outer selects coordinates, inner compresses the selected values."""

    def __init__(self, outer: Selector, inner: Compressor):
        self.outer = outer
        self.inner = inner
        self.name = f"{outer.name}|{inner.name}"
        self.unbiased = outer.unbiased and inner.unbiased
        self.deterministic = outer.deterministic and inner.deterministic

    @property
    def spec(self) -> str:
        return f"{self.outer.spec} | {self.inner.spec}"

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Compressed:
        x = check_input(x)
        indices, values, seed = self.outer.select(x, generator)
        inner = self.inner.compress(values, generator)
        if isinstance(inner, Sparse):
            # a support within the support: send the composed indices, which cost less than
            # the outer support plus the inner one
            return Sparse(x.numel(), x.dtype, indices[inner.indices], inner.values)
        return Sparse(x.numel(), x.dtype, indices, inner, seed)

    def select(self, x, generator):
        if not isinstance(self.inner, Selector):
            raise CompressorError(f"{self.spec}: only a chain of sparsifiers can be composed further")
        indices, values, _ = self.outer.select(x, generator)
        inner_idx, inner_values, _ = self.inner.select(values, generator)
        return indices[inner_idx], inner_values, None

    def max_kept(self, d: int) -> int:
        if not isinstance(self.inner, Selector):
            raise CompressorError(f"{self.spec}: only a chain of sparsifiers can be composed further")
        return self.inner.max_kept(self.outer.max_kept(d))

    def _constants(self, d: int) -> tuple[float, float, float] | None:
        k = self.outer.max_kept(d)
        parts = (
            self.outer.eta(d), self.outer.omega(d), self.outer.second_moment(d),
            self.inner.eta(k), self.inner.omega(k), self.inner.second_moment(k),
        )  # fmt: skip
        if any(p is None for p in parts):
            return None
        eta1, omega1, m1, eta2, omega2, m2 = parts
        # Bias: E C(S x) - x = E_S[b(Sx)] + (E Sx - x), ||b(y)|| <= eta2 ||y||, and
        # E||Sx|| <= sqrt(E||Sx||^2) <= sqrt(m1) ||x||.
        eta = eta1 + eta2 * math.sqrt(m1)
        # Variance: law of total variance over S. E_S Var_C <= omega2 E||Sx||^2 <= omega2 m1 ||x||^2,
        # and Var_S(Sx + b(Sx)) <= (sqrt(Var Sx) + sqrt(E||b||^2))^2, zero if S is deterministic.
        omega = omega2 * m1
        if not self.outer.deterministic:
            omega += (math.sqrt(omega1) + eta2 * math.sqrt(m1)) ** 2
        return eta, omega, m1 * m2

    def eta(self, d: int) -> float | None:
        c = self._constants(d)
        return None if c is None else c[0]

    def omega(self, d: int) -> float | None:
        c = self._constants(d)
        return None if c is None else c[1]

    def second_moment(self, d: int) -> float | None:
        c = self._constants(d)
        return None if c is None else c[2]


def compose(stages: Sequence[Compressor]) -> Compressor:
    """The chain stages[0] | stages[1] | ...; every stage but the last must be a sparsifier."""
    if not stages:
        raise CompressorError("a compressor spec needs at least one stage")
    result = stages[-1]
    for stage in reversed(stages[:-1]):
        if not isinstance(stage, Selector):
            raise CompressorError(
                f"{stage.spec} cannot come before '|': only sparsifiers (topk, randk, bernoulli, ...) "
                f"keep values that a later stage can compress"
            )
        result = Chain(stage, result)
    return result
