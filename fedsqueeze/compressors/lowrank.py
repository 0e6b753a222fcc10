"""PowerSGD: rank-r approximation of every matrix block of a model (Vogels et al. 2019).

For each weight of the layout with two or more dimensions (conv kernels are viewed as
out_channels x rest), one step of subspace iteration from a warm-started Q:
    P = M Q,  P = orthonormalise(P),  Q = M^T P,  M ~ P Q^T.
Blocks where rank r would not save bytes, and every 1-D tensor, are sent dense. The warm
start is state the caller keeps: pass the previous payload as `warm_start`. Biased and
contractive with a data-dependent factor: no closed-form constants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import Compressor, CompressorError, check_input
from .compressed import Dense, LowRank, LowRankBlock
from .randomness import device_generator
from .registry import register


@register("powersgd", needs_layout=True)
class PowerSGD(Compressor):
    deterministic = False

    def __init__(self, rank: int = 2, layout: Sequence[Sequence[int]] | None = None):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise CompressorError(f"powersgd: rank must be a positive integer, got {rank!r}")
        if layout is None:
            raise CompressorError("powersgd needs the tensor layout of the model: build(spec, layout=[shape, ...])")
        self.rank = rank
        self.layout = [tuple(int(n) for n in shape) for shape in layout]
        self.numel = sum(math.prod(shape) for shape in self.layout)
        self.blocks: list[tuple[int, int, int]] = []  # (offset, rows, cols)
        offset = 0
        for shape in self.layout:
            size = math.prod(shape)
            if len(shape) >= 2:
                rows, cols = shape[0], size // shape[0]
                if rank < min(rows, cols) and rank * (rows + cols) < rows * cols:
                    self.blocks.append((offset, rows, cols))
            offset += size

    def compress(
        self, x: torch.Tensor, generator: torch.Generator | None = None, warm_start: LowRank | None = None
    ) -> LowRank:
        x = check_input(x)
        if x.numel() != self.numel:
            raise CompressorError(f"powersgd: input has {x.numel()} values, the layout {self.layout} has {self.numel}")
        xf = x.to(torch.float32)
        previous = self._warm_factors(warm_start)
        gen = device_generator(generator, x.device)
        blocks = []
        rest = torch.ones(self.numel, dtype=torch.bool, device=x.device)
        for i, (offset, rows, cols) in enumerate(self.blocks):
            m = xf[offset : offset + rows * cols].view(rows, cols)
            q = previous[i] if previous is not None else None
            if q is None:
                q = torch.randn(cols, self.rank, generator=gen, device=x.device)
            p = torch.linalg.qr(m @ q.to(x.device)).Q
            q = m.T @ p
            blocks.append(LowRankBlock(offset, rows, cols, p.contiguous(), q.contiguous()))
            rest[offset : offset + rows * cols] = False
        values = xf[rest]
        return LowRank(self.numel, x.dtype, tuple(blocks), Dense(values.numel(), x.dtype, values))

    def _warm_factors(self, warm_start: LowRank | None) -> list[torch.Tensor | None] | None:
        if warm_start is None:
            return None
        if [(b.offset, b.rows, b.cols) for b in warm_start.blocks] != self.blocks or any(
            b.q.shape[1] != self.rank for b in warm_start.blocks
        ):
            raise CompressorError("powersgd: warm start comes from a different layout or rank")
        return [b.q for b in warm_start.blocks]

    def eta(self, d: int) -> None:
        return None

    def omega(self, d: int) -> None:
        return None

    def second_moment(self, d: int) -> None:
        return None

    def arguments(self) -> dict:
        return {"rank": self.rank}
