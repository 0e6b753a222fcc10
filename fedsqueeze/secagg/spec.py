"""The `secagg` config value and which runs it can protect.

    secagg = "none"                                   plaintext replies (the default)
    secagg = "masked(threshold=t, bits=b, clip=c)"    the four-stage secure round (fedsqueeze.secagg.session)

t: the fewest clients whose shares unmask a round (above half the cohort, at most the cohort); b: the
bits of each coordinate's stochastic rounding (1..16, default 8); c: the public clip of every coordinate
of a client's update before its sparsifier scales it (default 0.05; values beyond it are clipped, which
biases them: choose c above the updates' coordinates).

Only a sum can be unmasked, so the server's decoding must be a function of the sum of the replies:
- compressors: `identity`, and the sparsifiers whose support is common to the cohort, `randk` and
  `bernoulli` with `randomness = "shared"` (one round seed for every client), alone or chained; their
  values are then rounded to b bits on the common scale [-c, c]. Top-k (a private support), qsgd,
  natural, sign, scaled_sign (a per-client norm or scale), fp16/bf16 (a per-client scale) and powersgd
  (non-linear) are refused;
- feedback: "none" (the server's estimate is the weighted mean of the cohort's messages). The stateful
  mechanisms keep client memory that must follow each message exactly as the server decodes it,
  which the rounding changes; ef21, efbv and diana with init = "zero" would need only the sum on the
  server, but their client memory is not yet kept for the rounded message, so they are refused too;
- aggregation: "mean" only (median, trimmed mean and Krum need each client's vector);
- max-update-norm: 0 (the server cannot see a reply's norm; the clip bounds every coordinate);
- algorithms that weigh clients by values they report each round are refused (the weights would be
  per-client plaintext); fixed shares and a sampling's s_i / p_i are the server's own and are applied
  by each client to its vector before rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedsqueeze.specs import SpecError, parse_call

NONE = "none"
NAME = "masked"
EXAMPLE = "masked(threshold=8, bits=8, clip=0.05)"
DEFAULT_BITS = 8
DEFAULT_CLIP = 0.05
#: the compressors whose decoding is a function of the sum, and those of them that need shared randomness
SUM_DECODABLE = ("identity", "randk", "bernoulli")
RANDOMISED = ("randk", "bernoulli")
COMPATIBLE_EXAMPLE = 'compressor = "randk(ratio=0.1)" with randomness = "shared"'


class SecAggSpecError(ValueError):
    """A secagg value, or a run it cannot protect; the message says why and names what would work."""


@dataclass(frozen=True)
class SecAgg:
    threshold: int
    bits: int = DEFAULT_BITS
    clip: float = DEFAULT_CLIP

    @property
    def spec(self) -> str:
        return f"{NAME}(threshold={self.threshold}, bits={self.bits}, clip={self.clip!r})"


def parse(text: str) -> SecAgg | None:
    """The SecAgg of a `secagg` value, or None for "none"."""
    if text.strip() == NONE:
        return None
    try:
        call = parse_call(text, example=EXAMPLE)
        if call.name != NAME:
            raise SecAggSpecError(f"unknown secure aggregation {call.name!r}; write {NONE!r} or e.g. {EXAMPLE!r}")
        args = call.bind(("threshold", "bits", "clip"))
    except SpecError as exc:
        raise SecAggSpecError(str(exc)) from None
    if "threshold" not in args:
        raise SecAggSpecError(f"{NAME} needs a threshold, e.g. {EXAMPLE!r}")
    threshold, bits = args["threshold"], args.get("bits", DEFAULT_BITS)
    clip = args.get("clip", DEFAULT_CLIP)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise SecAggSpecError(f"threshold must be a positive integer, got {threshold!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise SecAggSpecError(f"bits must be an integer in 1..16, got {bits!r}")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0:
        raise SecAggSpecError(f"clip must be a finite number > 0, got {clip!r}")
    return SecAgg(int(threshold), int(bits), float(clip))


def check_compressor(spec: str, shared: bool) -> None:
    """SecAggSpecError unless every stage of `spec` decodes as a function of the cohort's sum."""
    from fedsqueeze.compressors import parse as parse_spec

    for name, _, _ in parse_spec(spec):
        if name not in SUM_DECODABLE:
            raise SecAggSpecError(
                f"{spec!r} cannot be aggregated securely: {name} gives each client its own support, norm or "
                f"scale, so the server could not decode the sum alone; use {COMPATIBLE_EXAMPLE}, or identity"
            )
        if name in RANDOMISED and not shared:
            raise SecAggSpecError(
                f'{spec!r} draws a support per client with randomness = "independent": the masks cancel only on '
                'a support common to the cohort: set randomness = "shared"'
            )
