"""FedProx: local SGD on the proximal objective f_i(y) + (mu/2) ||y - x||^2 from the broadcast model x.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous Networks",
MLSys 2020, Algorithm 2 (local objective h_k(w; w^t) = F_k(w) + (mu/2)||w - w^t||^2, solved inexactly
by local SGD). The client sends the delta y - x; the server averages as FedAvg does (example weights).
mu = 0 is FedAvg exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Algorithm, ClientOutput, LocalConfig, LossFn, register
from .fedavg import local_sgd


@register("fedprox")
class FedProx(Algorithm):
    """FedAvg's local SGD with the proximal term (mu/2)||y - x||^2 added to every local loss."""

    def __init__(self, mu: float = 0.01) -> None:
        if not float(mu) >= 0:
            raise ValueError(f"fedprox: mu must be >= 0, got {mu!r}")
        self.mu = float(mu)

    def client_step(
        self,
        x: torch.Tensor,
        model: nn.Module,
        data: object,
        loss_fn: LossFn,
        cfg: LocalConfig,
        state: dict[str, torch.Tensor],
    ) -> ClientOutput:
        train = data.train  # type: ignore[attr-defined]  # fedsqueeze.tasks.ClientData
        anchor = x.detach().clone()
        mu = self.mu

        def prox_loss(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            loss = loss_fn(m, xb, yb)
            if mu:
                flat = nn.utils.parameters_to_vector(m.parameters())
                loss = loss + 0.5 * mu * (flat - anchor.to(flat.dtype)).pow(2).sum()
            return loss

        local, loss = local_sgd(x, model, train.x, train.y, prox_loss, cfg)
        return ClientOutput(update=local - x, num_examples=len(train.y), train_loss=loss)
