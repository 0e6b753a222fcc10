"""Scafflix: i-Scaffnew (Scaffnew with per-client stepsizes) applied to the FLIX objective.

Yi, Condat, Richtárik, "Explicit Personalization and Local Training: Double Communication Acceleration
in Federated Learning", TMLR 2025 (arXiv 2305.13170), Algorithm 1, in round form (one Flower round =
one communication; the server draws K ~ Geometric(p) and sends K and p):

    x~_i = alpha_i y + (1 - alpha_i) x_i*
    local step:     y <- y - (gamma_i / alpha_i) (grad f_i(x~_i) - h_i)                       (K times, y from x)
    communication:  xbar = (gamma / n) sum_j (alpha_j^2 / gamma_j) xhat_j,
                    gamma = ((1/n) sum_j alpha_j^2 / gamma_j)^-1
                    h_i <- h_i + (p alpha_i / gamma_i) (xbar - xhat_i)    (applied by the client at the
                                                                            start of its next round)

The equations follow algorithms.md §3, which we checked by derivation (the paper text was not at hand):
with f~_i(x) = f_i(alpha_i x + (1 - alpha_i) x_i*), grad f~_i = alpha_i grad f_i(x~_i), and i-Scaffnew on
f~ with stepsizes g_i = gamma_i / alpha_i^2 and control variates h~_i = alpha_i h_i gives exactly the local
step above, the server average weighted by 1/g_j = alpha_j^2/gamma_j, and the h update; sum_j alpha_j h_j
stays 0. f~_i is alpha_i^2 L_i-smooth and alpha_i^2 mu-strongly convex, so i-Scaffnew's theory (g_i =
1/L~_i, p = sqrt(min_i g_i mu~_i)) becomes gamma_i = 1/L_i and p = sqrt(min_i gamma_i mu_i).

What this implementation adds over the authors' released code (one shared stepsize, h reset each
round in the neural-network version, p = 0.2): per-client gamma_i (default 1/L_i, with L_i estimated
locally by power iteration on Hessian-vector products at the first model received and at x_i*, or
given), control variates that persist in client state, and p from theory.

The client's weight alpha_i^2 / gamma_i travels in its metrics under AGGREGATION_WEIGHT; the server's
mean is weighted by it (`reply_weight`) (the server must pass those weights, not example counts). A client with
alpha_i = 0 keeps its local model and has weight 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._local import batches, cid_of, flat_grad, geometric, per_client, smoothness_estimate, steps_of
from .base import AGGREGATION_WEIGHT, Algorithm, ClientOutput, LocalConfig, LossFn, register
from .flix import Personalized
from .personal import client_report


@register("scafflix")
class Scafflix(Personalized, Algorithm):
    reports_weights = True
    H, XHAT, GAMMA = "scafflix.h", "scafflix.xhat", "scafflix.gamma"

    def __init__(
        self,
        alpha: float | Sequence[float] | str = 0.5,
        gamma: float | Sequence[float] | str = "theory",
        p: float | str = "theory",
        mu: float | None = None,
        L: Sequence[float] | None = None,  # noqa: N803 (the smoothness constants' usual name)
        solver_iters: int = 500,
        report: bool = True,
    ) -> None:
        Personalized.__init__(self, alpha, solver_iters, report)
        if isinstance(p, str) and p != "theory":
            raise ValueError(f"scafflix: p must be in (0, 1] or 'theory', got {p!r}")
        if not isinstance(p, str) and not 0 < float(p) <= 1:
            raise ValueError(f"scafflix: p must be in (0, 1], got {p!r}")
        if isinstance(gamma, str) and gamma != "theory":
            raise ValueError(f"scafflix: gamma must be a number, a list per client or 'theory', got {gamma!r}")
        self.gamma = list(gamma) if isinstance(gamma, (list, tuple)) else gamma
        self.p_spec = p
        self.mu = None if mu is None else float(mu)
        self.L = None if L is None else [float(v) for v in L]

    def setup(self, task: object) -> None:
        """Read mu and the L_i from a convex task's exact objective (for p = "theory")."""
        objective = getattr(task, "objective", None)
        if objective is not None:
            self.mu = float(objective.mu) if self.mu is None else self.mu
            self.L = list(objective.L_i) if self.L is None else self.L

    def server_gammas(self) -> list[float] | None:
        if self.gamma == "theory":
            return None if self.L is None else [1.0 / v for v in self.L]
        if isinstance(self.gamma, list):
            return [float(g) for g in self.gamma]
        return [float(self.gamma)]

    @property
    def p(self) -> float:
        if not isinstance(self.p_spec, str):
            return float(self.p_spec)
        gammas = self.server_gammas()
        if self.mu is None or gammas is None:
            raise ValueError("scafflix: p = 'theory' needs mu and the L_i (give them, or a convex task)")
        return min(1.0, math.sqrt(min(gammas) * self.mu))

    def configure(self, server_round: int, client: int, seed: int) -> dict[str, bool | int | float | str]:
        p = self.p
        return {"K": geometric(p, seed), "p": p}

    def gamma_of(
        self, x: torch.Tensor, model: nn.Module, data: object, loss_fn: LossFn, state: dict[str, torch.Tensor]
    ) -> float:
        if self.gamma != "theory":
            return per_client(self.gamma, cid_of(data), "gamma")
        if self.L is not None:
            return 1.0 / self.L[cid_of(data)]
        if self.GAMMA not in state:  # estimated once, locally: 1 / L_i
            points = [x] + ([state[self.XSTAR].to(x.dtype)] if self.XSTAR in state else [])
            L_i = smoothness_estimate(model, points, loss_fn, data)  # noqa: N806
            state[self.GAMMA] = torch.tensor(1.0 / L_i, dtype=torch.float64)
        return float(state[self.GAMMA])

    def client_step(
        self,
        x: torch.Tensor,
        model: nn.Module,
        data: object,
        loss_fn: LossFn,
        cfg: LocalConfig,
        state: dict[str, torch.Tensor],
    ) -> ClientOutput:
        x = x.detach()
        a = self.alpha_of(data)
        n = len(data.train.y)  # type: ignore[attr-defined]
        xstar = self.x_star(x, model, data, loss_fn, state) if a < 1 else x
        metrics = client_report(self, x, model, data, state) if self.report else {}
        if a == 0:
            return ClientOutput(torch.zeros_like(x), n, math.nan, {**metrics, AGGREGATION_WEIGHT: 0.0})
        gamma = self.gamma_of(x, model, data, loss_fn, state)
        p = float(cfg.extra.get("p", self.p))
        h = state.get(self.H)
        h = torch.zeros_like(x) if h is None else h.to(x.dtype)
        if self.XHAT in state:
            h = h + (p * a / gamma) * (x - state[self.XHAT].to(x.dtype))
        y = x.clone()
        total, steps = 0.0, steps_of(cfg, n)
        stream = batches(cfg, data)
        for _ in range(steps):
            xb, yb = next(stream)
            loss, g = flat_grad(model, a * y + (1 - a) * xstar, loss_fn, xb, yb)
            y = y - (gamma / a) * (g - h)
            total += loss
        state[self.H] = h
        state[self.XHAT] = y
        metrics[AGGREGATION_WEIGHT] = a * a / gamma
        return ClientOutput(y - x, n, total / steps if steps else math.nan, metrics)
