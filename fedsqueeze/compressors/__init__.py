"""Compression operators: `build(spec)` turns a spec string into a `Compressor`.

Built-in names: identity, fp16, bf16, topk, randk, bernoulli, qsgd, natural, sign,
scaled_sign, powersgd; compose with `|` (a sparsifier first). See the README for constants.
"""

from . import lowrank, precision, quantizers, signs, sparsifiers  # noqa: F401  (register built-ins)
from .base import Compressor, CompressorError, Selector
from .compose import Chain
from .compressed import (
    Compressed,
    Dense,
    LowRank,
    LowRankBlock,
    Natural,
    Quantized,
    Sign,
    Sparse,
    shared_indices,
)
from .registry import available, build, parse, register

__all__ = [
    "Chain",
    "Compressed",
    "Compressor",
    "CompressorError",
    "Dense",
    "LowRank",
    "LowRankBlock",
    "Natural",
    "Quantized",
    "Selector",
    "Sign",
    "Sparse",
    "available",
    "build",
    "parse",
    "register",
    "shared_indices",
]
