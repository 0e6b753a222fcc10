"""Random numbers for compressors, all drawn from the caller's torch.Generator.

On the CPU, uniforms come from numpy's PCG64 seeded from the generator: about 2.5 times
faster than torch.rand there, and as deterministic. On other devices torch draws them in place.
"""

from __future__ import annotations

import numpy as np
import torch

_SEED_BOUND = 2**63 - 1


def draw_seed(generator: torch.Generator | None) -> int:
    """A 63-bit seed taken from the generator (from torch's default one if None)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, _SEED_BOUND, (1,), generator=generator, device=device).item())


def numpy_rng(generator: torch.Generator | None) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(draw_seed(generator)))


def device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on `device`: the given one if it lives there, else one seeded from it."""
    if generator is None or generator.device == torch.device(device):
        return generator
    return torch.Generator(device=device).manual_seed(draw_seed(generator))


def uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """n float32 uniforms in [0, 1) on `device`."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(numpy_rng(generator).random(n, dtype=np.float32))
    return torch.rand(n, generator=device_generator(generator, device), device=device)
