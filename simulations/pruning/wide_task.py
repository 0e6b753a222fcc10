"""A larger user task for the pruning figure: 10-class synthetic data (scikit-learn's
make_classification, generated locally), an MLP 64-256-256-10 (85k parameters, 18x the digits MLP).

    fedsqueeze simulate --set task=wide_task:build   (with this folder on PYTHONPATH)
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import make_classification
from torch import nn

from fedsqueeze.tasks import Dataset, make_task


def build(num_clients: int, partition: str | None, seed: int, width: int = 256):
    x, y = make_classification(
        n_samples=8000,
        n_features=64,
        n_informative=24,
        n_redundant=16,
        n_classes=10,
        n_clusters_per_class=2,
        class_sep=1.5,
        random_state=seed,
    )

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))

    data = Dataset("wide-synthetic", x.astype(np.float32), y.astype(np.int64), 10)
    return make_task("wide-mlp", model, data, num_clients=num_clients, partition=partition or "iid", seed=seed)
