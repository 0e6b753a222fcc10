"""Robust aggregation: server halves that replace the cohort mean when some clients may be hostile.

    median            coordinate-wise median of the cohort's vectors (Flower's FedMedian)
    trimmed-mean(b)   per coordinate, drop the int(b n) smallest and largest values, average the rest
                      (Flower's FedTrimmedAvg, b in [0, 0.5))
    krum(f, m)        score each vector by the summed squared distances to its n - f - 2 nearest
                      others, keep the m lowest-scoring, average them weighted by their shares
                      (Blanchard et al., NeurIPS 2017; m > 1 is Multi-Krum; Flower's Krum/MultiKrum)

They apply to the decoded vectors (model deltas: every rule above is translation-equivariant, so on
deltas it gives what Flower's strategies give on the models). Unlike the running sums of the other
server halves they need the whole cohort at once: memory O(n d) for n replies. A feedback mechanism's
server half (EF21, EF-BV, DIANA, EF) keeps running means that must take in every accepted message as
sent, so robust rules go only with `feedback = "none"`; `fedsqueeze.config` refuses the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from fedsqueeze.specs import SpecError, parse_call

from .base import FeedbackError, Message, ServerHalf, SparseVector

#: the aggregation rules and their arguments (positional order), for specs and error messages
RULES = {"mean": (), "median": (), "trimmed-mean": ("beta",), "krum": ("f", "m")}


def parse_rule(spec: str) -> tuple[str, dict[str, float]]:
    """(rule, arguments) of an `aggregation` spec; FeedbackError naming the valid rules and arguments."""
    try:
        call = parse_call(spec, example="trimmed-mean(beta=0.1)")
    except SpecError as exc:
        raise FeedbackError(f"aggregation: {exc}") from None
    if call.name not in RULES:
        raise FeedbackError(f"unknown aggregation {call.name!r}; valid: {', '.join(RULES)}")
    try:
        args = call.bind(RULES[call.name])
    except SpecError as exc:
        raise FeedbackError(str(exc)) from None
    for key, value in args.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FeedbackError(f"{call.name}: {key} must be a number, got {value!r}")
    if call.name == "trimmed-mean":
        args.setdefault("beta", 0.2)
        if not 0.0 <= args["beta"] < 0.5:
            raise FeedbackError(f"trimmed-mean: beta must be in [0, 0.5), got {args['beta']!r}")
    if call.name == "krum":
        args.setdefault("f", 1)
        args.setdefault("m", 1)
        for key in ("f", "m"):
            if args[key] != int(args[key]) or args[key] < (0 if key == "f" else 1):
                raise FeedbackError(f"krum: {key} must be an integer >= {0 if key == 'f' else 1}, got {args[key]!r}")
            args[key] = int(args[key])
    return call.name, args


def robust_server(spec: str, num_clients: int, weights: Sequence[float] | None = None) -> ServerHalf:
    """The server half of a robust `aggregation` spec (not "mean", which is the mechanism's own)."""
    rule, args = parse_rule(spec)
    if rule == "median":
        return Median(num_clients, weights)
    if rule == "trimmed-mean":
        return TrimmedMean(num_clients, weights, beta=args["beta"])
    if rule == "krum":
        return Krum(num_clients, weights, f=args["f"], m=args["m"])
    raise FeedbackError("aggregation 'mean' is the mechanism's own server half, not a robust rule")


class _Cohort(ServerHalf):
    """Keeps the round's vectors (dense), in client order, for a rule that needs them all."""

    def _start(self) -> None:
        self._ids: list[int] = []
        self._vectors: list[torch.Tensor] = []

    def _add(self, cid: int, p: float, vec: Message) -> None:
        self._ids.append(cid)
        self._vectors.append(vec.to_dense() if isinstance(vec, SparseVector) else vec)

    def _finish(self, share: float) -> torch.Tensor:
        return self._rule(torch.stack(self._vectors))

    def _rule(self, stacked: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Median(_Cohort):
    def _rule(self, stacked: torch.Tensor) -> torch.Tensor:
        # numpy's median averages the two middle values of an even cohort (torch's takes the lower one);
        # Flower's FedMedian uses numpy's
        return torch.from_numpy(np.median(stacked.numpy(), axis=0)).to(stacked.dtype)


class TrimmedMean(_Cohort):
    def __init__(self, num_clients: int, weights: Sequence[float] | None, *, beta: float) -> None:
        super().__init__(num_clients, weights)
        self.beta = beta

    def _rule(self, stacked: torch.Tensor) -> torch.Tensor:
        n = stacked.shape[0]
        cut = int(self.beta * n)
        kept = torch.sort(stacked, dim=0).values[cut : n - cut]
        return kept.mean(dim=0)


class Krum(_Cohort):
    def __init__(self, num_clients: int, weights: Sequence[float] | None, *, f: int, m: int) -> None:
        super().__init__(num_clients, weights)
        self.f = f
        self.m = m

    def _rule(self, stacked: torch.Tensor) -> torch.Tensor:
        n = stacked.shape[0]
        flat = stacked.to(torch.float64)
        norms = (flat * flat).sum(dim=1)
        distances = norms[:, None] + norms[None, :] - 2.0 * flat @ flat.T
        closest = max(1, n - self.f - 2)
        # each vector's own distance (0) sorts first and is skipped, as in Flower's select_multikrum
        order = torch.argsort(distances, dim=1, stable=True)[:, 1 : closest + 1]
        scores = torch.gather(distances, 1, order).sum(dim=1)
        best = torch.argsort(scores, stable=True)[: self.m]
        weights = torch.tensor([float(self.p[self._ids[i]]) for i in best.tolist()], dtype=torch.float64)
        chosen = flat[best]
        return ((weights[:, None] * chosen).sum(dim=0) / weights.sum()).to(stacked.dtype)


def check_rule_fits(spec: str, mechanism: str) -> None:
    """FeedbackError when a robust rule is asked for with a mechanism that keeps running means."""
    rule, _ = parse_rule(spec)
    if rule != "mean" and mechanism != "none":
        raise FeedbackError(
            f"aggregation {spec!r} needs feedback = 'none': {mechanism}'s server half keeps running means that "
            "must take in every accepted message as sent (a robust rule would drop or reshape some of them)"
        )
