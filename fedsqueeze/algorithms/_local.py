"""Shared pieces of the local-training algorithms: flat gradients, mini-batches, local solves, evaluation.

Not an algorithm (the leading underscore keeps `available()` from listing it). Everything works on the
flat parameter vector in `model.parameters()` order, the layout the server's model vector uses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .base import ClientOutput, LocalConfig, LossFn, derive_seed, generator


def params_of(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())


def load_flat(model: nn.Module, v: torch.Tensor) -> None:
    """Copy the flat vector v into the model's parameters (in their dtype)."""
    dtype = next(model.parameters()).dtype
    nn.utils.vector_to_parameters(v.detach().to(dtype).clone(), model.parameters())


def flat_grad(
    model: nn.Module, v: torch.Tensor, loss_fn: LossFn, xb: torch.Tensor, yb: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """(loss, flat gradient) of loss_fn at the flat parameters v, in v's dtype."""
    load_flat(model, v)
    params = params_of(model)
    loss = loss_fn(model, xb, yb)
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads]).to(v.dtype)


def hvp(
    model: nn.Module, v: torch.Tensor, w: torch.Tensor, loss_fn: LossFn, xb: torch.Tensor, yb: torch.Tensor
) -> torch.Tensor:
    """Hessian-vector product of loss_fn at v with the direction w (double backward)."""
    load_flat(model, v)
    params = params_of(model)
    loss = loss_fn(model, xb, yb)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    hw = torch.autograd.grad(flat @ w.to(flat.dtype), params)
    return torch.cat([h.reshape(-1) for h in hw]).to(v.dtype)


class Batches:
    """Mini-batches over a split: seeded permutations (a new one per epoch), or the full split when batch_size <= 0."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> None:
        self.inputs, self.labels = inputs, labels
        self.n = len(labels)
        self.full = batch_size <= 0 or batch_size >= self.n
        self.batch_size = batch_size
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.order = torch.arange(self.n)
        self.pos = self.n

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.full:
            return self.inputs, self.labels
        if self.pos + self.batch_size > self.n:
            self.order = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.inputs[idx], self.labels[idx]


def one_gradient(x: torch.Tensor, model: nn.Module, data: object, loss_fn: LossFn, cfg: LocalConfig) -> ClientOutput:
    """The client's reply of gradient steps: grad f_i(x) on one mini-batch (the whole split for batch 0)."""
    inputs, labels = train_split(data)
    loss, grad = flat_grad(model, x, loss_fn, *Batches(inputs, labels, cfg.batch_size, cfg.seed).next())
    return ClientOutput(update=grad.to(torch.float32), num_examples=len(labels), train_loss=loss)


def train_split(data: object) -> tuple[torch.Tensor, torch.Tensor]:
    train = data.train  # type: ignore[attr-defined]  # fedsqueeze.tasks.ClientData
    return train.x, train.y


def local_optimum(
    model: nn.Module, start: torch.Tensor, loss_fn: LossFn, data: object, *, max_iter: int = 500, tol: float = 1e-10
) -> torch.Tensor:
    """argmin of the client's full-batch training loss f_i, by L-BFGS with strong-Wolfe line search.

    Done once, locally, before training (FLIX's x_i*). On a strongly convex f_i this is the exact local
    optimum to ~tol in gradient norm; on a non-convex model it is a local minimum near `start`.
    """
    inputs, labels = train_split(data)
    load_flat(model, start)
    params = params_of(model)
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0, history_size=20,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model, inputs, labels)
        loss.backward()
        return loss

    for _ in range(5):  # L-BFGS may stop early on a flat line search; restart a few times
        opt.step(closure)
        _, g = flat_grad(model, nn.utils.parameters_to_vector(params).detach(), loss_fn, inputs, labels)
        if float(g.norm()) <= tol * 10:
            break
    for p in params:
        p.grad = None
    return nn.utils.parameters_to_vector(params).detach().clone()


def smoothness_estimate(
    model: nn.Module, points: Sequence[torch.Tensor], loss_fn: LossFn, data: object, *, iters: int = 50, seed: int = 0
) -> float:
    """Largest Hessian eigenvalue of the full-batch f_i, maximised over `points` (power iteration with HVPs).

    For binary L2-logistic regression at x = 0 this is exactly L_i = lambda_max(A^T A)/(4 m) + reg (every
    sigmoid'(0) is 1/4, the bound); elsewhere it is the local curvature, a lower bound on the global L_i.
    """
    inputs, labels = train_split(data)
    best = 0.0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for point in points:
        w = torch.randn(point.numel(), generator=gen, dtype=point.dtype)
        w /= w.norm()
        lam = 0.0
        for _ in range(iters):
            hw = hvp(model, point, w, loss_fn, inputs, labels)
            lam = float(w @ hw)
            norm = float(hw.norm())
            if norm == 0.0:
                break
            w = hw / norm
        best = max(best, lam)
    return best


@torch.no_grad()
def accuracy(model: nn.Module, params: torch.Tensor, split: object) -> float:
    """Accuracy of the model with the flat parameters `params` on a split (NaN when it is empty)."""
    x, y = split.x, split.y  # type: ignore[attr-defined]
    if len(y) == 0:
        return math.nan
    load_flat(model, params)
    was = model.training
    model.eval()
    try:
        out = model(x.to(next(model.parameters()).dtype))
    finally:
        model.train(was)
    return float((out.argmax(dim=1) == y).float().mean())


def geometric(p: float, seed: int) -> int:
    """K ~ Geometric(p) on {1, 2, ...}: local steps until the first communication coin comes up (mean 1/p)."""
    if not 0 < p <= 1:
        raise ValueError(f"the communication probability p must be in (0, 1], got {p}")
    if p == 1:
        return 1
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = float(torch.rand((), generator=gen, dtype=torch.float64))
    return 1 + int(math.floor(math.log1p(-u) / math.log1p(-p)))


_UNIFORM = re.compile(r"^\s*uniform\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*\)\s*$")


def per_client(value: object, cid: int, what: str, seed: object = 0) -> float:
    """A per-client constant: a number, a list indexed by client id, or "uniform(lo, hi)" drawn from (seed, cid)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, a list or 'uniform(lo, hi)', got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        if not 0 <= cid < len(value):
            raise ValueError(f"{what} lists {len(value)} values but client {cid} needs one")
        return float(value[cid])
    if isinstance(value, str):
        m = _UNIFORM.match(value)
        if m:
            lo, hi = float(m.group(1)), float(m.group(2))
            gen = generator(seed, cid, what)
            return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))
    raise ValueError(f"{what} must be a number, a list or 'uniform(lo, hi)', got {value!r}")


def cid_of(data: object) -> int:
    return int(getattr(data, "cid", 0))


def round_seed(cfg: LocalConfig, *parts: object) -> int:
    return derive_seed(cfg.seed, *parts)


def steps_of(cfg: LocalConfig, n: int) -> int:
    """Local steps this round: the server's K (extra "K") when it sends one, else the config's."""
    k = cfg.extra.get("K")
    return int(k) if k is not None else cfg.num_steps(n)


def batches(cfg: LocalConfig, data: object) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    inputs, labels = train_split(data)
    b = Batches(inputs, labels, cfg.batch_size, cfg.seed)
    while True:
        yield b.next()
