"""FLIX: explicit personalisation by mixing the global model with each client's local optimum.

Gasanov, Khaled, Horváth, Richtárik, "FLIX: A Simple and Communication-Efficient Alternative to Local
Methods in Federated Learning", AISTATS 2022, eq. (2):

    minimise  f~(x) = (1/n) sum_i f_i(alpha_i x + (1 - alpha_i) x_i*),    x_i* = argmin f_i

Each client computes x_i* once, locally, before it first trains (L-BFGS on its full training loss;
kept in its state, never sent), and its personalised model is alpha_i x + (1 - alpha_i) x_i*.
Training then runs plain federated gradient steps on f~: the client takes K local steps
y <- y - lr * alpha_i grad f_i(alpha_i y + (1 - alpha_i) x_i*) from y = x and sends y - x; the server
averages uniformly (f~ weighs clients equally). K = 1 is gradient descent on f~ ("FLIX solved by GD").

alpha = 1 is plain federated training of f; alpha = 0 gives the local models (the gradient in x
vanishes). alpha may be one number, a list indexed by client id, or "uniform(lo, hi)" (drawn per
client from its id). f~_i is alpha_i^2 L_i-smooth, so smaller alpha_i also permits larger steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._local import batches, cid_of, flat_grad, local_optimum, per_client, steps_of
from .base import Algorithm, ClientOutput, LocalConfig, LossFn, register
from .personal import client_report


class Personalized:
    """alpha_i per client, x_i* computed once and kept in the client state, and the mixed personal model."""

    XSTAR = "flix.xstar"

    def __init__(self, alpha: float | Sequence[float] | str, solver_iters: int, report: bool) -> None:
        if not isinstance(alpha, (list, tuple)):
            per_client(alpha, 0, "alpha")  # validates the form
        if isinstance(alpha, (list, tuple)) and not all(0 <= float(a) <= 1 for a in alpha):
            raise ValueError(f"every alpha must be in [0, 1], got {list(alpha)}")
        if isinstance(alpha, (int, float)) and not 0 <= float(alpha) <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.alpha = list(alpha) if isinstance(alpha, (list, tuple)) else alpha
        self.solver_iters = int(solver_iters)
        self.report = bool(report)

    def alpha_of(self, data: object) -> float:
        return per_client(self.alpha, cid_of(data), "alpha")

    def x_star(
        self, x: torch.Tensor, model: nn.Module, data: object, loss_fn: LossFn, state: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The client's local optimum, computed on first use from the first model it receives."""
        if self.XSTAR not in state:
            state[self.XSTAR] = local_optimum(model, x, loss_fn, data, max_iter=self.solver_iters)
        return state[self.XSTAR].to(x.dtype)

    def personal_params(
        self, x: torch.Tensor, model: nn.Module, data: object, state: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """alpha_i x + (1 - alpha_i) x_i* (x itself before x_i* exists or when alpha_i = 1)."""
        a = self.alpha_of(data)
        if a == 1.0 or self.XSTAR not in state:
            return x
        return a * x + (1 - a) * state[self.XSTAR].to(x.dtype)


@register("flix")
class Flix(Personalized, Algorithm):
    """Local gradient steps on the FLIX objective; uniform server average of the deltas."""

    uniform_shares = True

    def __init__(
        self, alpha: float | Sequence[float] | str = 0.5, solver_iters: int = 500, report: bool = True
    ) -> None:
        Personalized.__init__(self, alpha, solver_iters, report)

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
        xstar = self.x_star(x, model, data, loss_fn, state) if a < 1 else x
        metrics = client_report(self, x, model, data, state) if self.report else {}
        n = len(data.train.y)  # type: ignore[attr-defined]
        y = x.clone()
        total, steps = 0.0, steps_of(cfg, n)
        stream = batches(cfg, data)
        for _ in range(steps if a > 0 else 0):
            xb, yb = next(stream)
            loss, g = flat_grad(model, a * y + (1 - a) * xstar, loss_fn, xb, yb)
            y = y - cfg.lr * a * g
            total += loss
        loss = total / steps if steps and a > 0 else math.nan
        return ClientOutput(update=y - x, num_examples=n, train_loss=loss, metrics=metrics)
