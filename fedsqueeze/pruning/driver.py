"""Prune a model from calibration statistics that an `ask` function gathers from the clients.

    result = prune(model, PruneSpec("wanda", 0.5), ask)

`ask(model, layers, outputs)` sends `model` to every client and returns the sum of their statistics
for `layers` (an `Exchange`, with the bytes it moved); the Flower exchange is one such function
(`fedsqueeze.server.calibration`), `local_asker` another (data in this process, for tests).

One-shot (rounds=1): every statistic is taken on the dense model in one exchange. Sequential
(rounds=K > 1): the layers, in module order, are split into K consecutive groups and each group is
calibrated on the model whose earlier groups are already pruned, as Wanda prunes layer by layer
(`inps, outs = outs, inps`); rounds=len(layers) is one exchange per layer. Magnitude pruning needs
no statistics and no exchange. No weight is updated: pruning only zeroes weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import PruneError
from .masks import NM, check_sparsity, n_of_m, nm_applies, unstructured
from .scores import METHODS, score
from .stats import Stats, collect, prunable_layers, weight_matrix

#: the comparison group each method's reference code uses by default (Wanda per output row, RIA per layer)
DEFAULT_GROUP = {"magnitude": "layer", "wanda": "row", "ria": "layer", "symwanda": "row"}


@dataclass
class Exchange:
    """One calibration exchange: the summed statistics and what it cost."""

    stats: Stats
    clients: int
    uplink_bytes: int
    downlink_bytes: int
    failed: list[str] = field(default_factory=list)


Asker = Callable[[nn.Module, Sequence[str], bool], Exchange]


@dataclass(frozen=True)
class PruneSpec:
    method: str
    sparsity: float = 0.5
    nm: NM | None = None
    #: "row" or "layer" (None: the method's default); ignored for N:M
    group: str | None = None
    #: calibration exchanges: 1 (one-shot) .. number of layers (sequential, one per layer); 0 = one per layer
    rounds: int = 1
    #: glob patterns of layer names to leave dense
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PruneError(f"unknown pruning method {self.method!r}; valid: {', '.join(METHODS)}")
        check_sparsity(self.sparsity)
        if self.nm is not None and abs(self.sparsity - self.nm.sparsity) > 1e-12:
            raise PruneError(
                f"{self.nm} sparsity is {self.nm.sparsity:g}, but sparsity {self.sparsity:g} was asked for"
            )
        if self.group not in (None, "row", "layer"):
            raise PruneError(f"unknown comparison group {self.group!r}; valid: row, layer")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise PruneError(f"calibration rounds must be a non-negative integer, got {self.rounds!r}")

    @property
    def comparison(self) -> str:
        return self.group or DEFAULT_GROUP[self.method]

    def describe(self) -> str:
        pattern = str(self.nm) if self.nm else f"{self.sparsity:g} per {self.comparison}"
        return f"{self.method} {pattern}"


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    numel: int
    kept: int
    pattern: str  # "row", "layer", "2:4", or why the layer stayed dense

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.numel


@dataclass
class PruneResult:
    model: nn.Module
    #: state_dict key of each pruned weight -> its keep-mask as the (rows, cols) matrix
    masks: dict[str, torch.Tensor]
    nm_layers: dict[str, NM]
    layers: list[LayerReport]
    exchanges: list[Exchange]

    @property
    def uplink_bytes(self) -> int:
        return sum(e.uplink_bytes for e in self.exchanges)

    @property
    def downlink_bytes(self) -> int:
        return sum(e.downlink_bytes for e in self.exchanges)

    @property
    def sparsity(self) -> float:
        """Zeroed fraction of the prunable layers' weights."""
        total = sum(r.numel for r in self.layers)
        return 1.0 - sum(r.kept for r in self.layers) / total

    def summary(self) -> dict[str, Any]:
        return {
            "sparsity": self.sparsity,
            "layers": [
                {"name": r.name, "shape": list(r.shape), "kept": r.kept, "sparsity": r.sparsity, "pattern": r.pattern}
                for r in self.layers
            ],
            "calibration": {
                "rounds": len(self.exchanges),
                "uplink_bytes": self.uplink_bytes,
                "downlink_bytes": self.downlink_bytes,
                "per_round": [
                    {
                        "layers": list(e.stats.layers),
                        "clients": e.clients,
                        "examples": e.stats.examples,
                        "uplink_bytes": e.uplink_bytes,
                        "downlink_bytes": e.downlink_bytes,
                        "failed": e.failed,
                    }
                    for e in self.exchanges
                ],
            },
        }


