"""Scaffnew (ProxSkip for federated learning): local gradient steps corrected by control variates.

Mishchenko, Malinovsky, Stich, Richtárik, "ProxSkip: Yes! Local Gradient Steps Provably Lead to
Communication Acceleration! Finally!", ICML 2022, Algorithm 2 (Scaffnew), in the round form of
algorithms.md §3:

    server: draws K ~ Geometric(p) (local steps until the communication coin comes up) and sends K, p
    client: h_i <- h_i + (p/gamma) (x - xhat_i)        x = the broadcast average, xhat_i = last round's
                                                          final local iterate (skipped in the first round)
            y <- x; K times: y <- y - gamma (grad f_i(y) - h_i)      (full batch, or mini-batches)
            xhat_i <- y; send xhat_i - x
    server: x <- x + (1/n) sum_i (xhat_i - x) = (1/n) sum_i xhat_i   (uniform: f = (1/n) sum_i f_i)

h_i starts at 0, so sum_i h_i = 0 holds throughout. gamma is the config's lr (theory: 1/L); p = "theory"
is 1/sqrt(kappa), kappa = L/mu, giving O(sqrt(kappa) log 1/eps) communications. One Flower round is one
communication. The theory needs every client in every round (full participation); a client that missed
rounds applies the h update with the newest broadcast it receives. The communicated xhat_i - x can be
compressed like any update (then x is the average of the decompressed deltas, which the h update uses).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._local import batches, flat_grad, geometric, steps_of
from .base import Algorithm, ClientOutput, LocalConfig, LossFn, register


@register("scaffnew")
class Scaffnew(Algorithm):
    """Scaffnew with a per-round K ~ Geometric(p) from the server and persistent control variates h_i."""

    H, XHAT = "scaffnew.h", "scaffnew.xhat"
    #: the objective weighs clients equally, which keeps sum_i h_i = 0
    uniform_shares = True

    def __init__(self, p: float | str = "theory", kappa: float | None = None) -> None:
        if isinstance(p, str) and p != "theory":
            raise ValueError(f"scaffnew: p must be a probability in (0, 1] or 'theory', got {p!r}")
        if not isinstance(p, str) and not 0 < float(p) <= 1:
            raise ValueError(f"scaffnew: p must be in (0, 1], got {p!r}")
        self.p_spec = p
        self.kappa = None if kappa is None else float(kappa)

    def setup(self, task: object) -> None:
        """Read kappa = max_i L_i / mu from a convex task's exact objective (for p = "theory")."""
        objective = getattr(task, "objective", None)
        if self.kappa is None and objective is not None:
            self.kappa = max(objective.L_i) / float(objective.mu)  # every f_i is L-smooth in the theory

    @property
    def p(self) -> float:
        if not isinstance(self.p_spec, str):
            return float(self.p_spec)
        if self.kappa is None:
            raise ValueError("scaffnew: p = 'theory' needs kappa (give scaffnew(kappa=...) or a convex task)")
        return min(1.0, 1.0 / math.sqrt(self.kappa))

    def configure(self, server_round: int, client: int, seed: int) -> dict[str, bool | int | float | str]:
        p = self.p
        return {"K": geometric(p, seed), "p": p}

    def client_step(
        self,
        x: torch.Tensor,
        model: nn.Module,
        data: object,
        loss_fn: LossFn,
        cfg: LocalConfig,
        state: dict[str, torch.Tensor],
    ) -> ClientOutput:
        gamma = cfg.lr
        p = float(cfg.extra.get("p", self.p))
        x = x.detach()
        h = state.get(self.H)
        h = torch.zeros_like(x) if h is None else h.to(x.dtype)
        if self.XHAT in state:
            h = h + (p / gamma) * (x - state[self.XHAT].to(x.dtype))
        n = len(data.train.y)  # type: ignore[attr-defined]
        y = x.clone()
        total, steps = 0.0, steps_of(cfg, n)
        stream = batches(cfg, data)
        for _ in range(steps):
            xb, yb = next(stream)
            loss, g = flat_grad(model, y, loss_fn, xb, yb)
            y = y - gamma * (g - h)
            total += loss
        state[self.H] = h
        state[self.XHAT] = y
        return ClientOutput(update=y - x, num_examples=n, train_loss=total / steps if steps else math.nan)
