"""Random numbers for compressors, all drawn from the caller's torch.Generator.

On the CPU, uniforms come from numpy's PCG64 seeded from the generator: about 2.5 times
faster than torch.rand there, and as deterministic. On other devices torch draws them in place.
`uniform_words` gives the 32-bit words behind numpy's float32 uniforms, so that a compressor
can compare them as integers (or convert them itself) at about twice the speed of drawing floats,
with the very same values.
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


#: numpy's float32 uniform is (w >> 8) * 2**-24 for the next 32-bit word w of the bit generator
UNIFORM_SHIFT = 8
UNIFORM_STEP = np.float32(2.0**-24)


def uniform_words(rng: np.random.Generator, n: int) -> np.ndarray:
    """The n uint32 words that `rng.random(n, dtype=np.float32)` would turn into its uniforms (the
    j-th uniform is (w_j >> UNIFORM_SHIFT) * UNIFORM_STEP), leaving `rng` in the state that call
    leaves it in.

    PCG64 makes 64-bit words, and numpy hands out their low half, then their high half (keeping a
    high half for the next draw when n is odd); `random_raw` draws the 64-bit words in one call,
    where numpy's float loop takes about twice as long."""
    bits = rng.bit_generator
    state = bits.state
    if state["bit_generator"] != "PCG64":  # the layout below is PCG64's
        raise TypeError(f"uniform_words needs a PCG64 generator, not {state['bit_generator']}")
    if n == 0:
        return np.empty(0, dtype=np.uint32)
    held = [state["uinteger"]] if state["has_uint32"] else []
    if held:
        bits.state = {**state, "has_uint32": 0}
    rest = n - len(held)
    words = bits.random_raw((rest + 1) // 2).view(np.uint32)
    if rest % 2:  # the high half of the last word waits for the next draw, as numpy keeps it
        bits.state = {**bits.state, "has_uint32": 1, "uinteger": int(words[rest])}
    words = words[:rest]
    return np.concatenate([np.array(held, dtype=np.uint32), words]) if held else words


def uniform_into(rng: np.random.Generator, out: np.ndarray) -> np.ndarray:
    """`rng.random(out.size, dtype=np.float32, out=out)`: the same values and generator state, faster."""
    return uniforms_of(uniform_words(rng, out.size), out)


def uniforms_of(words: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The float32 uniforms of `uniform_words`' words, into `out` (the words are shifted in place)."""
    np.right_shift(words, UNIFORM_SHIFT, out=words)
    np.copyto(out, words, casting="unsafe")  # < 2**24: exact in float32
    return np.multiply(out, UNIFORM_STEP, out=out)


def device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on `device`: the given one if it lives there, else one seeded from it."""
    if generator is None or generator.device == torch.device(device):
        return generator
    return torch.Generator(device=device).manual_seed(draw_seed(generator))


def uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """n float32 uniforms in [0, 1) on `device`."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(uniform_into(numpy_rng(generator), np.empty(n, dtype=np.float32)))
    return torch.rand(n, generator=device_generator(generator, device), device=device)
