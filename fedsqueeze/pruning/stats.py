"""Calibration statistics of the prunable layers: per-channel sums of squares, collected by forward hooks.

For each Linear or Conv2d layer (its weight viewed as a matrix W of shape (out, cols)):
- `in_sq[j]`  = sum over examples and positions of x_j^2, x the layer's input as the columns of W see it
  (a Linear layer's input features; a convolution's unfolded patches, channel x kernel position, as
  Wanda's image-classifier code reshapes them);
- `out_sq[i]` = sum over the same positions of y_i^2, y the layer's output (for the symmetric score);
- `positions`: how many rows of x were summed (examples x spatial positions).

Every entry is a sum over examples, so the statistics of the union of the clients' data are the sums
of the clients' statistics (`merge`): no example has to leave its client, and the sums are what secure
aggregation would add. The forward pass runs in float64 so that the federated sums equal the
centralised ones to float64 rounding, whatever the batch composition.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import PruneError

PRUNABLE = (nn.Linear, nn.Conv2d)


@dataclass
class LayerStats:
    in_sq: torch.Tensor  # float64 (cols,)
    out_sq: torch.Tensor | None  # float64 (out,), None unless output statistics were asked for
    positions: int

    def __add__(self, other: LayerStats) -> LayerStats:
        if self.in_sq.shape != other.in_sq.shape or (self.out_sq is None) != (other.out_sq is None):
            raise PruneError(
                f"statistics of different shapes: {tuple(self.in_sq.shape)} and {tuple(other.in_sq.shape)}"
            )
        out = None if self.out_sq is None or other.out_sq is None else self.out_sq + other.out_sq
        return LayerStats(self.in_sq + other.in_sq, out, self.positions + other.positions)


@dataclass
class Stats:
    """Statistics of the layers named in `layers` over `examples` calibration examples."""

    examples: int = 0
    layers: dict[str, LayerStats] = field(default_factory=dict)

    # ---- as flat arrays (what a client sends) -------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"examples": np.array([self.examples], dtype=np.int64)}
        for name, s in self.layers.items():
            out[f"{name}:in_sq"] = s.in_sq.numpy()
            if s.out_sq is not None:
                out[f"{name}:out_sq"] = s.out_sq.numpy()
            out[f"{name}:positions"] = np.array([s.positions], dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, int]]) -> Stats:
        """Read a client's arrays, checked against the expected layers {name: (out, cols)} (PruneError if not)."""
        try:
            examples = int(np.asarray(arrays["examples"]).reshape(-1)[0])
            layers = {}
            for name, (rows, cols) in expected.items():
                in_sq = _vector(arrays[f"{name}:in_sq"], cols, f"{name}:in_sq")
                out_key = f"{name}:out_sq"
                out_sq = _vector(arrays[out_key], rows, out_key) if out_key in arrays else None
                positions = int(np.asarray(arrays[f"{name}:positions"]).reshape(-1)[0])
                layers[name] = LayerStats(in_sq, out_sq, positions)
        except KeyError as exc:
            raise PruneError(f"calibration statistics lack the entry {exc.args[0]!r}") from None
        return cls(examples, layers)


def _vector(a: np.ndarray, n: int, key: str) -> torch.Tensor:
    v = torch.as_tensor(np.asarray(a, dtype=np.float64).copy())
    if v.shape != (n,) or not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise PruneError(f"statistic {key!r} must be {n} finite non-negative values, got shape {tuple(v.shape)}")
    return v


def merge(parts: Iterable[Stats]) -> Stats:
    """The statistics of the union of the parts' data: plain addition."""
    parts = list(parts)
    if not parts:
        raise PruneError("no calibration statistics to merge")
    names = list(parts[0].layers)
    total = Stats(0, {})
    for p in parts:
        if list(p.layers) != names:
            raise PruneError(f"statistics for layers {list(p.layers)} and {names} cannot be added")
        total.examples += p.examples
        for name in names:
            total.layers[name] = total.layers[name] + p.layers[name] if name in total.layers else p.layers[name]
    return total


# ---- which layers ------------------------------------------------------------------------------------


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as the (out, cols) matrix the scores and masks work on (a view)."""
    return module.weight.reshape(module.weight.shape[0], -1)


def prunable_layers(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, nn.Module]:
    """Linear and (ungrouped) Conv2d layers in module order, except names matching an `exclude` glob."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, PRUNABLE) or any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            continue  # unfold-based statistics need a plain convolution
        out[name] = m
    if not out:
        raise PruneError(
            f"the model ({type(model).__name__}) has no prunable layer (nn.Linear or nn.Conv2d with groups=1)"
            + (f" outside the excluded patterns {list(exclude)}" if exclude else "")
        )
    return out


# ---- collection ----------------------------------------------------------------------------------------


def _columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer input as rows of W's columns: (positions, cols)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same", stride 1: symmetric when every dilation * (k - 1) is even
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
            if any(t % 2 for t in total):
                raise PruneError(f"padding='same' with an even kernel is not supported ({module})")
            padding = tuple(t // 2 for t in total)
    u = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return u.transpose(1, 2).reshape(-1, u.shape[1])


def _rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer output as (positions, out)."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])


@torch.no_grad()
def collect(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str] | None = None,
    *,
    outputs: bool = False,
    batch_size: int = 256,
) -> Stats:
    """Statistics of `layers` (default: every prunable layer) on the inputs x, in float64.

    The model is copied (and put in eval mode), so the caller's model is untouched.
    """
    work = copy.deepcopy(model).double().eval()
    available = prunable_layers(work)
    names = list(available) if layers is None else list(layers)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise PruneError(f"no prunable layer named {unknown[0]!r}; prunable layers: {', '.join(available)}")
    acc: dict[str, LayerStats] = {}
    hooks = []

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            cols = _columns(module, inputs[0])
            s = LayerStats(
                cols.square().sum(0),
                _rows(module, output).square().sum(0) if outputs else None,
                int(cols.shape[0]),
            )
            acc[name] = acc[name] + s if name in acc else s

        return hook

    for name in names:
        hooks.append(available[name].register_forward_hook(hook_for(name)))
    try:
        for start in range(0, len(x), batch_size):
            work(x[start : start + batch_size].double())
    finally:
        for h in hooks:
            h.remove()
    empty = {n: _empty(available[n], outputs) for n in names if n not in acc}
    return Stats(int(len(x)), {n: acc[n] if n in acc else empty[n] for n in names})


def _empty(module: nn.Module, outputs: bool) -> LayerStats:
    rows, cols = weight_matrix(module).shape
    return LayerStats(
        torch.zeros(cols, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64) if outputs else None, 0
    )
