"""A task of your own: your PyTorch model and your data, federated by fedsqueeze.

    fedsqueeze simulate --set task=my_task:build --set 'compressor=topk(0.1)'

(run it from this folder, or put the folder on PYTHONPATH). The function may take any of
`num_clients`, `partition` and `seed`, plus options given as `task=my_task:build(width=32)`.
"""

import numpy as np
from torch import nn

from fedsqueeze.tasks import Dataset, make_task


def build(num_clients: int, partition: str | None, seed: int, width: int = 16):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(600, 10)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)  # two classes

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, 2))

    return make_task(
        "my-task", model, Dataset("my-data", x, y, 2),
        num_clients=num_clients, partition=partition or "iid", seed=seed,
    )  # fmt: skip
