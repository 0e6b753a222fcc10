"""FedAvg: local SGD from the broadcast model, example-weighted averaging of the model deltas.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017, Algorithm 1 (ClientUpdate with B = batch size, E epochs or a fixed number of steps;
server averages weighted by n_k). The client sends the delta v_i = x_i - x, so that the server's
update x + sum_i (n_i / n) v_i is the FedAvg average and a compressor acts on the delta.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Algorithm, ClientOutput, LocalConfig, LossFn, register


def local_sgd(
    x: torch.Tensor,
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn,
    cfg: LocalConfig,
) -> tuple[torch.Tensor, float]:
    """Plain SGD from the flat parameters x; returns the final flat parameters and the mean loss.

    Mini-batches walk through seeded permutations of the local data (a new one each epoch); batch
    size 0 (or one at least as large as the data) uses every example every step.
    """
    n = len(labels)
    steps = cfg.num_steps(n)
    # the parameters become views into one flat copy of x, so the trained flat vector needs no gathering
    flat = x.detach().clone()
    nn.utils.vector_to_parameters(flat, model.parameters())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    full = cfg.batch_size <= 0 or cfg.batch_size >= n
    order = torch.arange(n)
    pos = n  # forces a fresh permutation on the first step
    total = 0.0
    for _ in range(steps):
        if full:
            xb, yb = inputs, labels
        else:
            if pos + cfg.batch_size > n:
                order = torch.randperm(n, generator=gen)
                pos = 0
            idx = order[pos : pos + cfg.batch_size]
            pos += cfg.batch_size
            xb, yb = inputs[idx], labels[idx]
        loss = loss_fn(model, xb, yb)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(g, alpha=-cfg.lr)
        total += float(loss.detach())
    mean_loss = total / steps if steps else math.nan
    return flat, mean_loss


@register("fedavg")
class FedAvg(Algorithm):
    """Local SGD steps (or epochs) on the client's training split; the delta is communicated."""

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
        local, loss = local_sgd(x, model, train.x, train.y, loss_fn, cfg)
        # in place: `local` is this call's own buffer (the model's parameters are views into it and
        # are loaded afresh by the next call), so the delta needs no second d-vector
        return ClientOutput(update=local.sub_(x), num_examples=len(train.y), train_loss=loss)
