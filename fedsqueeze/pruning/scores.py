"""Importance scores S (same shape as W, viewed as (out, cols)); the lowest scores are pruned.

- magnitude: |W_ij|, the baseline.
- wanda: |W_ij| * ||X_j||_2 (Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning Approach for
  Large Language Models", arXiv 2306.11695; `lib/prune.py::prune_wanda`).
- ria: (|W_ij| / sum_i' |W_i'j| + |W_ij| / sum_j' |W_ij'|) * ||X_j||_2^a, a = 0.5 (Zhang et al. 2024,
  "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models", ICLR 2024;
  `lib/prune.py::prune_ria`).
- symwanda: |W_ij| * (||X_j||_2 + ||Y_i||_2), input and output statistics (Yi & Richtarik 2025,
  "Symmetric Pruning of Large Language Models", arXiv 2501.18980). The paper's code is not public;
  this is the form recalled in docs/reference (Wanda's input norm plus the output norm of row i), with
  Y the layer's output activations on the calibration data.

||X_j||_2 = sqrt(in_sq_j), the norm over every calibration position (Wanda's scaler_row up to a
constant factor per layer, which changes no comparison within a layer).
"""

from __future__ import annotations

import torch

from .errors import PruneError
from .stats import LayerStats

METHODS = ("magnitude", "wanda", "ria", "symwanda")
#: RIA's exponent on the activation norm (the code's `--a` default)
RIA_A = 0.5


def score(method: str, weight: torch.Tensor, stats: LayerStats | None, *, a: float = RIA_A) -> torch.Tensor:
    """The score matrix, float64, for a weight matrix (out, cols) and the layer's statistics."""
    w = weight.detach().to(torch.float64).abs()
    if method == "magnitude":
        return w
    if method not in METHODS:
        raise PruneError(f"unknown pruning method {method!r}; valid: {', '.join(METHODS)}")
    if stats is None:
        raise PruneError(f"{method} needs calibration statistics")
    x_norm = stats.in_sq.to(torch.float64).sqrt()
    if x_norm.shape != (w.shape[1],):
        raise PruneError(f"input statistics of length {x_norm.numel()} for a weight with {w.shape[1]} columns")
    if method == "wanda":
        return w * x_norm[None, :]
    if method == "ria":
        # a column or row of zeros scores 0 (its weights are 0), not 0/0
        tiny = torch.finfo(torch.float64).tiny
        col = w.sum(0, keepdim=True).clamp_min(tiny)
        row = w.sum(1, keepdim=True).clamp_min(tiny)
        return (w / col + w / row) * x_norm[None, :].pow(a)
    if stats.out_sq is None:
        raise PruneError("symwanda needs output statistics (calibrate with outputs=True)")
    y_norm = stats.out_sq.to(torch.float64).sqrt()
    if y_norm.shape != (w.shape[0],):
        raise PruneError(f"output statistics of length {y_norm.numel()} for a weight with {w.shape[0]} rows")
    return w * (x_norm[None, :] + y_norm[:, None])
