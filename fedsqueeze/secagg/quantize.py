"""Stochastic quantisation to b bits on a scale common to the cohort (Suresh et al., ICML 2017;
Bonawitz et al., Asilomar 2019): what makes a client's values integers that sum exactly.

With the public clip c and L = 2^b - 1 levels, the step is D = 2c / L and
    q = floor((clip(v, -c, c) + c) / D + U),   U ~ Unif[0, 1) private to the client,
so q is in {0, ..., L} and E[q D - c] = clip(v, -c, c): unbiased wherever |v| <= c. The sum over n
clients is S = sum_i q_i < n 2^b, and sum_i clip(v_i) is estimated by D S - n c. The rounding
noise must never come from a seed the server knows (it would subtract it): callers pass a generator
seeded from the operating system.
"""

from __future__ import annotations

import numpy as np

from .masking import WORDS


def levels(bits: int) -> int:
    return 2**bits - 1


def encode(v: np.ndarray, clip: float, bits: int, word: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(q in Z_{2^word}, the number of coordinates the clip changed) for the float vector v."""
    top = levels(bits)
    x = np.asarray(v, dtype=np.float64)
    clipped = int(np.count_nonzero(np.abs(x) > clip))
    scaled = (np.clip(x, -clip, clip) + clip) * (top / (2.0 * clip))
    q = np.floor(scaled + rng.random(x.size))
    return np.clip(q, 0, top).astype(WORDS[word]), clipped


def decode_sum(total: np.ndarray, contributors: int, clip: float, bits: int) -> np.ndarray:
    """sum_i clip(v_i) (float64) from the unmasked sum of `contributors` encoded vectors."""
    step = 2.0 * clip / levels(bits)
    return total.astype(np.float64) * step - contributors * clip
