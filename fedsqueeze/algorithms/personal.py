"""Personalised evaluation: each client's own model on its own test split, next to the global model.

An algorithm with personal models (FLIX, Scafflix, low-rank deltas) has a method
`personal_params(x, model, data, state) -> flat vector`: the parameters, in the base model's layout,
of the model client i would use given the global x and its private state. `client_report` measures
both models on the client's test split; `summarize` turns the per-client numbers into the
columns a metrics row reports (mean and spread over clients).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch
from torch import nn

from ._local import accuracy
from .base import Algorithm


def client_report(
    algorithm: Algorithm, x: torch.Tensor, model: nn.Module, data: object, state: dict
) -> dict[str, float]:
    """global_accuracy and personal_accuracy of one client on its own test split."""
    test = data.test  # type: ignore[attr-defined]
    out = {"global_accuracy": accuracy(model, algorithm.global_params(x, model), test)}
    personal = getattr(algorithm, "personal_params", None)
    params = personal(x, model, data, state) if personal is not None else x
    out["personal_accuracy"] = accuracy(model, params, test)
    return out


def summarize(reports: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean, standard deviation, min and max over clients of every reported number (NaN entries skipped)."""
    out: dict[str, float] = {}
    keys = sorted({k for r in reports for k in r})
    for key in keys:
        vals = [r[key] for r in reports if key in r and math.isfinite(r[key])]
        if not vals:
            continue
        out[f"{key}_mean"] = statistics.fmean(vals)
        out[f"{key}_std"] = statistics.pstdev(vals)
        out[f"{key}_min"] = min(vals)
        out[f"{key}_max"] = max(vals)
    return out
