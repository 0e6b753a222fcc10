"""Dense operators that only change the precision: identity (float32), fp16, bf16."""

from __future__ import annotations

import math

import torch

from .base import Compressor, CompressorError, check_input, checked_peak
from .compressed import CHUNK, Dense, cpu_empty
from .registry import register


class _Cast(Compressor):
    unbiased = False
    deterministic = True
    #: precision of the values on the wire
    value_dtype: torch.dtype = torch.float32
    #: bound on the relative rounding error of one value (half a unit in the last place)
    unit_roundoff: float = 0.0

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Dense:
        x = check_input(x, finite=False)
        peak, largest = checked_peak(x), torch.finfo(self.value_dtype).max
        if peak > largest:  # bf16 rounds the top of float32's range to inf
            raise CompressorError(f"{self.name}: |x| up to {peak:.6g} is beyond {largest:.6g}; use fp16")
        return Dense(x.numel(), x.dtype, x.to(self.value_dtype))

    def eta(self, d: int) -> float:
        return self.unit_roundoff

    def omega(self, d: int) -> float:
        return 0.0

    def second_moment(self, d: int) -> float:
        return (1.0 + self.unit_roundoff) ** 2


@register("identity")
class Identity(_Cast):
    """Every coordinate in float32: exact for float32 input (float64 input is rounded to float32,
    as every payload carries it; the declared constants are those of float32 arithmetic)."""

    unbiased = True


@register("bf16")
class BF16(_Cast):
    """bfloat16 values: float32's range, 8 significant bits, round to nearest."""

    value_dtype = torch.bfloat16
    # round to nearest with 8 significant bits; subnormal bf16 is float32's subnormal range,
    # where the absolute error (<= 2**-134) is negligible beside any float32 norm
    unit_roundoff = 2.0**-8


@register("fp16")
class FP16(_Cast):
    """float16 values of x / max|x| and the float32 scale max|x|, so no value overflows."""

    value_dtype = torch.float16

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Dense:
        x = check_input(x, finite=False)
        scale = float(torch.tensor(checked_peak(x), dtype=torch.float32))
        if scale == 0.0:  # all zeros, or float64 input below float32's smallest: every value rounds to 0
            return Dense(x.numel(), x.dtype, torch.zeros_like(x, dtype=torch.float16))
        if x.device.type != "cpu":
            return Dense(x.numel(), x.dtype, (x.to(torch.float32) / scale).to(torch.float16), scale)
        # (x.to(float32) / scale).to(float16), chunk by chunk: the same roundings without a
        # float32 temporary of the whole vector
        out = cpu_empty(x.numel(), torch.float16)
        buf = torch.empty(min(CHUNK, x.numel()), dtype=torch.float32)
        for start in range(0, x.numel(), CHUNK):
            chunk = x[start : start + CHUNK]
            part = buf[: chunk.numel()]
            if x.dtype == torch.float32:
                torch.div(chunk, scale, out=part)
            else:
                part.copy_(chunk)
                part.div_(scale)
            out[start : start + CHUNK].copy_(part)
        return Dense(x.numel(), x.dtype, out, scale)

    def eta(self, d: int) -> float:
        # normal fp16 values err by at most 2**-11 relative; values below 2**-14 (relative to
        # max|x| <= ||x||) err by at most 2**-25 ||x|| each, sqrt(d) 2**-25 ||x|| together;
        # the float32 division and scale add a few float32 ulps
        return 2.0**-11 + math.sqrt(d) * 2.0**-25 + 2.0**-22

    def second_moment(self, d: int) -> float:
        return (1.0 + self.eta(d)) ** 2
