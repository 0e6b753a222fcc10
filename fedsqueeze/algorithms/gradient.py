"""Gradient mode: one local gradient per round, the setting of the error-feedback theory.

Client i sends v_i = grad f_i(w), the gradient of its training loss at the model w it received: over its
whole training split with batch-size 0 (exactly f_i's gradient), or over one seeded mini-batch otherwise.
The server steps x <- x - lr g with the estimate g that the feedback mechanism forms from the replies.

Registered as "gradient"; `mode = "gradient"` in the run config selects it (the other algorithms
communicate model deltas and are the model-delta mode). The stepsize is the run's `lr` (with
`lr = "theory"`, the mechanism's rule), which the run plan passes in. The clients' shares are equal:
the objective is f = (1/n) sum_i f_i, that of the convex tasks and of the theory.
"""

from __future__ import annotations

import torch
from torch import nn

from ._local import one_gradient
from .base import Algorithm, ClientOutput, LocalConfig, LossFn, register


@register("gradient")
class GradientStep(Algorithm):
    """v_i = grad f_i(x); x <- x - lr g."""

    uniform_shares = True

    def __init__(self, lr: float = 1.0) -> None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"gradient mode needs a stepsize lr > 0, got {lr}")
        self.lr = float(lr)

    def client_step(
        self,
        x: torch.Tensor,
        model: nn.Module,
        data: object,
        loss_fn: LossFn,
        cfg: LocalConfig,
        state: dict[str, torch.Tensor],
    ) -> ClientOutput:
        return one_gradient(x, model, data, loss_fn, cfg)

    def server_step(self, x: torch.Tensor, estimate: torch.Tensor, server_round: int) -> torch.Tensor:
        return x - self.lr * estimate.to(x.dtype)
