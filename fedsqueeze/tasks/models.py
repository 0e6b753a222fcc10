"""Models (torch.nn) and the flat-vector view of their parameters.

Every classifier returns logits of shape (batch, num_classes), so cross-entropy and argmax apply to
all of them. The binary logistic model keeps one weight vector and bias (sigmoid regression) and
returns the logits [0, z]: softmax([0, z])[1] = sigmoid(z), and cross-entropy on them equals the
logistic loss log(1 + exp(-z)) for label 1 and log(1 + exp(z)) for label 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .errors import TaskError


class LogisticRegression(nn.Module):
    """Linear classifier on flattened inputs, initialised at zero (the convex papers' x^0 = 0).

    num_classes == 2: one weight vector w and bias b, logit z = w.x + b (parameters: weight (1, d), bias (1,)).
    num_classes > 2: multinomial, logits W x + b (weight (K, d), bias (K,)).
    The flat parameter vector is [weight row-major, bias], the layout `LogisticObjective` uses.
    """

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = True) -> None:
        super().__init__()
        if num_classes < 2:
            raise TaskError(f"logistic regression needs num_classes >= 2, got {num_classes}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.binary = num_classes == 2
        self.linear = nn.Linear(in_features, 1 if self.binary else num_classes, bias=bias)
        nn.init.zeros_(self.linear.weight)
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x.flatten(1))
        if self.binary:
            return torch.cat([torch.zeros_like(z), z], dim=1)
        return z


class MLP(nn.Module):
    """Flatten, then one or more hidden ReLU layers, then a linear output layer."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64,)) -> None:
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if not hidden or any(h < 1 for h in hidden):
            raise TaskError(f"MLP hidden sizes must be positive integers, got {list(hidden)}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv + ReLU + 2x2 max-pool blocks, then a linear classifier, for (C, H, W) images.

    Kernel 3 (padding 1) for images up to 16 pixels wide such as 8x8 digits, kernel 5 (padding 2)
    for larger ones such as 28x28 MNIST.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32)) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3:
            raise TaskError(f"SmallCNN needs images shaped (channels, height, width), got {shape}")
        c, h, w = shape
        if h < 4 or w < 4:
            raise TaskError(f"SmallCNN needs images of at least 4x4 pixels, got {h}x{w}")
        k = 3 if max(h, w) <= 16 else 5
        c1, c2 = (int(ch) for ch in channels)
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, k, padding=k // 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, k, padding=k // 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(c2 * (h // 2 // 2) * (w // 2 // 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def flat_params(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one detached 1-D tensor, in `model.parameters()` order."""
    return nn.utils.parameters_to_vector(model.parameters()).detach()


def set_flat_params(model: nn.Module, vector: torch.Tensor) -> None:
    """Load a flat vector (as from `flat_params`) into the model's parameters."""
    n = num_params(model)
    if vector.ndim != 1 or vector.numel() != n:
        raise TaskError(f"flat parameter vector has shape {tuple(vector.shape)}, the model needs ({n},)")
    with torch.no_grad():
        nn.utils.vector_to_parameters(vector.to(next(model.parameters()).dtype), model.parameters())


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def in_features(feature_shape: Sequence[int]) -> int:
    return int(math.prod(feature_shape))