def calibration_groups(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The layers calibrated in each exchange: `rounds` consecutive groups (0: one layer each)."""
    k = len(names) if rounds == 0 else rounds
    if not 1 <= k <= len(names):
        raise PruneError(f"calibration rounds must be between 1 and {len(names)} (the prunable layers), got {rounds}")
    return [list(g) for g in np.array_split(np.array(names, dtype=object), k)]


def prune(model: nn.Module, spec: PruneSpec, ask: Asker | None = None, *, stats: Stats | None = None) -> PruneResult:
    """A pruned copy of `model`. Statistics come from `ask`, or from `stats` (one-shot, already gathered)."""
    pruned = copy.deepcopy(model)
    layers = prunable_layers(pruned, spec.exclude)
    names = list(layers)
    needs_stats = spec.method != "magnitude"
    outputs = spec.method == "symwanda"
    if needs_stats and stats is None and ask is None:
        raise PruneError(f"{spec.method} needs calibration statistics: pass `ask` or `stats`")
    groups = [names] if (not needs_stats or stats is not None) else calibration_groups(names, spec.rounds)
    masks: dict[str, torch.Tensor] = {}
    nm_layers: dict[str, NM] = {}
    reports: list[LayerReport] = []
    exchanges: list[Exchange] = []
    for group in groups:
        group_stats = stats
        if needs_stats and stats is None:
            assert ask is not None
            exchange = ask(pruned, group, outputs)
            missing = [n for n in group if n not in exchange.stats.layers]
            if missing:
                raise PruneError(f"the calibration exchange returned no statistics for {missing}")
            exchanges.append(exchange)
            group_stats = exchange.stats
        for name in group:
            module = layers[name]
            w = weight_matrix(module)
            s = score(spec.method, w, group_stats.layers[name] if group_stats is not None else None)
            key = f"{name}.weight"
            if spec.nm is not None:
                if not nm_applies(w.shape[1], spec.nm):
                    reports.append(
                        _report(name, module, None, f"dense ({w.shape[1]} columns, not a multiple of {spec.nm.m})")
                    )
                    continue
                mask = n_of_m(s, spec.nm)
                nm_layers[key] = spec.nm
                pattern = str(spec.nm)
            else:
                mask = unstructured(s, spec.sparsity, spec.comparison)
                pattern = spec.comparison
            with torch.no_grad():
                module.weight.mul_(mask.reshape(module.weight.shape).to(module.weight.dtype))
            masks[key] = mask
            reports.append(_report(name, module, mask, pattern))
    return PruneResult(pruned, masks, nm_layers, reports, exchanges)


def _report(name: str, module: nn.Module, mask: torch.Tensor | None, pattern: str) -> LayerReport:
    numel = module.weight.numel()
    kept = numel if mask is None else int(mask.sum())
    return LayerReport(name, tuple(module.weight.shape), numel, kept, pattern)


def local_asker(x: torch.Tensor, *, batch_size: int = 256) -> Asker:
    """An `ask` over data held in this process (the centralised reference); it moves no bytes."""

    def ask(model: nn.Module, layers: Sequence[str], outputs: bool) -> Exchange:
        return Exchange(collect(model, x, layers, outputs=outputs, batch_size=batch_size), 1, 0, 0)

    return ask
