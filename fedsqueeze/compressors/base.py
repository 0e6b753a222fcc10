"""The compressor interface and its declared constants.

A compressor C is in the class C(eta, omega) of Condat, Yi and Richtarik (EF-BV, NeurIPS 2022):
    ||E[C(x)] - x|| <= eta ||x||   and   E||C(x) - E[C(x)]||^2 <= omega ||x||^2.
Unbiased compressors have eta = 0; contractive ones are in C(sqrt(1 - alpha), 1 - alpha).
`second_moment(d)` bounds E||C(x)||^2 / ||x||^2; compositions use it to derive their constants.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

from .compressed import FLOAT_DTYPES, Compressed


class CompressorError(ValueError):
    """A compressor spec, argument or input that cannot be used; the message says why."""


class Compressor(ABC):
    """An operator x -> Compressed -> x_hat on 1-D float tensors."""

    #: registered name, used in specs
    name: str = ""
    #: E[C(x)] = x for every x
    unbiased: bool = False
    #: C(x) does not depend on the generator
    deterministic: bool = False

    @abstractmethod
    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Compressed:
        """Compress the 1-D float tensor x; all randomness comes from `generator`."""

    def decompress(self, c: Compressed) -> torch.Tensor:
        """The dense vector a payload stands for, in the dtype of the compressed input."""
        return c.to_dense()

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decompress(self.compress(x, generator))

    @abstractmethod
    def eta(self, d: int) -> float | None:
        """Relative bias bound for dimension d (None: no closed form)."""

    @abstractmethod
    def omega(self, d: int) -> float | None:
        """Relative variance bound for dimension d (None: no closed form)."""

    @abstractmethod
    def second_moment(self, d: int) -> float | None:
        """Bound on E||C(x)||^2 / ||x||^2 for dimension d (None: no closed form)."""

    def alpha(self, d: int) -> float | None:
        """Contraction parameter: E||C(x) - x||^2 <= (1 - alpha) ||x||^2, if one is declared.

        From the C(eta, omega) constants: E||C(x) - x||^2 = bias^2 + variance <= eta^2 + omega.
        """
        eta, omega = self.eta(d), self.omega(d)
        if eta is None or omega is None:
            return None
        a = 1.0 - (eta * eta + omega)
        return a if a > 0 else None

    @property
    def spec(self) -> str:
        """The canonical spec string that builds this compressor."""
        args = ", ".join(f"{k}={_format_arg(v)}" for k, v in self.arguments().items())
        return f"{self.name}({args})" if args else self.name

    def arguments(self) -> dict[str, Any]:
        """The arguments of the spec, by name (for `spec` and logging)."""
        return {}

    def __repr__(self) -> str:
        return f"<compressor {self.spec}>"


class Selector(Compressor):
    """A sparsifier: keeps a support and the values there.

    Composition `selector | inner` compresses the kept values with `inner`.
    """

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Compressed:
        from .compressed import Dense, Sparse

        x = check_input(x)
        indices, values, seed = self.select(x, generator)
        return Sparse(x.numel(), x.dtype, indices, Dense(values.numel(), x.dtype, values.to(torch.float32)), seed)

    @abstractmethod
    def select(
        self, x: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """(sorted indices, values to send there, shared seed or None) for a checked input."""

    @abstractmethod
    def max_kept(self, d: int) -> int:
        """The most coordinates kept for dimension d (the dimension an inner compressor sees)."""


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_input(x: torch.Tensor, *, finite: bool = True) -> torch.Tensor:
    """Reject what no compressor can take: not a tensor, not 1-D, not float, not finite.

    finite=False leaves the finiteness check to a caller that reduces x anyway (`checked_peak`).
    """
    if not isinstance(x, torch.Tensor):
        raise CompressorError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        names = ", ".join(str(t).removeprefix("torch.") for t in FLOAT_DTYPES)
        raise CompressorError(f"expected a float tensor ({names}), got {x.dtype}")
    if x.dim() != 1:
        raise CompressorError(f"expected a 1-D tensor, got shape {tuple(x.shape)}; flatten it first")
    if finite and x.numel() > 0:
        check_finite(*extremes(x))
    return x


def check_finite(lo: float, hi: float) -> None:
    """CompressorError unless x's min and max (which NaN and inf propagate to) are finite and
    within float32's range: payloads carry float32, so larger float64 values cannot be sent."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CompressorError("input has non-finite values (NaN or inf)")
    if max(-lo, hi) > FLOAT32_MAX:
        raise CompressorError(f"input values up to {max(-lo, hi):.6g} exceed float32's range, which payloads carry")


def scale_values(values: torch.Tensor, factor: float, name: str) -> torch.Tensor:
    """values * factor, as an unbiased sparsifier scales what it keeps; CompressorError if that
    leaves float32's range (the input's largest values times d/k or 1/p)."""
    out = values * factor
    # min and max propagate NaN and inf: numpy's reductions, not torch.isfinite, whose thread pool
    # costs more than the check on a kept set of 10^5 values
    if out.numel() and not all(map(math.isfinite, extremes(out.to(torch.float32)))):
        raise CompressorError(f"{name}: the kept values times {factor:.6g} exceed float32's range")
    return out


def checked_peak(x: torch.Tensor) -> float:
    """max|x| (0 for an empty x), with the finiteness check of `check_input`: for callers that
    pass finite=False there because they need the peak anyway."""
    if x.numel() == 0:
        return 0.0
    lo, hi = extremes(x)
    check_finite(lo, hi)
    return max(-lo, hi)


def extremes(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a non-empty tensor; NaN and inf propagate, so both are finite iff x is."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        a = x.detach().numpy()  # numpy's reductions are vectorised: about 2.5x torch.aminmax here
        return float(a.min()), float(a.max())
    lo, hi = torch.aminmax(x)
    return float(lo), float(hi)


def _format_arg(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)
