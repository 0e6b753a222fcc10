"""One bit per coordinate: sign and scaled sign (Bernstein et al. 2018; Karimireddy et al. 2019)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import Compressor, check_input, checked_peak
from .compressed import Sign, cpu_empty
from .registry import register


@register("sign")
class SignCompressor(Compressor):
    """sign(x) with values +-1 (zero counts as +1). Not contractive: no closed-form constants."""

    deterministic = True

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Sign:
        x = check_input(x)
        return Sign(x.numel(), x.dtype, 1.0, x < 0)

    def eta(self, d: int) -> None:
        return None

    def omega(self, d: int) -> None:
        return None

    def second_moment(self, d: int) -> None:
        return None


@register("scaled_sign")
class ScaledSign(Compressor):
    """(||x||_1 / d) sign(x). ||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / d <= (1 - 1/d)||x||^2: B(1/d)."""

    deterministic = True

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Sign:
        x = check_input(x, finite=False)
        d = x.numel()
        peak = checked_peak(x)  # max|x| exactly, and the finiteness check of check_input
        if peak == 0.0:
            scale = 0.0
        else:  # divide by the peak first so that the sum cannot overflow
            unit = cpu_empty(d, x.dtype) if x.device.type == "cpu" else torch.empty_like(x)
            # torch's own norm: its float32 accumulation decides the scale's bits, kept as they were
            scale = peak * float(torch.linalg.vector_norm(torch.div(x, peak, out=unit), ord=1)) / d
        return Sign(d, x.dtype, float(np.float32(scale)), x < 0)

    def eta(self, d: int) -> float:
        return math.sqrt(1.0 - 1.0 / d)

    def omega(self, d: int) -> float:
        return 0.0

    def second_moment(self, d: int) -> float:
        return 1.0
