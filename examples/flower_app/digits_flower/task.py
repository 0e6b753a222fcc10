"""A small PyTorch task, written the way Flower's PyTorch quickstart writes its task.py: the model, the
data of one partition, and the train and test functions. Nothing here knows about fedsqueeze."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """An MLP for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def load_data(partition_id: int, num_partitions: int, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    """This partition's train and test loaders (an IID split of scikit-learn's digits, 80/20 per partition)."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    part = np.array_split(order, num_partitions)[partition_id]
    cut = int(0.8 * len(part))
    xs = torch.tensor(x[part] / 16.0, dtype=torch.float32)
    ys = torch.tensor(y[part], dtype=torch.int64)
    g = torch.Generator().manual_seed(partition_id)
    train = DataLoader(TensorDataset(xs[:cut], ys[:cut]), batch_size=batch_size, shuffle=True, generator=g)
    test = DataLoader(TensorDataset(xs[cut:], ys[cut:]), batch_size=batch_size)
    return train, test


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    """Local SGD; returns the mean training loss."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    net.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = criterion(net(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
    return total / max(batches, 1)


def test(net: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """(loss, accuracy) on a loader."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    net.eval()
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for xb, yb in loader:
            out = net(xb)
            loss += float(criterion(out, yb))
            correct += int((out.argmax(1) == yb).sum())
            n += len(yb)
    return loss / n, correct / n
