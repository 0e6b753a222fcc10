"""Keep-masks from scores: per output row, per layer, or N:M (N kept in every M consecutive columns).

Ties are broken by position (stable sorts), so a mask is a deterministic function of its scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import PruneError

GROUPS = ("row", "layer")


@dataclass(frozen=True)
class NM:
    """N nonzeros kept in every block of M consecutive input columns (2:4 is NVIDIA's sparse tensor cores')."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_nm(text: str) -> NM:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match:
        raise PruneError(f"N:M pattern {text!r} must look like 2:4")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise PruneError(f"N:M pattern {text!r} needs 0 < N < M")
    return NM(n, m)


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= float(sparsity) < 1.0:
        raise PruneError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Along the last dim, a keep-mask that drops the k lowest scores."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        mask.scatter_(-1, order, False)
    return mask


def unstructured(scores: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """Prune int(sparsity * group size) lowest scores within each row (group="row") or the whole layer."""
    sparsity = check_sparsity(sparsity)
    if group == "row":
        return _lowest(scores, int(scores.shape[1] * sparsity))
    if group == "layer":
        return _lowest(scores.reshape(-1), int(scores.numel() * sparsity)).reshape(scores.shape)
    raise PruneError(f"unknown comparison group {group!r}; valid: {', '.join(GROUPS)}")


def nm_applies(cols: int, nm: NM) -> bool:
    return cols % nm.m == 0


def n_of_m(scores: torch.Tensor, nm: NM) -> torch.Tensor:
    """Keep the N highest scores of every block of M consecutive columns of each row."""
    rows, cols = scores.shape
    if not nm_applies(cols, nm):
        raise PruneError(f"{nm} sparsity needs a column count divisible by {nm.m}, got {cols}")
    blocks = scores.reshape(rows, cols // nm.m, nm.m)
    return _lowest(blocks, nm.m - nm.n).reshape(rows, cols)
