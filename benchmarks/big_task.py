"""The round benchmark's model and data, as a user's task (`task = "big_task:build"`, benchmarks/ on the path).

An MLP in_dim -> h1 -> h2 -> classes (default 1024 -> 4096 -> 1536 -> 10, d = 10,506,762 parameters)
on synthetic Gaussian inputs labelled by a random linear teacher, all drawn from the seed.
Each client holds `examples` training examples (iid); the global test set has `test_examples`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsqueeze.tasks import Dataset, make_task


def make_model(in_dim: int = 1024, h1: int = 4096, h2: int = 1536, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, classes))


def make_data(n: int, in_dim: int, classes: int, seed: int, salt: int) -> Dataset:
    rng = np.random.default_rng([seed, salt])
    teacher = np.random.default_rng([seed, 0]).normal(size=(in_dim, classes)).astype(np.float32)
    x = rng.normal(size=(n, in_dim)).astype(np.float32)
    y = (x @ teacher).argmax(axis=1).astype(np.int64)
    return Dataset("synthetic-teacher", x, y, classes)


def build(
    num_clients: int,
    partition: str | None,
    seed: int,
    in_dim: int = 1024,
    h1: int = 4096,
    h2: int = 1536,
    classes: int = 10,
    examples: int = 320,
    test_examples: int = 256,
):
    def model() -> nn.Module:
        return make_model(in_dim, h1, h2, classes)

    return make_task(
        "big-mlp", model, make_data(num_clients * examples, in_dim, classes, seed, 1),
        num_clients=num_clients, partition=partition or "iid", seed=seed, test_fraction=0.0,
        global_test=make_data(test_examples, in_dim, classes, seed, 2),
    )  # fmt: skip


def local_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float,
                seed: int) -> float:  # fmt: skip
    """Plain PyTorch SGD: `steps` mini-batches from seeded permutations of the client's data."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n, pos, order, total = len(y), len(y), torch.arange(len(y)), 0.0
    model.train()
    for _ in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch]
        pos += batch
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total / max(steps, 1)
